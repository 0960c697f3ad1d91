"""The weight changes a LoRA file can describe for one linear layer, before scale and strength.

- `LowRank` (LoRA): delta = up @ down, up [out, r], down [r, in].
- `Hadamard` (LyCORIS LoHa): delta = (w1_a @ w1_b) * (w2_a @ w2_b).
- `Kronecker` (LyCORIS LoKr): delta = kron(w1, w2), each factor full or a low-rank pair (a @ b).

Each kind can give its dense matrix in fp32 (for merging), apply itself to activations without building that
matrix where the algebra allows (for forward hooks), and be cut to a band of output rows or have its two
row halves swapped (for the split q/k/v and final-layer layouts of other tools), exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError


def _cast(tensor: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    if tensor is None:
        return None
    cast = tensor.to(device=device, dtype=dtype)
    # A LoRA loaded under inference mode (as nodes run) and applied outside it (while training on top of it):
    # autograd cannot save an inference tensor for backward, so it gets an ordinary copy.
    if cast.is_inference() and not torch.is_inference_mode_enabled():
        cast = cast.clone()
    return cast


def _swap_halves(tensor: Tensor) -> Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat((second, first))


@dataclass(frozen=True, eq=False)
class LowRank:
    up: Tensor  # [out, rank]: lora_up / lora_B
    down: Tensor  # [rank, in]: lora_down / lora_A

    algorithm = "lora"

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return self.up, self.down

    def matrix(self) -> Tensor:
        return self.up.float() @ self.down.float()

    def apply(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def to(self, device: torch.device, dtype: torch.dtype) -> LowRank:
        return LowRank(_cast(self.up, device, dtype), _cast(self.down, device, dtype))

    def rows(self, start: int, stop: int) -> LowRank:
        return LowRank(self.up[start:stop], self.down)

    def swap_row_halves(self) -> LowRank:
        return LowRank(_swap_halves(self.up), self.down)

    def scaled(self, factor: float) -> LowRank:
        """The same delta times `factor`, folded into the up factor (computed in fp32, stored as before)."""
        return LowRank((self.up.float() * factor).to(self.up.dtype), self.down)


@dataclass(frozen=True, eq=False)
class Hadamard:
    w1_a: Tensor  # [out, rank]
    w1_b: Tensor  # [rank, in]
    w2_a: Tensor  # [out, rank]
    w2_b: Tensor  # [rank, in]

    algorithm = "loha"

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return self.w1_a, self.w1_b, self.w2_a, self.w2_b

    def matrix(self) -> Tensor:
        return (self.w1_a.float() @ self.w1_b.float()) * (self.w2_a.float() @ self.w2_b.float())

    def apply(self, x: Tensor) -> Tensor:
        # The Hadamard product has no factored form: build the layer's delta per call rather than keep a
        # dense copy of every patched layer alive.
        return F.linear(x, (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b))

    def to(self, device: torch.device, dtype: torch.dtype) -> Hadamard:
        return Hadamard(*(_cast(t, device, dtype) for t in self.tensors()))

    def rows(self, start: int, stop: int) -> Hadamard:
        return Hadamard(self.w1_a[start:stop], self.w1_b, self.w2_a[start:stop], self.w2_b)

    def swap_row_halves(self) -> Hadamard:
        return Hadamard(_swap_halves(self.w1_a), self.w1_b, _swap_halves(self.w2_a), self.w2_b)

    def scaled(self, factor: float) -> Hadamard:
        return dataclasses.replace(self, w1_a=(self.w1_a.float() * factor).to(self.w1_a.dtype))


@dataclass(frozen=True, eq=False)
class Kronecker:
    """Each factor is stored as the file has it: full (`w1`) or as a pair (`w1_a` @ `w1_b`)."""

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None

    algorithm = "lokr"

    def __post_init__(self) -> None:
        for name in ("w1", "w2"):
            full, a, b = (getattr(self, name + suffix) for suffix in ("", "_a", "_b"))
            if (full is None) == (a is None or b is None):
                raise ValueError(f"Kronecker: expected lokr_{name} or both lokr_{name}_a and lokr_{name}_b")

    @staticmethod
    def _factor(full: Tensor | None, a: Tensor | None, b: Tensor | None) -> Tensor:
        return full if full is not None else a @ b

    @property
    def left(self) -> Tensor:
        return self._factor(self.w1, self.w1_a, self.w1_b)

    @property
    def right(self) -> Tensor:
        return self._factor(self.w2, self.w2_a, self.w2_b)

    @property
    def shape(self) -> tuple[int, int]:
        (out1, in1), (out2, in2) = (self._factor_shape(1), self._factor_shape(2))
        return out1 * out2, in1 * in2

    def _factor_shape(self, which: int) -> tuple[int, int]:
        full, a, b = (getattr(self, f"w{which}{suffix}") for suffix in ("", "_a", "_b"))
        return tuple(full.shape) if full is not None else (a.shape[0], b.shape[1])

    @property
    def rank(self) -> int | None:
        """The rank LyCORIS divides alpha by: w2's pair if factored, else w1's; None if neither is."""
        if self.w2_b is not None:
            return self.w2_b.shape[0]
        return None if self.w1_b is None else self.w1_b.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b) if t is not None)

    def matrix(self) -> Tensor:
        exact = self.to(self.tensors()[0].device, torch.float32)
        return torch.kron(exact.left, exact.right)

    def apply(self, x: Tensor) -> Tensor:
        # kron(w1, w2) @ x without the Kronecker product: view the input as [in1, in2], apply w2 to the
        # inner axis and w1 to the outer one.
        left, right = self.left, self.right
        grouped = x.unflatten(-1, (left.shape[1], right.shape[1]))
        inner = F.linear(grouped, right)  # [..., in1, out2]
        outer = F.linear(inner.transpose(-1, -2), left)  # [..., out2, out1]
        return outer.transpose(-1, -2).flatten(-2)

    def to(self, device: torch.device, dtype: torch.dtype) -> Kronecker:
        return Kronecker(**{f.name: _cast(getattr(self, f.name), device, dtype) for f in dataclasses.fields(self)})

    def _with_left_rows(self, select) -> Kronecker:
        if self.w1 is not None:
            return dataclasses.replace(self, w1=select(self.w1))
        return dataclasses.replace(self, w1_a=select(self.w1_a))

    def rows(self, start: int, stop: int) -> Kronecker:
        # Rows of kron(w1, w2) come in blocks of out2 rows per row of w1: only whole blocks can be cut.
        block = self._factor_shape(2)[0]
        if start % block or stop % block:
            raise CheckpointError(f"LoKr: rows {start}:{stop} of a Kronecker product with {block}-row blocks "
                                  "cannot be cut exactly")
        return self._with_left_rows(lambda t: t[start // block: stop // block])

    def swap_row_halves(self) -> Kronecker:
        if self._factor_shape(1)[0] % 2:
            raise CheckpointError("LoKr: the row halves of a Kronecker product whose first factor has an odd "
                                  "number of rows cannot be swapped exactly")
        return self._with_left_rows(_swap_halves)

    def scaled(self, factor: float) -> Kronecker:
        return self._with_left_rows(lambda t: (t.float() * factor).to(t.dtype))


Delta = LowRank | Hadamard | Kronecker
