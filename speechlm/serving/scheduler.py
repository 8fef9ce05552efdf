"""The batching scheduler: a bounded queue of requests and one worker thread that owns the model.

The worker takes the first waiting request, waits up to ``max_wait_ms`` for more (up to ``max_batch``), and
hands the batch to the engine, whose decode loop runs them together; each request's text pieces come back to
its asyncio task as they are decoded (``loop.call_soon_threadsafe``). A full queue refuses at once
(:class:`QueueFull` -> 429 with Retry-After): a request is either queued and answered, or refused, never lost.
Other model work (a streaming session's steps) goes through :meth:`Scheduler.call`, run by the same thread
between batches, so exactly one thread ever touches the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("speechlm.serving")


class QueueFull(Exception):
    """The waiting queue is full: answer 429."""


class Job:
    """One request on its way through the worker: events go to ``events`` on the request's event loop:
    ``("piece", text)``, then ``("done", payload)`` or ``("error", exception)``."""

    def __init__(self, request: Any, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrived = time.perf_counter()
        self.started: float | None = None  # when the worker took it

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down): nobody waits for it
            pass


class Engine(Protocol):
    def run_batch(self, jobs: list[Job]) -> None: ...


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_wait_ms: float = 10.0, queue_size: int = 32):
        self.engine = engine
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_ms / 1000.0, queue_size
        self._pending: deque[Job] = deque()
        self._tasks: deque[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # size of every batch run (for tests and the benchmark)
        self._thread = threading.Thread(target=self._run, name="speechlm-worker", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- callers (event loop)
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the queue holds {self.queue_size})")
            self._pending.append(job)
            self._cond.notify()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the worker thread (between batches) and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            self._tasks.append((fn, loop, fut))
            self._cond.notify()
        return await fut

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---------------------------------------------------------------------------- the worker thread
    def _next(self) -> tuple[str, Any] | None:
        with self._cond:
            while not self._pending and not self._tasks and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            if self._tasks:
                return "task", self._tasks.popleft()
            deadline = time.monotonic() + self.max_wait_s
            while len(self._pending) < self.max_batch and not self._tasks and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            return "batch", batch

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                break
            kind, value = item
            if kind == "task":
                fn, loop, fut = value
                try:
                    result, error = fn(), None
                except Exception as e:  # noqa: BLE001 -- handed to the caller
                    result, error = None, e
                _resolve(loop, fut, result, error)
                continue
            jobs = [j for j in value if not j.cancelled.is_set()]
            if not jobs:
                continue
            now = time.perf_counter()
            for j in jobs:
                j.started = now
            self.batches.append(len(jobs))
            try:
                self.engine.run_batch(jobs)
            except Exception as e:
                log.exception("batch of %d failed", len(jobs))
                for j in jobs:
                    j.put("error", e)
        with self._cond:  # refuse what is left
            for j in self._pending:
                j.put("error", QueueFull("the server is shutting down"))
            self._pending.clear()
            for _, loop, fut in self._tasks:
                _resolve(loop, fut, None, QueueFull("the server is shutting down"))
            self._tasks.clear()


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
