"""Physical limits of this machine, measured on the same state and in the same run as a benchmark.

Absolute figures drift between runs and machines, so a benchmark measures its own floors here
and reports ratios against them. Everything works on a flat list of numpy arrays (any dtype,
C-contiguous) and cleans up the files it writes.

  memcpy_seconds      copy of the state into reused, pre-touched buffers (1 or more threads):
                      the floor of a snapshot.
  disk_write_seconds  the same raw bytes written in 8 MiB blocks with ``os.write`` into a fresh
                      file, then one fsync: the plain way to make those bytes durable.
  cold_read_seconds   a file of that size read back after dropping its page cache
                      (``posix_fadvise(DONTNEED)``), 8 MiB ``preadv`` into reused buffers.
  zstd_throughput     python-zstandard level-N compress / decompress of independent 4 MiB
                      frames sampled from the state, per thread and with several threads.
  drop_page_cache     drop the (clean) cached pages of a file or of every file under a directory.
  Floors              the same three measurements one run at a time, on prepared buffers, so a
                      benchmark can interleave them with the runs it compares (the disk of a VM
                      drifts by 2x within a minute: a floor taken a minute earlier misleads).

Bandwidths are in bytes per second; the callers print GB/s (1e9 bytes).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "BLOCK", "FRAME", "byte_view", "copy_jobs", "memcpy_seconds", "disk_write_seconds",
    "cold_read_seconds", "sample_frames", "zstd_throughput", "drop_page_cache", "median_time",
    "Floors", "CpuWatch", "wait_quiet", "fsync_path",
]

BLOCK = 8 << 20          # write / read block
FRAME = 4 << 20          # zstd frame (the engine's default chunk)
_SLICE = 32 << 20        # big arrays are copied in slices of this size (as the engine does)


def fsync_path(path: str) -> None:
    """fsync one file or directory (what the peers leave out of their durable time)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def byte_view(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a flat uint8 view (no copy)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def median_time(fn: Callable[[], object], repeats: int, *, setup: Callable[[], object] | None
                = None, warmup: bool = True) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (``setup()`` untimed before each)."""
    if warmup:
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- memory copy -------------------------------------------------------------------------------

def copy_jobs(dst: Sequence[np.ndarray], src: Sequence[np.ndarray], threads: int
              ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """(destination, source) pairs, big arrays cut into row slices, balanced over ``threads``
    bins by bytes (largest first)."""
    jobs = []
    for d, s in zip(dst, src):
        rows = s.shape[0] if s.ndim else 1
        if s.nbytes <= _SLICE or rows < 2:
            jobs.append((d, s))
            continue
        step = max(1, rows * _SLICE // s.nbytes)
        jobs.extend((d[i:i + step], s[i:i + step]) for i in range(0, rows, step))
    bins: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for job in sorted(jobs, key=lambda j: -j[1].nbytes):
        k = loads.index(min(loads))
        bins[k].append(job)
        loads[k] += job[1].nbytes
    return bins


def _copy_bin(jobs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for d, s in jobs:
        np.copyto(d, s, casting="no")


def memcpy_seconds(arrays: Sequence[np.ndarray], *, threads: int = 1, repeats: int = 5) -> float:
    """Median seconds to copy every array into buffers allocated and touched once up front."""
    dst = [np.empty_like(a) for a in arrays]
    bins = copy_jobs(dst, arrays, threads)
    for b in bins:                       # touch every destination page now
        _copy_bin(b)
    if threads == 1:
        run = lambda: _copy_bin(bins[0])  # noqa: E731
        return median_time(run, repeats)
    with ThreadPoolExecutor(threads) as pool:
        def run() -> None:
            for f in [pool.submit(_copy_bin, b) for b in bins if b]:
                f.result()
        return median_time(run, repeats)


# --- disk --------------------------------------------------------------------------------------

def _blocks(arrays: Iterable[np.ndarray], block: int = BLOCK) -> Iterable[memoryview]:
    for a in arrays:
        v = byte_view(a)
        for start in range(0, v.size, block):
            yield memoryview(v[start:start + block])


_WRITEBACK = 64 << 20


def _sync_file_range():  # type: ignore[no-untyped-def]
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "sync_file_range", None)
    if fn is None:
        return None
    return lambda fd, off, n: fn(ctypes.c_int(fd), ctypes.c_int64(off), ctypes.c_int64(n),
                                 ctypes.c_uint(2))  # SYNC_FILE_RANGE_WRITE


def _write_file(path: str, arrays: Sequence[np.ndarray], *, fsync: bool = True,
                early_writeback: bool = False) -> int:
    """Write the arrays' bytes in 8 MiB blocks; ``early_writeback``: also start write-back of
    every 64 MiB written (``sync_file_range``, as the engine does) before the final fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    written = flushed = 0
    sfr = _sync_file_range() if early_writeback else None
    try:
        for view in _blocks(arrays):
            while view:
                n = os.write(fd, view)
                view = view[n:]
                written += n
            if sfr is not None and written - flushed >= _WRITEBACK:
                sfr(fd, flushed, written - flushed)
                flushed = written
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return written


def disk_write_seconds(directory: str, arrays: Sequence[np.ndarray], *, repeats: int = 3) -> float:
    """Median seconds to write the arrays' raw bytes (8 MiB ``os.write`` blocks) into a fresh
    file in ``directory`` and fsync it. Each file is removed after its (timed) run."""
    path = os.path.join(directory, "limits-write.bin")

    def setup() -> None:
        if os.path.exists(path):
            os.unlink(path)

    try:
        return median_time(lambda: _write_file(path, arrays), repeats, setup=setup)
    finally:
        setup()


def drop_page_cache(path: str) -> None:
    """Drop the cached pages of ``path`` (a file, or every file below a directory).

    Only clean pages can be dropped: the file must have been fsynced (or written back).
    """
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_file(path: str, threads: int, buffers: list[np.ndarray]) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        nblocks = -(-size // BLOCK)
        lock = threading.Lock()
        nxt = [0]
        total = [0] * threads

        def worker(k: int) -> None:
            buf = memoryview(buffers[k])
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= nblocks:
                    return
                off = i * BLOCK
                want = min(BLOCK, size - off)
                got = 0
                while got < want:
                    n = os.preadv(fd, [buf[got:want]], off + got)
                    if n == 0:
                        raise EOFError(path)
                    got += n
                total[k] += got

        if threads == 1:
            worker(0)
        else:
            ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return sum(total)
    finally:
        os.close(fd)


def cold_read_seconds(directory: str, arrays: Sequence[np.ndarray], *, threads: Sequence[int]
                      = (1, 2), repeats: int = 3) -> dict[int, float]:
    """Median seconds to read a file of the arrays' bytes with a cold page cache, per thread
    count (8 MiB ``preadv`` blocks handed out in file order, into reused touched buffers)."""
    path = os.path.join(directory, "limits-read.bin")
    if os.path.exists(path):
        os.unlink(path)
    _write_file(path, arrays)
    out = {}
    try:
        for t in threads:
            buffers = [np.ones(BLOCK, np.uint8) for _ in range(t)]
            out[t] = median_time(lambda: _read_file(path, t, buffers), repeats,
                                 setup=lambda: drop_page_cache(path), warmup=False)
    finally:
        os.unlink(path)
    return out


# --- zstd --------------------------------------------------------------------------------------

def sample_frames(arrays: Sequence[np.ndarray], total: int = 64 << 20, frame: int = FRAME
                  ) -> list[np.ndarray]:
    """Evenly spaced frames of the state, cut as the engine cuts chunks (each array into
    ``frame``-byte pieces), about ``total`` bytes in all (copies, so they are contiguous)."""
    pieces = []
    for a in arrays:
        v = byte_view(a)
        step = max(a.itemsize, frame // a.itemsize * a.itemsize)
        pieces.extend(v[s:s + step] for s in range(0, v.size, step))
    state_bytes = sum(p.size for p in pieces)
    if state_bytes <= total:
        chosen = pieces
    else:
        # walk the pieces at a fixed byte stride so big and small arrays are sampled by bytes
        stride, chosen, pos, acc = state_bytes / total * frame, [], 0.0, 0
        for p in pieces:
            if acc >= pos:
                chosen.append(p)
                pos += stride
            acc += p.size
    return [np.array(p, copy=True) for p in chosen]


def zstd_throughput(frames: Sequence[np.ndarray], *, level: int = 1, threads: int = 1,
                    repeats: int = 3) -> dict[str, float]:
    """Compress and decompress every frame independently; returns bytes/s of raw bytes for
    each direction (all threads together) and the stored/raw ratio.

    Decompression goes into reused per-thread buffers through ``stream_reader.readinto``
    (as the engine does), which avoids allocating fresh ``bytes`` per frame.
    """
    import zstandard

    raw = sum(f.size for f in frames)
    compressed: list[bytes] = [b""] * len(frames)
    local = threading.local()
    biggest = max(f.size for f in frames)

    def cctx() -> zstandard.ZstdCompressor:
        if not hasattr(local, "c"):
            local.c = zstandard.ZstdCompressor(level=level)
            local.d = zstandard.ZstdDecompressor()
            local.out = np.ones(biggest, np.uint8)
        return local.c

    def compress_part(idx: list[int]) -> None:
        c = cctx()
        for i in idx:
            compressed[i] = c.compress(frames[i])

    def decompress_part(idx: list[int]) -> None:
        cctx()
        d, out = local.d, memoryview(local.out)
        for i in idx:
            with d.stream_reader(compressed[i]) as r:
                want, got = frames[i].size, 0
                while got < want:
                    n = r.readinto(out[got:want])
                    if n == 0:
                        raise RuntimeError("short zstd frame")
                    got += n

    parts = [list(range(k, len(frames), threads)) for k in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        def run(fn: Callable[[list[int]], None]) -> Callable[[], None]:
            def go() -> None:
                for f in [pool.submit(fn, p) for p in parts if p]:
                    f.result()
            return go
        c_s = median_time(run(compress_part), repeats)
        d_s = median_time(run(decompress_part), repeats)
    return {"compress_bps": raw / c_s, "decompress_bps": raw / d_s,
            "ratio": sum(len(c) for c in compressed) / raw, "sample_bytes": raw}


# --- interleaved floors ------------------------------------------------------------------------

class Floors:
    """One-shot floor measurements of one state, to interleave with the runs they bound.

    Holds reused, touched copy buffers (the state's size again) and, after
    :meth:`prepare_read`, a fsynced file of the state's bytes in ``directory``. Every call
    returns the seconds of one run and appends it to ``self.samples[name]``.
    Call :meth:`close` to remove the file and free the buffers.
    """

    def __init__(self, arrays: Sequence[np.ndarray], directory: str) -> None:
        self.arrays = list(arrays)
        self.directory = directory
        self.nbytes = sum(a.nbytes for a in self.arrays)
        dst = [np.empty_like(a) for a in self.arrays]
        self._bins = {1: copy_jobs(dst, self.arrays, 1), 2: copy_jobs(dst, self.arrays, 2)}
        for b in self._bins[2]:
            _copy_bin(b)                  # touch every destination page once
        self._pool = ThreadPoolExecutor(2)
        self._read_path = os.path.join(directory, "floors-read.bin")
        self._read_buffers = [np.ones(BLOCK, np.uint8) for _ in range(2)]
        self.samples: dict[str, list[float]] = {}

    def _record(self, name: str, seconds: float) -> float:
        self.samples.setdefault(name, []).append(seconds)
        return seconds

    def memcpy(self, threads: int) -> float:
        bins = self._bins[threads]
        t0 = time.perf_counter()
        if threads == 1:
            _copy_bin(bins[0])
        else:
            for f in [self._pool.submit(_copy_bin, b) for b in bins if b]:
                f.result()
        return self._record(f"memcpy_{threads}t", time.perf_counter() - t0)

    def write_fsync(self, *, early_writeback: bool = False) -> float:
        """Plain: 8 MiB ``os.write`` blocks then fsync. ``early_writeback``: plus
        ``sync_file_range`` every 64 MiB (recorded as ``write_sfr_fsync``)."""
        path = os.path.join(self.directory, "floors-write.bin")
        if os.path.exists(path):
            os.unlink(path)
        t0 = time.perf_counter()
        _write_file(path, self.arrays, early_writeback=early_writeback)
        dt = time.perf_counter() - t0
        os.unlink(path)
        return self._record("write_sfr_fsync" if early_writeback else "write_fsync", dt)

    def prepare_read(self) -> None:
        if not os.path.exists(self._read_path):
            _write_file(self._read_path, self.arrays)

    def cold_read(self, threads: int) -> float:
        self.prepare_read()
        drop_page_cache(self._read_path)
        t0 = time.perf_counter()
        _read_file(self._read_path, threads, self._read_buffers[:threads])
        return self._record(f"cold_read_{threads}t", time.perf_counter() - t0)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def close(self) -> None:
        self._pool.shutdown()
        if os.path.exists(self._read_path):
            os.unlink(self._read_path)
        self._bins = {}


# --- other load on the machine -----------------------------------------------------------------

class CpuWatch:
    """How much CPU the rest of the machine used while we measured (Linux ``/proc/stat``).

    ``other_cores`` = (busy CPU time of the whole machine - this process's CPU time) / wall
    time: 0 on a quiet machine; kernel threads that write back our own dirty pages count as
    "other" too, so a few hundredths are normal during disk work. ``steal_cores``: CPU time the
    hypervisor gave to other guests. On a 2-core machine, 0.5 other cores means the benchmark
    ran on contended CPUs and its figures are not to be trusted.
    """

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._stat0 = self._stat()
        self._own0 = self._own()

    @staticmethod
    def _stat() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq) / tick, steal / tick

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def result(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        stat = self._stat()
        if stat is None or self._stat0 is None or wall <= 0:
            return {"other_cores": float("nan"), "steal_cores": float("nan"), "wall_s": wall}
        busy = stat[0] - self._stat0[0]
        own = self._own() - self._own0
        return {"other_cores": max(busy - own, 0.0) / wall,
                "steal_cores": (stat[1] - self._stat0[1]) / wall, "wall_s": wall}


def wait_quiet(max_wait: float = 20.0, *, threshold: float = 0.15, window: float = 1.0) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use less than ``threshold``
    cores over ``window`` seconds; returns the seconds waited (``max_wait`` or more: gave up).

    Does nothing where ``/proc/stat`` is missing.
    """
    t0 = time.perf_counter()
    while True:
        watch = CpuWatch()
        time.sleep(window)
        other = watch.result()["other_cores"]
        waited = time.perf_counter() - t0
        if not other >= threshold or waited >= max_wait:   # nan (no /proc/stat) -> quiet
            return waited
