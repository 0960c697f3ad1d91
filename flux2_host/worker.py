"""`flux2 worker`: runs prompts from a Redis queue that `flux2 serve --queue redis://...` fills.

Start one per GPU, on any machine that reaches the Redis server and shares the output folder with the API
server (so /view serves what the workers write). The worker is the embedded server's `PromptWorker` fed
from Redis: it claims a prompt with a lease, renews it while the prompt runs, publishes every event for the
API servers to relay, and records the history in Redis. SIGTERM or Ctrl-C interrupts the running prompt,
hands it back to the queue and exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading

from .prompt_queue import PromptWorker
from .server import SHUTDOWN_WAIT_S

log = logging.getLogger("flux2.server")


def worker_command(args) -> int:
    from .redis_queue import RedisEventPublisher, RedisWorkQueue, connect_redis
    from .run import build_registry, set_up_host

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not set_up_host(args, "worker"):
        return 2
    keys = connect_redis(args.queue, "worker")
    if keys is None:
        return 2
    from .executor import PromptExecutor

    registry = build_registry()
    executor = PromptExecutor(registry)
    publisher = RedisEventPublisher(keys)
    queue = RedisWorkQueue(keys, executor, publisher, lease_s=args.lease, worker_id=args.worker_id)
    worker = PromptWorker(queue, executor, publisher)

    stopping = threading.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: stopping.set())
    worker.start()
    print(f"flux2: worker {queue.worker_id} taking prompts from {args.queue}", flush=True)
    stopping.wait()
    log.info("worker %s stopping", queue.worker_id)
    worker.stop(SHUTDOWN_WAIT_S)
    return 0
