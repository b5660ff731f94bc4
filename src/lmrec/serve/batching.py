"""Dynamic batching: requests that arrive together share one forward pass.

Written here rather than taken from a serving library. LitServe (the maintained FastAPI-based option, with
``max_batch_size`` / ``batch_timeout``) runs the model in separate worker processes fed through queues;
this service mutates its catalog at run time (``POST /items`` must be recommendable by the very next
request) and answers item lookups, readiness and metadata from the same state, which a worker process's
private copy cannot give without a second channel. An asyncio queue in the server process is enough:
the event loop gathers requests, one thread runs the model; ``bench/bench_serve.py`` measures it against
one request per forward pass.

The first request of a batch waits at most ``max_wait_ms`` for company; a full batch (``max_batch``) goes at
once; while a batch runs, new requests queue and form the next one, so under load batches fill without
waiting at all. A lone client is not made to wait: when the previous batch was a single request, the next
one goes at once (measured: waiting 2 ms for nobody cost a single client 15 % of its throughput).
``max_batch=1`` turns batching off.

The queue is bounded (``max_queue`` requests waiting): a request that would overflow it is refused at once
(:class:`Overloaded`, the service's 503 with ``Retry-After``) rather than waiting without bound. A request
whose client stopped waiting (its deadline passed) is dropped before its batch runs. :meth:`stop` answers
everything queued before it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Overloaded(Exception):
    """The queue is full, or the batcher is stopping: try again later."""


class DynamicBatcher:
    def __init__(self, run: Callable[[list[Any]], list[Any]], *, max_batch: int = 32, max_wait_ms: float = 2.0,
                 max_queue: int = 1024):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be ≥ 1 and max_wait_ms ≥ 0")
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait_ms / 1000, max_queue
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = self.requests = self.refused = 0  # counters for /metadata and the benchmark
        self._last = 1  # size of the previous batch
        self.stopping = False
        self.running = False  # a batch is in the model

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, answer the queued ones (for at most ``timeout`` seconds), then end; whatever
        is still queued then gets :class:`Overloaded`."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.queue is not None and (self.queue.qsize() or self.running) and loop.time() < end:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        while self.queue is not None and not self.queue.empty():
            _, fut = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(Overloaded("the service is stopping"))

    def _admit(self, n: int) -> None:
        if self.stopping:
            raise Overloaded("the service is stopping")
        if self.queue.qsize() + n > self.max_queue:
            self.refused += n
            raise Overloaded(f"{self.queue.qsize()} requests queued (at most {self.max_queue})")

    async def submit(self, item: Any) -> Any:
        """The answer for one request, computed in a batch with whatever arrived alongside."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: list[Any]) -> list[Any]:
        """Answers for several requests, queued together (all or none: :class:`Overloaded` when they do not
        fit)."""
        self._admit(len(items))
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in items]
        for x, f in zip(items, futs):
            self.queue.put_nowait((x, f))
        try:
            return list(await asyncio.gather(*futs))
        except BaseException:  # a deadline or a gone client: the batch loop drops what is left
            for f in futs:
                f.cancel()
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + (self.max_wait if self._last > 1 else 0.0)
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(x, f) for x, f in batch if not f.cancelled()]  # clients that went away
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)
            self._last = len(batch)
            self.running = True
            try:
                results = await asyncio.to_thread(self.run, [x for x, _ in batch])
            except Exception as e:  # one failure answers the whole batch; the loop goes on
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                self.running = False
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)
