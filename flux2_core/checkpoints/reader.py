"""Open a safetensors file or a folder of them and read tensors one at a time.

The header (names, shapes, dtypes, offsets) is parsed here directly, so inspecting a 64 GB file reads a few
kilobytes. Tensor data is read with positioned reads into a fresh tensor rather than through a memory map:
pages of a mapped file count towards the process's resident memory, so a mapped load would show the file
twice (mapped pages + the model) while plain reads leave those pages in the kernel's page cache only.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError

# safetensors dtype codes -> torch dtypes (the codes a FLUX.2 file or its neighbours can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}

# A real header is at most a few MB (dev has 299 tensors); anything far larger means the first 8 bytes are
# not a safetensors length.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# Index files diffusers and transformers write next to sharded weights, in the order we prefer them.
_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_SINGLE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# The first bytes of a GGUF file (llama.cpp's format, which ComfyUI-GGUF's quantized DiTs use).
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class CheckpointSource:
    """The tensors of one checkpoint (one file or a sharded folder), readable one by one."""

    def __init__(self, path: Path, entries: dict[str, TensorEntry], metadata: dict[str, str], files: list[Path]):
        self.path = path
        self.metadata = metadata
        self.files = files
        self._entries = entries
        self._handles: dict[Path, int] = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: expected a tensor named {name!r}, found no such tensor") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entry(name).dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in self._entries.items()}

    @property
    def file_size(self) -> int:
        """Bytes on disk over all files of the checkpoint."""
        return sum(f.stat().st_size for f in self.files)

    def read_bytes(self, name: str) -> torch.Tensor:
        """The stored bytes of one tensor as a flat uint8 CPU tensor; nothing else of the file is touched."""
        entry = self.entry(name)
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        _read_exactly(self._handle(entry.file), raw, entry.start, name, entry.file)
        return raw

    def get(self, name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from disk, then move/cast it."""
        entry = self.entry(name)
        tensor = self.read_bytes(name).view(entry.dtype).reshape(entry.shape)
        if device is not None or dtype is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        return tensor

    def _handle(self, file: Path) -> int:
        if file not in self._handles:
            self._handles[file] = os.open(file, os.O_RDONLY)
        return self._handles[file]

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointSource({str(self.path)!r}, {len(self._entries)} tensors)"


def _read_exactly(fd: int, out: torch.Tensor, offset: int, name: str, file: Path) -> None:
    # One read syscall returns at most ~2 GB on Linux, so large tensors take several.
    view = memoryview(out.numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"{file}: tensor {name!r} needs {len(view)} bytes at offset {offset}, found only "
                                  f"{done} (the file changed or was truncated while reading)")
        done += got


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Open a `.safetensors` or `.gguf` file, a folder holding one safetensors model, or a sharded folder with an
    index json."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: expected a .safetensors file or a model folder, found nothing at that path")
    if path.is_file() and _starts_with(path, GGUF_MAGIC):
        from .gguf import open_gguf  # deferred: only GGUF files pay for importing the gguf package

        return open_gguf(path)
    files = [path] if path.is_file() else _files_of_folder(path)
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for file in files:
        file_entries, file_metadata = read_header(file)
        for name, entry in file_entries.items():
            if name in entries:
                raise CheckpointError(f"{path}: tensor {name!r} appears in both {entries[name].file.name} and "
                                      f"{file.name}; expected each tensor in exactly one shard")
            entries[name] = entry
        for key, value in file_metadata.items():
            metadata.setdefault(key, value)
    return CheckpointSource(path, entries, metadata, files)


def _starts_with(file: Path, magic: bytes) -> bool:
    with open(file, "rb") as f:
        return f.read(len(magic)) == magic


def _files_of_folder(folder: Path) -> list[Path]:
    if (folder / "model_index.json").exists():
        raise CheckpointError(f"{folder}: this is a diffusers pipeline folder (model_index.json); expected one "
                              f"component, e.g. {folder / 'transformer'} or {folder / 'vae'}")
    for index_name in _INDEX_NAMES:
        index = folder / index_name
        if index.exists():
            return _files_of_index(index)
    for single_name in _SINGLE_NAMES:
        if (folder / single_name).is_file():
            return [folder / single_name]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(f"{folder}: expected .safetensors weights (or a *.safetensors.index.json) in this "
                              f"folder, found {found or 'an empty folder'}")
    # Shards without an index (model-00001-of-00002.safetensors, ...) are read together.
    return files


def _files_of_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map', found unreadable content ({e})") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: the index lists shard files that are missing: {missing}")
    return files


def read_header(file: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header: 8-byte little-endian length, then that many bytes of JSON."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: expected a safetensors file, found only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            first_header_byte = f.read(1)
            if header_len <= _MAX_HEADER_BYTES and first_header_byte == b"{":
                raise CheckpointError(f"{file}: truncated safetensors file: the header alone needs {8 + header_len} "
                                      f"bytes, found {size} on disk (incomplete download?)")
            f.seek(0)
            raise CheckpointError(f"{file}: expected a safetensors file, found {_describe_foreign_file(f.read(64))}")
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: expected a safetensors file, found {_describe_foreign_file(head + header_bytes)}") from None

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(file, name, info, data_start)
    data_end = max((e.end for e in entries.values()), default=data_start)
    if data_end > size:
        raise CheckpointError(f"{file}: truncated safetensors file: the header describes {data_end} bytes, found "
                              f"{size} on disk (incomplete download?)")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _entry(file: Path, name: str, info: object, data_start: int) -> TensorEntry:
    try:
        code, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: header entry {name!r} should have dtype, shape and data_offsets, found {info!r}") from None
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {code}; expected one of {sorted(SAFETENSORS_DTYPES)}")
    dtype = SAFETENSORS_DTYPES[code]
    numel = 1
    for n in shape:
        numel *= n
    if end - begin != numel * dtype.itemsize or begin < 0:
        raise CheckpointError(f"{file}: tensor {name!r} of shape {list(shape)} {code} needs {numel * dtype.itemsize} "
                              f"bytes, its header entry spans {end - begin}; the file is corrupt")
    return TensorEntry(file, dtype, shape, data_start + begin, data_start + end)


def _describe_foreign_file(head: bytes) -> str:
    """Name the common non-safetensors formats users download, from their first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip/pickle checkpoint (.pt/.ckpt/.bin); convert it to .safetensors first"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (old .ckpt/.bin format); convert it to .safetensors first"
    if head.startswith(GGUF_MAGIC):
        return "a GGUF file; open it with open_checkpoint (which reads GGUF) rather than as safetensors"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the real file was not downloaded)"
    # Random or binary bytes start with '<' or '{' often enough: a text format is named only for text.
    first = head.lstrip()[:1]
    if first in (b"{", b"[") and _looks_like_text(head):
        return "a JSON/text file"
    if first == b"<" and _looks_like_text(head):
        return "an HTML/XML page (a failed download?)"
    return f"bytes that are not a safetensors header (starting {head[:8].hex()})"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # the read may have cut a multi-byte character at its end
        if error.start < len(head) - 3:
            return False
        text = head[:error.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\r\n" for ch in text)
