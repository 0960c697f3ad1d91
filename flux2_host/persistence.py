"""The queue, the history and the job records on disk: one SQLite database (WAL) under `user/`, so a restart,
clean or kill -9, loses nothing that was accepted.

Each prompt is one row through its life: `pending` when accepted, `running` while the worker has it,
`done` with its history record when finished. At start the rows come back: pending prompts are queued again
in their old order, a prompt that was `running` when the process died is queued again or recorded as
failed (`--on-restart`), and history answers as before.

Only `PromptQueue` calls this, under its own lock, so one connection serves every thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass

from .json_api import dumps

DATABASE_NAME = "flux2_queue.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY,
    number REAL NOT NULL,
    arrival INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    record TEXT,
    finished INTEGER
);
CREATE INDEX IF NOT EXISTS prompts_by_state ON prompts (state, finished);
CREATE TABLE IF NOT EXISTS saved_files (
    prompt_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    subfolder TEXT NOT NULL,
    filename TEXT NOT NULL,
    PRIMARY KEY (prompt_id, node_id, position)
);
"""
RESTART_POLICIES = ("requeue", "fail")


@dataclass
class StoredPrompt:
    prompt_id: str
    number: float
    arrival: int
    prompt: dict
    extra_data: dict
    outputs: list[str]


class PromptStore:
    """The prompts table of one database file."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()  # the queue holds its own lock; this one keeps the store safe alone too
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a committed transaction survives the process being killed (only an OS crash may lose the
        # last one), at a fraction of FULL's fsyncs.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, parameters=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    # -- reading back at start --

    def next_arrival(self) -> int:
        return self._run("SELECT COALESCE(MAX(arrival), -1) + 1 FROM prompts")[0][0]

    def prompts_in(self, state: str) -> list[StoredPrompt]:
        rows = self._run("SELECT prompt_id, number, arrival, prompt, extra_data, outputs FROM prompts "
                         "WHERE state = ? ORDER BY arrival", (state,))
        return [StoredPrompt(prompt_id, number, arrival, json.loads(prompt), json.loads(extra_data),
                             json.loads(outputs)) for prompt_id, number, arrival, prompt, extra_data, outputs in rows]

    def history(self) -> list[tuple[str, dict]]:
        rows = self._run("SELECT prompt_id, record FROM prompts WHERE state = 'done' ORDER BY finished")
        return [(prompt_id, json.loads(record)) for prompt_id, record in rows]

    # -- writing as the queue changes --

    def add(self, prompt: StoredPrompt) -> None:
        self._run("INSERT INTO prompts (prompt_id, number, arrival, prompt, extra_data, outputs, state) "
                  "VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                  (prompt.prompt_id, prompt.number, prompt.arrival, dumps(prompt.prompt),
                   dumps(prompt.extra_data), dumps(prompt.outputs)))

    def set_state(self, prompt_id: str, state: str) -> None:
        self._run("UPDATE prompts SET state = ? WHERE prompt_id = ?", (state, prompt_id))

    def finish(self, prompt_id: str, record: dict) -> None:
        # One transaction: once the record is in, the prompt never runs again and its file names are not needed.
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE prompts SET state = 'done', record = ?, finished = ? WHERE prompt_id = ?",
                             (dumps(record), time.time_ns(), prompt_id))
            self._db.execute("DELETE FROM saved_files WHERE prompt_id = ?", (prompt_id,))

    def delete(self, prompt_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM prompts WHERE prompt_id = ?", [(p,) for p in prompt_ids])
            self._db.executemany("DELETE FROM saved_files WHERE prompt_id = ?", [(p,) for p in prompt_ids])

    def delete_state(self, state: str) -> None:
        self._run("DELETE FROM prompts WHERE state = ?", (state,))
        self._run("DELETE FROM saved_files WHERE prompt_id NOT IN (SELECT prompt_id FROM prompts)")

    # -- file names chosen by a running prompt's save nodes (flux2_host.saved_outputs) --

    def saved_outputs(self, prompt_id: str) -> StoredSaves:
        return StoredSaves(self, prompt_id)


@dataclass
class StoredSaves:
    """`saved_outputs.SavedOutputs` for one prompt, in the store's saved_files table."""

    store: PromptStore
    prompt_id: str

    def recorded(self, node_id: str) -> dict[int, tuple[str, str]]:
        rows = self.store._run("SELECT position, subfolder, filename FROM saved_files WHERE prompt_id = ? AND "
                               "node_id = ?", (self.prompt_id, node_id))
        return {position: (subfolder, filename) for position, subfolder, filename in rows}

    def record(self, node_id: str, position: int, subfolder: str, filename: str) -> None:
        self.store._run("INSERT OR REPLACE INTO saved_files VALUES (?, ?, ?, ?, ?)",
                        (self.prompt_id, node_id, position, subfolder, filename))
