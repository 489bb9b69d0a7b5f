"""Background worker threads for compress-and-write, at low CPU priority.

anyio's own thread pool is shared with the rest of the program, so lowering a thread's
priority there would leak into unrelated work. These threads are ours: on Linux each lowers its
own priority to nice 19 once, so a CPU-bound training step keeps its cores while a save runs.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import anyio

__all__ = ["WorkerThreads", "runs", "BATCH_BYTES"]

T = TypeVar("T")


BATCH_BYTES = 1 << 20


def runs(sizes: Sequence[int], at_least: int = BATCH_BYTES) -> list[range]:
    """Consecutive indices of ``sizes`` grouped into runs that end once they hold
    ``at_least`` bytes (so a run holds at most one big item, at its end): what one thread
    hands another at a time. One queue hand-off per chunk cost a save or a restore of
    hundreds of small arrays about a tenth of its time."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= at_least:
            out.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class WorkerThreads:
    """A lazily started thread pool; ``run`` awaits one call without blocking the loop."""

    def __init__(self, *, low_priority: bool) -> None:
        self._low_priority = low_priority
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=64, thread_name_prefix="asyncckpt-io",
                    initializer=_lower_priority if self._low_priority else None)
            return self._executor

    async def run(self, fn: Callable[[], T], *, on_cancel: Callable[[], None]) -> T:
        """Run ``fn`` in a worker thread and return its result.

        Cancellation: ``on_cancel`` is called (it should make ``fn`` stop early), then the
        call still waits, shielded, for the thread to finish: a thread working on pooled
        memory is never abandoned. The cancellation is then re-raised.
        """
        future = self._get().submit(fn)
        loop = asyncio.get_running_loop()
        done = anyio.Event()
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
        try:
            await done.wait()
        except BaseException:
            on_cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
            raise
        return future.result()
