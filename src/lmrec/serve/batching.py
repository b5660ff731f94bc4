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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class DynamicBatcher:
    def __init__(self, run: Callable[[list[Any]], list[Any]], *, max_batch: int = 32, max_wait_ms: float = 2.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be ≥ 1 and max_wait_ms ≥ 0")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = self.requests = 0  # counters for /metadata and the benchmark
        self._last = 1  # size of the previous batch

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, item: Any) -> Any:
        """The answer for one request, computed in a batch with whatever arrived alongside."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def submit_many(self, items: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self.submit(x) for x in items)))

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
            try:
                results = await asyncio.to_thread(self.run, [x for x, _ in batch])
            except Exception as e:  # one failure answers the whole batch; the loop goes on
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)
