"""The file names a prompt's save nodes chose, recorded before the files are written, so that a prompt run
again writes the same files instead of new ones.

A prompt killed after its SaveImage wrote but before its result was recorded runs again after the restart
(`--on-restart requeue`). Without a record, its SaveImage would pick the next free counter and the image would
exist twice. With one, it writes the names it chose the first time (each through a temp file and a rename,
so the second write replaces the first whole file). Whoever runs prompts (the server's worker) installs the
prompt's record around the run; `flux2 run` installs none and names files as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Protocol


class SavedOutputs(Protocol):
    """The names one prompt's save nodes chose: (node id, position in the batch) -> (subfolder, file name)."""

    def recorded(self, node_id: str) -> dict[int, tuple[str, str]]: ...

    def record(self, node_id: str, position: int, subfolder: str, filename: str) -> None: ...


_current: contextvars.ContextVar[SavedOutputs | None] = contextvars.ContextVar("flux2_saved_outputs", default=None)


@contextlib.contextmanager
def recording(saved: SavedOutputs | None) -> Iterator[None]:
    """Make `saved` the record that save nodes use while the block runs (None: no record)."""
    token = _current.set(saved)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> SavedOutputs | None:
    return _current.get()
