"""The staging pool: reused, page-aligned, page-locked host buffers that snapshots copy into.

Fresh memory costs 4-10x a copy into touched, reused memory on a VM (page faults), so arenas
are allocated once, touched up front, locked with ``mlock`` where the OS allows, and reused by
every later save. The pool belongs to a ``Checkpoint`` and outlives any one event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
import warnings

import anyio
import numpy as np

__all__ = ["Arena", "StagingPool", "PAGE", "capacity_for"]

PAGE = mmap.PAGESIZE
_GRANULE = 2 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_warned = False


def _mlock(address: int, nbytes: int) -> bool:
    global _warned
    if not hasattr(_libc, "mlock"):
        ok = False
    else:
        ok = _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(nbytes)) == 0
    if not ok and not _warned:
        _warned = True
        warnings.warn(
            "asyncckpt could not page-lock its staging buffers (mlock failed; raise "
            "RLIMIT_MEMLOCK, e.g. `ulimit -l unlimited`, to lock them); saving continues with "
            "unlocked buffers and SaveMetrics.page_locked is False",
            RuntimeWarning, stacklevel=3,
        )
    return ok


def capacity_for(nbytes: int) -> int:
    """The size of the arena allocated for ``nbytes`` of staged data."""
    return -(-max(nbytes, 1) // _GRANULE) * _GRANULE


class Arena:
    """One page-aligned anonymous mapping, touched once, optionally locked."""

    def __init__(self, capacity: int, *, page_lock: bool) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, capacity)
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)
        self.buffer[::PAGE] = 0  # fault every page in now, not during a snapshot
        self.address = self.buffer.ctypes.data
        self.page_locked = _mlock(self.address, capacity) if page_lock else False

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.buffer[offset:offset + nbytes]


class StagingPool:
    """Arenas kept across saves, within a byte budget.

    ``acquire`` hands out a free arena big enough, or allocates one while the budget allows;
    otherwise it waits until an earlier save releases its arena (backpressure). One arena
    larger than the budget is always allowed when nothing else is held, so a state bigger than
    the budget can still be saved (one save at a time).
    """

    def __init__(self) -> None:
        self._free: list[Arena] = []
        self._held = 0          # bytes of arenas handed out
        self._lock = threading.Lock()
        self._waiters: list[anyio.Event] = []
        self.allocations = 0    # arenas ever allocated (tests: the tenth save allocates nothing)

    @property
    def total_bytes(self) -> int:
        return self._held + sum(a.capacity for a in self._free)

    def _try_take(self, nbytes: int, budget: int) -> Arena | int | None:
        """An arena, or the capacity to allocate (budget reserved), or None to wait."""
        with self._lock:
            fits = [a for a in self._free if a.capacity >= nbytes]
            if fits:
                arena = min(fits, key=lambda a: a.capacity)
                self._free.remove(arena)
                self._held += arena.capacity
                return arena
            capacity = capacity_for(nbytes)
            while self._free and self.total_bytes + capacity > budget:
                self._free.pop(0)  # too small for this state: give its memory back
            if self.total_bytes + capacity <= budget or self._held == 0:
                self._held += capacity
                return capacity
            return None

    async def acquire(self, nbytes: int, *, budget: int, page_lock: bool) -> Arena:
        """Take an arena of at least ``nbytes``.

        Cancellation: safe at any point; an arena being allocated is returned to the pool.
        """
        while True:
            got = self._try_take(nbytes, budget)
            if isinstance(got, Arena):
                return got
            if got is not None:
                try:
                    arena = await anyio.to_thread.run_sync(
                        lambda: Arena(got, page_lock=page_lock))
                except BaseException:
                    with self._lock:
                        self._held -= got
                    self._wake()
                    raise
                self.allocations += 1
                return arena
            event = anyio.Event()
            self._waiters.append(event)
            try:
                await event.wait()
            finally:
                if event in self._waiters:
                    self._waiters.remove(event)

    def release(self, arena: Arena) -> None:
        """Give an arena back for reuse (call from the event loop that saves)."""
        with self._lock:
            self._held -= arena.capacity
            self._free.append(arena)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()
