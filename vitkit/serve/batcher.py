"""Micro-batching: concurrent requests wait in an asyncio queue; one worker runs them together in a thread.

Requests carry a `kind` (e.g. "predict", or an explain configuration); the worker takes what is waiting, up to
`max_batch`, groups it by kind, and calls that kind's handler once per group in a worker thread, so the event
loop stays free and exactly one batch touches the model at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Any

Handler = Callable[[list[Any]], list[Any]]  # items -> one result per item, same order


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later."""


class Batcher:
    """An asyncio queue plus one worker task. Start it inside the running event loop (the app's lifespan)."""

    def __init__(self, handler_for: Callable[[Hashable], Handler], max_batch: int = 8, max_queue: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.handler_for = handler_for
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.batches_run = 0
        self.items_run = 0
        self.busy_seconds = 0.0

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.max_queue)
        self.worker = asyncio.create_task(self._work(), name="vitkit-batcher")

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
            self.worker = None

    @property
    def waiting(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, kind: Hashable, item: Any) -> Any:
        """Queue one item and wait for its result (or the exception its batch raised)."""
        if self.queue is None:
            raise RuntimeError("the batcher is not running (start it in the app's lifespan)")
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((kind, item, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry shortly") from None
        return await future

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            jobs = [await self.queue.get()]
            while len(jobs) < self.max_batch and not self.queue.empty():  # what arrived while the last batch ran
                jobs.append(self.queue.get_nowait())
            groups: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}
            for kind, item, future in jobs:
                if not future.cancelled():  # the client went away
                    groups.setdefault(kind, []).append((item, future))
            for kind, group in groups.items():
                await self._run_group(kind, group)

    async def _run_group(self, kind: Hashable, group: list[tuple[Any, asyncio.Future]]) -> None:
        t0 = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.handler_for(kind), [item for item, _ in group])
        except Exception as e:  # the batch failed: every request in it gets the error, the worker lives on
            for _, future in group:
                if not future.done():
                    future.set_exception(e)
            return
        finally:
            self.busy_seconds += time.perf_counter() - t0
        self.batches_run += 1
        self.items_run += len(group)
        for (_, future), result in zip(group, results):
            if not future.done():
                future.set_result(result)

    def stats(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "waiting": self.waiting,
            "batches_run": self.batches_run,
            "requests_run": self.items_run,
            "mean_batch": round(self.items_run / self.batches_run, 2) if self.batches_run else None,
        }
