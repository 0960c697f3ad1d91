"""The prompt queue and history (shared by the event loop and the worker thread), and the worker thread
that runs prompts in queue order and writes their history."""

from __future__ import annotations

import heapq
import io
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .client_hub import ClientHub
from . import saved_outputs
from .persistence import RESTART_POLICIES, PromptStore, StoredPrompt

log = logging.getLogger("flux2.server")

MAX_HISTORY = 10000
PREVIEW_MAX_SIZE = 512


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    def as_list(self) -> list:
        """The 5-list ComfyUI uses in /queue and in history: [number, prompt_id, prompt, extra_data, outputs]."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class PromptQueue:
    """Pending prompts (ordered by number, then arrival), the running one, and the history.

    Shared by the event loop and the worker thread; every method takes the lock. `on_change` gets the new
    queue_remaining after each change, still under the lock so clients see the counts in order (it must
    only hand the number on, never block). With a `store`, every change is written through to it before
    the method returns, and `restore` brings its contents back after a restart.
    """

    def __init__(self, on_change: Callable[[int], None], store: PromptStore | None = None) -> None:
        self._lock = threading.Condition()
        self._store = store
        self._pending: list[tuple[float, int, QueueItem]] = []
        self._arrivals = itertools.count(store.next_arrival() if store else 0)
        self._running: QueueItem | None = None
        self._history: dict[str, dict] = {}
        self._free_request: bool | None = None  # unload_models flag of a pending /free, None if none
        self._stopped = False
        self._on_change = on_change

    def _changed(self) -> None:
        self._on_change(len(self._pending) + (self._running is not None))

    def restore(self, on_restart: str) -> tuple[int, int]:
        """Load the store's history and pending prompts; a prompt that was running when the server stopped
        is queued again (`requeue`) or recorded as failed (`fail`). Returns (pending, interrupted) counts."""
        if on_restart not in RESTART_POLICIES:
            raise ValueError(f"on_restart: expected one of {RESTART_POLICIES}, found {on_restart!r}")
        with self._lock:
            for prompt_id, record in self._store.history()[-MAX_HISTORY:]:
                self._history[prompt_id] = record
            interrupted = self._store.prompts_in("running")
            for stored in interrupted:
                item = QueueItem(stored.number, stored.prompt_id, stored.prompt, stored.extra_data, stored.outputs)
                if on_restart == "requeue":
                    self._store.set_state(stored.prompt_id, "pending")
                else:
                    self._history[stored.prompt_id] = stopped_record(item)
                    self._store.finish(stored.prompt_id, self._history[stored.prompt_id])
            for stored in self._store.prompts_in("pending"):
                item = QueueItem(stored.number, stored.prompt_id, stored.prompt, stored.extra_data, stored.outputs)
                heapq.heappush(self._pending, (item.number, stored.arrival, item))
            self._lock.notify_all()
            return len(self._pending), len(interrupted)

    def queue_remaining(self) -> int:
        """Pending plus running, as ComfyUI counts it (simple clients stop waiting at 0)."""
        with self._lock:
            return len(self._pending) + (self._running is not None)

    def largest_number(self) -> float:
        """The largest queue number pending or in history (-1 when none): new numbers continue after it."""
        with self._lock:
            numbers = [entry[0] for entry in self._pending] + [r["prompt"][0] for r in self._history.values()]
            return max(numbers, default=-1)

    def put_new(self, item: QueueItem) -> bool:
        """Queue the prompt unless its id is already pending, running or in history (a client-chosen
        prompt_id must not overwrite another prompt's record); False when refused."""
        with self._lock:
            if (item.prompt_id in self._history or (self._running and self._running.prompt_id == item.prompt_id)
                    or any(entry[2].prompt_id == item.prompt_id for entry in self._pending)):
                return False
            arrival = next(self._arrivals)
            if self._store is not None:
                self._store.add(StoredPrompt(item.prompt_id, item.number, arrival, item.prompt, item.extra_data,
                                             item.outputs))
            heapq.heappush(self._pending, (item.number, arrival, item))
            self._lock.notify_all()
            self._changed()
            return True

    def request_free(self, unload_models: bool) -> None:
        with self._lock:
            self._free_request = bool(self._free_request) or unload_models
            self._lock.notify_all()

    def stop(self) -> None:
        """Wake the worker and let it return: `wait_for_work` answers (None, None) from now on."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def wait_for_work(self) -> tuple[QueueItem | None, bool | None]:
        """Block until there is a prompt to run or memory to free; the prompt becomes the running one.
        (None, None) once the queue is stopped."""
        with self._lock:
            while not self._pending and self._free_request is None and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None, None
            free_request, self._free_request = self._free_request, None
            item = None
            if self._pending:
                item = heapq.heappop(self._pending)[2]
                self._running = item
                if self._store is not None:
                    self._store.set_state(item.prompt_id, "running")
                self._changed()
        return item, free_request

    def finish(self, item: QueueItem, record: dict) -> None:
        """Move the running prompt into history (dropping the oldest entry past MAX_HISTORY)."""
        with self._lock:
            self._running = None
            self._history[item.prompt_id] = record
            dropped = [self._history.pop(next(iter(self._history)))
                       for _ in range(len(self._history) - MAX_HISTORY)]
            if self._store is not None:
                self._store.finish(item.prompt_id, record)
                self._store.delete([entry["prompt"][1] for entry in dropped])
            self._changed()

    def abandon(self, item: QueueItem) -> None:
        """The running prompt was cut short by shutdown: no history now; the store keeps it as running, so
        the next start queues it again or records it as failed (`restore`)."""
        with self._lock:
            self._running = None
            self._changed()

    def saved_outputs(self, prompt_id: str) -> saved_outputs.SavedOutputs | None:
        """Where the prompt's save nodes record the names they chose (None without a store: nothing runs
        twice then)."""
        return self._store.saved_outputs(prompt_id) if self._store is not None else None

    def running(self) -> QueueItem | None:
        with self._lock:
            return self._running

    def interrupt_running(self, prompt_id: str | None, interrupt: Callable[[], None]) -> bool:
        """Call `interrupt` if a prompt runs (and it is `prompt_id`, when one is named); whether it did."""
        with self._lock:
            if self._running is None or (prompt_id is not None and self._running.prompt_id != prompt_id):
                return False
            interrupt()
            return True

    def snapshot(self) -> tuple[list[QueueItem], list[QueueItem], dict[str, dict]]:
        """(running, pending in run order, history) at one instant, so no prompt shows twice or not at all."""
        with self._lock:
            running = [self._running] if self._running else []
            return running, [entry[2] for entry in sorted(self._pending)], dict(self._history)

    def delete_pending(self, prompt_ids: set[str]) -> list[str]:
        with self._lock:
            removed = [entry[2].prompt_id for entry in self._pending if entry[2].prompt_id in prompt_ids]
            self._pending = [entry for entry in self._pending if entry[2].prompt_id not in prompt_ids]
            heapq.heapify(self._pending)
            if removed:
                if self._store is not None:
                    self._store.delete(removed)
                self._changed()
        return removed

    def clear_pending(self) -> None:
        with self._lock:
            self._pending.clear()
            if self._store is not None:
                self._store.delete_state("pending")
            self._changed()

    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, dict]:
        """History oldest first. By default the newest `max_items`; `offset` counts from the oldest."""
        with self._lock:
            ids = list(self._history)
            if offset is None:
                offset = max(0, len(ids) - max_items) if max_items is not None else 0
            chosen = ids[offset:] if max_items is None else ids[offset:offset + max_items]
            return {prompt_id: self._history[prompt_id] for prompt_id in chosen}

    def history_item(self, prompt_id: str) -> dict | None:
        with self._lock:
            return self._history.get(prompt_id)

    def delete_history(self, prompt_ids: set[str]) -> None:
        with self._lock:
            removed = [prompt_id for prompt_id in prompt_ids if self._history.pop(prompt_id, None) is not None]
            if self._store is not None:
                self._store.delete(removed)

    def clear_history(self) -> None:
        with self._lock:
            self._history.clear()
            if self._store is not None:
                self._store.delete_state("done")

    def stopped(self) -> bool:
        with self._lock:
            return self._stopped


def history_record(item: QueueItem, status: str, outputs: dict, messages: list) -> dict:
    """One /history entry. `status` is the executor's: success, error or interrupted."""
    return {
        "prompt": item.as_list(),
        "outputs": outputs,
        "status": {
            "status_str": "success" if status == "success" else "error",
            "completed": status == "success",
            "messages": [[event, data] for event, data in messages],
        },
        "meta": {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None,
                           "real_node_id": node_id} for node_id in outputs},
    }


def failure_outside_nodes(item: QueueItem, exception_type: str, message: str) -> tuple[dict, dict]:
    """(execution_error data, history record) of a prompt that failed outside any node."""
    error = {"prompt_id": item.prompt_id, "node_id": "", "node_type": "", "executed": [],
             "exception_message": message, "exception_type": exception_type,
             "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": int(time.time() * 1000)}
    return error, history_record(item, "error", {}, [("execution_error", error)])


def stopped_record(item: QueueItem) -> dict:
    """The history of a prompt that was running when the server stopped, recorded as failed after restart."""
    return failure_outside_nodes(item, "ServerStopped", "the server stopped while this prompt ran")[1]


# --- the worker thread ----------------------------------------------------------------------------


class _ClientListener:
    """What the executor talks to while one prompt runs: events go to the submitting client.

    A prompt queued without client_id has its events broadcast, as in ComfyUI, so API clients that
    connect a socket but post without client_id still see progress.
    """

    def __init__(self, hub: ClientHub, sid: str | None) -> None:
        self.hub = hub
        self.sid = sid

    def send(self, event: str, data: dict) -> None:
        self.hub.send(event, data, self.sid)

    def send_preview(self, node_id: str, prompt_id: str, image) -> None:
        # Called from inside the node's progress report: a preview that cannot be encoded is skipped,
        # it must not fail the node.
        try:
            image = image.convert("RGB")
            image.thumbnail((PREVIEW_MAX_SIZE, PREVIEW_MAX_SIZE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
        except Exception as exc:
            log.warning("preview of node %s skipped: %s", node_id, exc)
            return
        metadata = {"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                    "parent_node_id": None, "real_node_id": node_id}
        self.hub.send_preview(buffer.getvalue(), metadata, self.sid)


class PromptWorker:
    """The one thread that runs prompts, in queue order, and writes their history."""

    def __init__(self, queue: PromptQueue, executor, hub: ClientHub) -> None:
        self.queue = queue
        self.executor = executor
        self.hub = hub
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flux2-prompt-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Interrupt the running prompt, stop taking new ones and wait (up to `timeout`) for the thread."""
        self.queue.stop()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        # Asked again until the thread ends: a prompt starting just now clears an interrupt sent before it.
        while self._thread.is_alive() and time.monotonic() < deadline:
            if self.queue.running() is not None:
                self.executor.interrupt()
            self._thread.join(0.2)
        if self._thread.is_alive():
            log.warning("the running prompt did not stop within %s s of the interrupt", timeout)

    def _run(self) -> None:
        while True:
            item, free_request = self.queue.wait_for_work()
            if item is None and free_request is None:
                return
            if free_request is not None:
                self._free(unload_models=free_request)
            if item is not None:
                self._execute(item)

    def _free(self, unload_models: bool) -> None:
        try:
            self.executor.free_memory(unload_models)
        except Exception:
            log.exception("freeing memory failed")

    def _execute(self, item: QueueItem) -> None:
        """Run one prompt and write its history; the `executing {node: null}` end marker goes out after
        that, so a client that reads /history on it finds the prompt there."""
        listener = _ClientListener(self.hub, item.client_id)
        try:
            # A prompt killed after saving runs again after the restart: it then writes the names it chose.
            with saved_outputs.recording(self.queue.saved_outputs(item.prompt_id)):
                result = self.executor.execute(item.prompt, item.prompt_id, item.extra_data, item.outputs,
                                               listener, end_marker=False)
            if result.status == "interrupted" and self.queue.stopped():
                self.queue.abandon(item)  # stopped by shutdown, not by a user: restored at the next start
                return
            record = history_record(item, result.status, result.outputs, result.messages)
        except Exception as exc:  # an executor bug fails this prompt, never the server
            log.exception("prompt %s failed outside any node", item.prompt_id)
            error, record = failure_outside_nodes(item, type(exc).__name__, str(exc))
            listener.send("execution_error", error)
        self.queue.finish(item, record)
        self.hub.send("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)
