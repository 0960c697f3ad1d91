"""The prompt queue in Redis, for several workers (`flux2 serve --queue redis://...` plus `flux2 worker`).

The API server puts prompts into Redis; each `flux2 worker` (one per GPU, on any machine) claims one with a
lease, renews the lease while it runs, and publishes the prompt's events on a pub/sub channel that every API
server relays to its WebSocket clients, so a client sees progress as with the embedded queue. A worker that
dies stops renewing: its lease runs out and the next claim, by any worker, queues the prompt again. A finish
is accepted only from the lease holder, so no prompt is recorded twice.

Keys, under a prefix (default `flux2:`):
  queue    sorted set: pending prompt ids by queue number
  leases   sorted set: running prompt ids by lease expiry (Redis server time, seconds)
  history  list: finished prompt ids, oldest first
  job:ID   hash: number, prompt, extra_data, outputs (JSON), state, worker, record (JSON, once finished)
  events   channel: {"sid", "event", "data"} or {"sid", "preview", "metadata"} from workers
  control  channel: {"interrupt": prompt_id} / {"free": unload_models} from API servers

Every step that reads and writes several keys is one Lua script, so two workers never claim one prompt.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import uuid
from typing import Callable, Iterator

import redis

from .json_api import dumps
from .prompt_queue import MAX_HISTORY, QueueItem

log = logging.getLogger("flux2.server")

DEFAULT_LEASE_S = 10.0
POLL_S = 0.1  # how often an idle worker looks for work

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6 "

# KEYS: queue, leases. ARGV: prefix, worker id, lease seconds. Requeues expired leases first, then claims.
CLAIM = _NOW + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], id)
  local job = ARGV[1] .. 'job:' .. id
  if redis.call('EXISTS', job) == 1 then
    redis.call('HSET', job, 'state', 'pending', 'worker', '')
    redis.call('ZADD', KEYS[1], redis.call('HGET', job, 'number'), id)
  end
end
local popped = redis.call('ZPOPMIN', KEYS[1])
if #popped == 0 then return false end
local id = popped[1]
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), id)
redis.call('HSET', ARGV[1] .. 'job:' .. id, 'state', 'running', 'worker', ARGV[2])
return id
"""

# KEYS: leases. ARGV: prefix, worker id, lease seconds, prompt id. 1 while this worker still holds the lease.
RENEW = _NOW + """
if redis.call('HGET', ARGV[1] .. 'job:' .. ARGV[4], 'worker') ~= ARGV[2] then return 0 end
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[4])
return 1
"""

# KEYS: leases, history. ARGV: prefix, worker id, prompt id, record, max history. 0 if the lease was lost.
FINISH = """
local job = ARGV[1] .. 'job:' .. ARGV[3]
if redis.call('HGET', job, 'worker') ~= ARGV[2] or not redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[3])
redis.call('HSET', job, 'state', 'done', 'record', ARGV[4])
redis.call('RPUSH', KEYS[2], ARGV[3])
while redis.call('LLEN', KEYS[2]) > tonumber(ARGV[5]) do
  redis.call('DEL', ARGV[1] .. 'job:' .. redis.call('LPOP', KEYS[2]))
end
return 1
"""

# KEYS: leases, queue. ARGV: prefix, worker id, prompt id. Hands a prompt back (the worker is stopping).
RELEASE = """
local job = ARGV[1] .. 'job:' .. ARGV[3]
if redis.call('HGET', job, 'worker') ~= ARGV[2] or not redis.call('ZREM', KEYS[1], ARGV[3]) then return 0 end
redis.call('HSET', job, 'state', 'pending', 'worker', '')
redis.call('ZADD', KEYS[2], redis.call('HGET', job, 'number'), ARGV[3])
return 1
"""

# KEYS: queue. ARGV: prefix, prompt id, number, prompt, extra_data, outputs. 0 if the id is known already.
PUT = """
local job = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('EXISTS', job) == 1 then return 0 end
redis.call('HSET', job, 'number', ARGV[3], 'prompt', ARGV[4], 'extra_data', ARGV[5], 'outputs', ARGV[6],
           'state', 'pending', 'worker', '')
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""

# KEYS: queue. ARGV: prefix, prompt ids... Removes those still pending; returns them.
DELETE_PENDING = """
local removed = {}
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('DEL', ARGV[1] .. 'job:' .. ARGV[i])
    table.insert(removed, ARGV[i])
  end
end
return removed
"""


class RedisKeys:
    """One connection and the key names and scripts shared by API servers and workers."""

    def __init__(self, url: str, prefix: str = "flux2:") -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.client.ping()  # a wrong URL fails at start, not at the first prompt
        self.prefix = prefix
        self.queue, self.leases, self.history = prefix + "queue", prefix + "leases", prefix + "history"
        self.events, self.control = prefix + "events", prefix + "control"
        self.scripts = {name: self.client.register_script(source) for name, source in (
            ("claim", CLAIM), ("renew", RENEW), ("finish", FINISH), ("release", RELEASE), ("put", PUT),
            ("delete_pending", DELETE_PENDING))}

    def job(self, prompt_id: str) -> str:
        return f"{self.prefix}job:{prompt_id}"

    def saved(self, prompt_id: str) -> str:
        return f"{self.prefix}saved:{prompt_id}"

    def item(self, prompt_id: str) -> QueueItem | None:
        fields = self.client.hmget(self.job(prompt_id), "number", "prompt", "extra_data", "outputs")
        if fields[0] is None:
            return None
        return QueueItem(float(fields[0]), prompt_id, json.loads(fields[1]), json.loads(fields[2]),
                         json.loads(fields[3]))

    def queue_remaining(self) -> int:
        with self.client.pipeline() as pipe:
            return sum(pipe.zcard(self.queue).zcard(self.leases).execute())

    def publish(self, channel: str, message: dict) -> None:
        self.client.publish(channel, dumps(message))

    def channel_messages(self, channel: str, stopping: threading.Event) -> Iterator[bytes]:
        """The payloads published on `channel` until `stopping` is set (checked at least twice a second)."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(channel)
        try:
            while not stopping.is_set():
                message = pubsub.get_message(timeout=0.5)
                if message is not None:
                    yield message["data"]
        finally:
            pubsub.close()


def connect_redis(url: str, command: str) -> RedisKeys | None:
    """The keys at `url`; None, with the reason on stderr, when the URL is wrong or nothing answers there."""
    try:
        return RedisKeys(url)
    except (ValueError, redis.RedisError) as exc:
        print(f"flux2 {command}: --queue {url}: expected a reachable redis://HOST:PORT/DB, found: {exc}",
              file=sys.stderr)
        return None


# --- the API server's side ----------------------------------------------------------------------------------


class RedisQueue:
    """What `Flux2Server` uses as its queue when prompts go to Redis (the same methods as `PromptQueue`)."""

    def __init__(self, keys: RedisKeys, on_change: Callable[[int], None]) -> None:
        self.keys = keys
        self.client = keys.client
        self._on_change = on_change

    def _changed(self) -> None:
        self._on_change(self.keys.queue_remaining())

    def restore(self, on_restart: str) -> tuple[int, int]:
        # The queue lives in Redis and outlives this process; a prompt of a dead worker is requeued when its
        # lease runs out, whatever --on-restart says.
        return self.client.zcard(self.keys.queue), 0

    def queue_remaining(self) -> int:
        return self.keys.queue_remaining()

    def put_new(self, item: QueueItem) -> bool:
        added = self.keys.scripts["put"](keys=[self.keys.queue], args=[
            self.keys.prefix, item.prompt_id, item.number, dumps(item.prompt), dumps(item.extra_data),
            dumps(item.outputs)])
        if added:
            self._changed()
        return bool(added)

    def largest_number(self) -> float:
        top = self.client.zrevrange(self.keys.queue, 0, 0, withscores=True)
        numbers = [score for _, score in top] + [record["prompt"][0] for record in self.history().values()]
        return max(numbers, default=-1)

    def request_free(self, unload_models: bool) -> None:
        self.keys.publish(self.keys.control, {"free": unload_models})

    def interrupt_running(self, prompt_id: str | None, interrupt_local: Callable[[], None]) -> bool:
        running = [item.prompt_id for item in self._running_items()]
        targets = running if prompt_id is None else [p for p in running if p == prompt_id]
        for target in targets:
            self.keys.publish(self.keys.control, {"interrupt": target})
        return bool(targets)

    def _items(self, prompt_ids: list[bytes]) -> list[QueueItem]:
        items = (self.keys.item(prompt_id.decode()) for prompt_id in prompt_ids)
        return [item for item in items if item is not None]

    def _running_items(self) -> list[QueueItem]:
        return self._items(self.client.zrange(self.keys.leases, 0, -1))

    def snapshot(self) -> tuple[list[QueueItem], list[QueueItem], dict[str, dict]]:
        return self._running_items(), self._items(self.client.zrange(self.keys.queue, 0, -1)), self.history()

    def delete_pending(self, prompt_ids: set[str]) -> list[str]:
        removed = [p.decode() for p in self.keys.scripts["delete_pending"](
            keys=[self.keys.queue], args=[self.keys.prefix, *prompt_ids])] if prompt_ids else []
        if removed:
            self._changed()
        return removed

    def clear_pending(self) -> None:
        self.delete_pending({p.decode() for p in self.client.zrange(self.keys.queue, 0, -1)})

    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, dict]:
        ids = [p.decode() for p in self.client.lrange(self.keys.history, 0, -1)]
        if offset is None:
            offset = max(0, len(ids) - max_items) if max_items is not None else 0
        chosen = ids[offset:] if max_items is None else ids[offset:offset + max_items]
        with self.client.pipeline() as pipe:
            for prompt_id in chosen:
                pipe.hget(self.keys.job(prompt_id), "record")
            records = pipe.execute()
        return {p: json.loads(r) for p, r in zip(chosen, records) if r is not None}

    def history_item(self, prompt_id: str) -> dict | None:
        if self.client.hget(self.keys.job(prompt_id), "state") != b"done":
            return None
        return json.loads(self.client.hget(self.keys.job(prompt_id), "record"))

    def delete_history(self, prompt_ids: set[str]) -> None:
        for prompt_id in prompt_ids:
            if self.client.lrem(self.keys.history, 0, prompt_id):
                self.client.delete(self.keys.job(prompt_id))

    def clear_history(self) -> None:
        self.delete_history({p.decode() for p in self.client.lrange(self.keys.history, 0, -1)})


class RedisEventRelay:
    """The API server's thread that hands the workers' published events to its WebSocket clients (it takes
    the place of the embedded worker thread: `start` / `stop`)."""

    def __init__(self, keys: RedisKeys, hub) -> None:
        self.keys = keys
        self.hub = hub
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flux2-redis-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        for data in self.keys.channel_messages(self.keys.events, self._stopping):
            try:
                event = json.loads(data)
                if "preview" in event:
                    self.hub.send_preview(base64.b64decode(event["preview"]), event["metadata"], event["sid"])
                else:
                    self.hub.send(event["event"], event["data"], event["sid"])
            except (ValueError, KeyError, TypeError) as exc:  # a foreign publisher must not stop the relay
                log.warning("ignored an unreadable event on %s: %s", self.keys.events, exc)


# --- a worker's side ----------------------------------------------------------------------------------------


class RedisEventPublisher:
    """What `PromptWorker` sends events through on a worker: the API servers' relays pick them up."""

    def __init__(self, keys: RedisKeys) -> None:
        self.keys = keys

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        self.keys.publish(self.keys.events, {"sid": sid, "event": event, "data": data})

    def send_preview(self, jpeg: bytes, metadata: dict, sid: str | None) -> None:
        self.keys.publish(self.keys.events, {"sid": sid, "preview": base64.b64encode(jpeg).decode(),
                                             "metadata": metadata})


class RedisSavedOutputs:
    """`saved_outputs.SavedOutputs` for one prompt: a hash of "node/position" -> [subfolder, file name]."""

    # Dropped when the prompt is recorded; the expiry only clears after prompts deleted while they ran.
    EXPIRE_S = 7 * 24 * 3600

    def __init__(self, keys: RedisKeys, prompt_id: str) -> None:
        self.client, self.key = keys.client, keys.saved(prompt_id)

    def recorded(self, node_id: str) -> dict[int, tuple[str, str]]:
        names = {}
        for field, value in self.client.hgetall(self.key).items():
            node, _, position = field.decode().rpartition("/")
            if node == node_id:
                subfolder, filename = json.loads(value)
                names[int(position)] = (subfolder, filename)
        return names

    def record(self, node_id: str, position: int, subfolder: str, filename: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.hset(self.key, f"{node_id}/{position}", dumps([subfolder, filename]))
            pipe.expire(self.key, self.EXPIRE_S)
            pipe.execute()


class RedisWorkQueue:
    """What `PromptWorker` takes prompts from on a worker: claims with a lease, renewed by a heartbeat thread
    while the prompt runs; interrupt and free requests arrive on the control channel."""

    def __init__(self, keys: RedisKeys, executor, publisher: RedisEventPublisher, lease_s: float = DEFAULT_LEASE_S,
                 worker_id: str | None = None) -> None:
        self.keys = keys
        self.executor = executor
        self.publisher = publisher
        self.lease_s = lease_s
        self.worker_id = worker_id or uuid.uuid4().hex
        self._lock = threading.Lock()
        self._running: QueueItem | None = None
        self._free_request: bool | None = None
        self._stopping = threading.Event()
        threading.Thread(target=self._heartbeat, name="flux2-lease-heartbeat", daemon=True).start()
        threading.Thread(target=self._listen, name="flux2-control", daemon=True).start()

    def _status(self) -> None:
        remaining = self.keys.queue_remaining()
        self.publisher.send("status", {"status": {"exec_info": {"queue_remaining": remaining}}})

    def wait_for_work(self) -> tuple[QueueItem | None, bool | None]:
        while not self._stopping.is_set():
            with self._lock:
                free_request, self._free_request = self._free_request, None
            claimed = self.keys.scripts["claim"](keys=[self.keys.queue, self.keys.leases],
                                                 args=[self.keys.prefix, self.worker_id, self.lease_s])
            item = self.keys.item(claimed.decode()) if claimed else None
            if item is not None:
                with self._lock:
                    self._running = item
                log.info("worker %s claimed prompt %s", self.worker_id, item.prompt_id)
                self._status()
            if item is not None or free_request is not None:
                return item, free_request
            self._stopping.wait(POLL_S)
        return None, None

    def finish(self, item: QueueItem, record: dict) -> None:
        with self._lock:
            self._running = None
        accepted = self.keys.scripts["finish"](keys=[self.keys.leases, self.keys.history], args=[
            self.keys.prefix, self.worker_id, item.prompt_id, dumps(record), MAX_HISTORY])
        if accepted:
            self.keys.client.delete(self.keys.saved(item.prompt_id))  # recorded: the prompt never runs again
        else:
            log.warning("prompt %s finished after its lease ran out; another worker owns it now", item.prompt_id)
        self._status()

    def saved_outputs(self, prompt_id: str) -> RedisSavedOutputs:
        """Where the prompt's save nodes record the names they chose: a worker that takes the prompt over
        after this one died writes the same files (in the output folder the workers share)."""
        return RedisSavedOutputs(self.keys, prompt_id)

    def abandon(self, item: QueueItem) -> None:
        with self._lock:
            self._running = None
        self.keys.scripts["release"](keys=[self.keys.leases, self.keys.queue],
                                     args=[self.keys.prefix, self.worker_id, item.prompt_id])

    def running(self) -> QueueItem | None:
        with self._lock:
            return self._running

    def stop(self) -> None:
        self._stopping.set()

    def stopped(self) -> bool:
        return self._stopping.is_set()

    def _heartbeat(self) -> None:
        while not self._stopping.wait(self.lease_s / 3):
            running = self.running()
            if running is not None:
                self.keys.scripts["renew"](keys=[self.keys.leases],
                                           args=[self.keys.prefix, self.worker_id, self.lease_s, running.prompt_id])

    def _listen(self) -> None:
        for data in self.keys.channel_messages(self.keys.control, self._stopping):
            try:
                request = json.loads(data)
            except ValueError:
                continue
            running = self.running()
            if "interrupt" in request and running is not None and running.prompt_id == request["interrupt"]:
                self.executor.interrupt()
            if "free" in request:
                with self._lock:
                    self._free_request = bool(self._free_request) or bool(request["free"])

