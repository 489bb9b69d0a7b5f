"""Snapshot and write: the save pipeline up to (and through) publication.

1. :func:`take_snapshot` flattens the tracked values and copies every array into an arena of
   the staging pool, in parallel slices on worker threads. It is the only blocking part.
2. :func:`write_snapshot` splits the staged bytes into chunks; ``io_threads`` low-priority
   encoder threads each take chunks one at a time, encode them (adaptive zstd) and checksum
   them; one writer thread appends them to the shard file as they come (one sequential
   stream measured faster to durable here than parallel files), then fsyncs it. Memory in
   flight is the staged state plus a bounded queue of encoded chunks (two per encoder).
   The manifest is then written and the directory sealed and published by :mod:`._commit`.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import queue
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import anyio
import numpy as np

from . import _commit, _fs, _jax, _torch, _tree
from ._codec import DiskModel, Encoder
from ._errors import SaveError, explain, first_error
from ._format import Chunk, encode_manifest, shard_name
from ._options import CheckpointOptions, SaveMetrics
from ._staging import Arena, StagingPool, capacity_for
from ._workers import WorkerThreads, runs

__all__ = ["Snapshot", "take_snapshot", "write_snapshot"]

_SLICE_BYTES = 32 << 20
_WRITEBACK_BYTES = 64 << 20


@dataclass
class Snapshot:
    """A state copied into staging memory: what the background write needs, nothing else."""

    save_counter: int
    values: dict[str, Any]                      # manifest nodes per tracked name
    arrays: list[tuple[str, np.dtype, tuple[int, ...], int]]  # path, dtype, shape, arena offset
    arena: Arena | None
    pool: StagingPool
    raw_bytes: int
    started: float
    snapshot_seconds: float
    page_locked: bool
    digests: dict[str, str] | None = None  # replicated key path -> checksum (debug check)
    sharded: frozenset[int] = frozenset()  # indices of arrays that are DTensor pieces
    pending: Callable[[], None] | None = None  # blocking wait until the arena is filled
    device_staged: bool = False
    turn: int | None = None  # its place among its checkpoint's collective operations

    async def ready(self) -> None:
        """Wait (in a thread) until the staged bytes are all in the arena: with device
        staging the copies to the host run on after the snapshot returned."""
        if self.pending is not None:
            await anyio.to_thread.run_sync(self.pending)
            self.pending = None

    def release(self) -> None:
        if self.pending is not None:  # never hand back memory a copy still writes into
            self.pending()
            self.pending = None
        if self.arena is not None:
            self.pool.release(self.arena)
            self.arena = None


def _layout(leaves: list[_tree.ArrayLeaf]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for leaf in leaves:
        align = 4096 if leaf.nbytes >= (64 << 10) else 64
        end = -(-end // align) * align
        offsets.append(end)
        end += leaf.nbytes
    return offsets, end


def _copy_jobs(leaves: list[_tree.ArrayLeaf], offsets: list[int], arena: Arena
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, Any]]]:
    """(destination, source) pairs, big arrays cut into row slices for parallel copying;
    and (destination, CUDA tensor) pairs for the device-to-host copies."""
    jobs, device_jobs = [], []
    for leaf, offset in zip(leaves, offsets):
        dst = arena.view(offset, leaf.nbytes).view(leaf.dtype).reshape(leaf.shape)
        if leaf.array is None:
            if _jax.is_array(leaf.device):
                jobs.append((dst, leaf.device))  # read whole in a copy thread, never sliced
            else:
                device_jobs.append((dst, leaf.device))
            continue
        src = leaf.array
        rows = src.shape[0] if src.ndim else 1
        if src.nbytes <= _SLICE_BYTES or rows < 2:
            jobs.append((dst, src))
            continue
        step = max(1, rows * _SLICE_BYTES // src.nbytes)
        jobs.extend((dst[i:i + step], src[i:i + step]) for i in range(0, rows, step))
    return jobs, device_jobs


def _copy_all(jobs: list[tuple[np.ndarray, Any]]) -> None:
    for dst, src in jobs:
        # np.asarray on a jax array waits for that array only, in this worker thread
        np.copyto(dst, src if isinstance(src, np.ndarray) else np.asarray(src), casting="no")


async def take_snapshot(values: dict[str, Any], save_counter: int, pool: StagingPool,
                        options: CheckpointOptions,
                        stage: Callable[[list[_tree.ArrayLeaf]], list[bool]] | None = None
                        ) -> Snapshot:
    """Copy the tracked values into staging memory; afterwards the caller may change them.

    ``stage`` picks the arrays this process writes (several processes share replicated
    ones); the others are recorded but not copied (their arena offset is -1).

    Cancellation: the staging memory is returned and nothing else happened (no trace).
    """
    started = time.perf_counter()
    staged = None
    nodes: dict[str, Any] = {}
    leaves: list[_tree.ArrayLeaf] = []
    for name, value in values.items():
        nodes[name], _ = _tree.flatten(name, value, leaves)
    all_leaves = leaves
    if stage is not None:
        keep = stage(leaves)
        leaves = [leaf for leaf, k in zip(leaves, keep) if k]
    offsets, total = _layout(leaves)
    budget = options.staging_budget_bytes or 2 * capacity_for(total)
    arena = await pool.acquire(total, budget=budget, page_lock=options.page_lock) if leaves else None
    try:
        if arena is not None:
            jobs, device_jobs = _copy_jobs(leaves, offsets, arena)
            copied = None
            if device_jobs:
                _torch.register_host_memory(arena)
                if options.device_staging:
                    staged = _torch.device_staged_snapshot(device_jobs)
                copied = staged or _torch.cuda_snapshot(device_jobs)
            bins: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]
            loads = [0, 0]
            for job in sorted(jobs, key=lambda j: -j[1].nbytes):
                k = loads.index(min(loads))
                bins[k].append(job)
                loads[k] += job[1].nbytes
            async with anyio.create_task_group() as tg:
                for part in bins:
                    if part:
                        tg.start_soon(anyio.to_thread.run_sync, _copy_all, part)
                if copied is not None:
                    tg.start_soon(anyio.to_thread.run_sync, copied.synchronize)
    except BaseException:
        if staged is not None:
            staged.finish()
        if arena is not None:
            pool.release(arena)
        raise
    where = {id(leaf): off for leaf, off in zip(leaves, offsets)}
    arrays = [(leaf.path, leaf.dtype, leaf.shape, where.get(id(leaf), -1)) for leaf in all_leaves]
    return Snapshot(save_counter, nodes, arrays, arena, pool, sum(a.nbytes for a in leaves),
                    started, time.perf_counter() - started,
                    arena.page_locked if arena is not None else options.page_lock,
                    sharded=frozenset(i for i, a in enumerate(all_leaves) if a.sharded),
                    pending=staged.finish if staged is not None else None,
                    device_staged=staged is not None)


@dataclass(frozen=True)
class _Task:
    array: int
    raw: np.ndarray     # uint8 view of staged bytes
    itemsize: int


def _tasks(snap: Snapshot, chunk_bytes: int) -> list[_Task]:
    tasks = []
    assert snap.arena is not None or not snap.arrays
    for i, (_, dtype, shape, offset) in enumerate(snap.arrays):
        if offset < 0:
            continue  # written by another process
        nbytes = math.prod(shape) * dtype.itemsize
        step = max(dtype.itemsize, chunk_bytes // dtype.itemsize * dtype.itemsize)
        for start in range(0, nbytes, step):
            raw = snap.arena.view(offset + start, min(step, nbytes - start))  # type: ignore[union-attr]
            tasks.append(_Task(i, raw, dtype.itemsize))
    return tasks


_Encoded = list[tuple[int, "memoryview | bytes", str, str, int]]


def _encode_worker(tasks: list[_Task], batches: list[range], counter: Callable[[], int],
                   make_encoder: Callable[[], Encoder], abort: threading.Event,
                   out: queue.Queue[_Encoded | None]) -> None:
    """Encode and checksum batches of chunks until none are left; hand them to the writer."""
    try:
        encoder = make_encoder()  # in this thread: it uses thread-local zstd contexts
        while not abort.is_set():
            b = counter()
            if b >= len(batches):
                break
            done: _Encoded = []
            for i in batches[b]:
                stored, codec, filt = encoder.encode(tasks[i].raw, tasks[i].itemsize)
                done.append((i, stored, codec, filt, zlib.crc32(stored)))
            out.put(done)
    except BaseException:
        abort.set()
        raise
    finally:
        out.put(None)  # always: the writer counts one end marker per encoder


class FileSink:
    """Where a shard's encoded chunks go: a file, created on the first chunk, written back
    to disk as it grows and fsynced at the end."""

    def __init__(self, path: str, sync: bool) -> None:
        self.path, self.sync = path, sync
        self.fd: int | None = None
        self.offset = self.flushed = 0

    def write(self, data: memoryview | bytes) -> None:
        if self.fd is None:
            self.fd = _fs.open_new(self.path)
        _fs.write_all(self.fd, data)
        self.offset += len(data) if isinstance(data, bytes) else data.nbytes
        if self.sync and self.offset - self.flushed >= _WRITEBACK_BYTES:
            _fs.start_writeback(self.fd, self.flushed, self.offset - self.flushed)
            self.flushed = self.offset

    def finish(self) -> None:
        if self.fd is not None and self.sync:
            _fs.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            _fs.close(self.fd)
            self.fd = None


def _write_worker(sink: Any, name: str, tasks: list[_Task], encoders: int,
                  abort: threading.Event, inbox: queue.Queue[_Encoded | None],
                  results: list[tuple[int, Chunk] | None]) -> int:
    """Hand encoded chunks to ``sink`` (a :class:`FileSink`, or a stream to the I/O rank)
    as they come, then finish it (fsync); returns bytes written.

    After a failure it keeps draining the inbox until every encoder ended, so no encoder is
    left blocked on a full queue.
    """
    offset = ended = 0
    try:
        while ended < encoders:
            item = inbox.get()
            if item is None:
                ended += 1
                continue
            if abort.is_set():
                continue
            try:
                for i, stored, codec, filt, crc in item:
                    sink.write(stored)
                    size = len(stored) if isinstance(stored, bytes) else stored.nbytes
                    results[i] = (tasks[i].array,
                                  Chunk(name, offset, size, tasks[i].raw.size, codec, filt, crc))
                    offset += size
            except BaseException as exc:
                abort.set()
                error: BaseException | None = exc
                while ended < encoders:  # drain, then re-raise
                    ended += inbox.get() is None
                raise error
        if not abort.is_set():
            sink.finish()
    finally:
        sink.close()
    return offset


async def write_shard(snap: Snapshot, directory: str, name: str, options: CheckpointOptions,
                      workers: WorkerThreads, disk: DiskModel, sink: Any = None
                      ) -> tuple[list[_Task], list[tuple[int, Chunk] | None], int]:
    """Encode the snapshot's chunks and append them to ``directory/name``, fsynced (or hand
    them to ``sink``, which stands for that file on another rank).

    Returns the chunk tasks, per task ``(array index, Chunk)``, and the bytes written.
    Cancellation: the workers stop after their current batch; the caller removes the file.
    """
    await snap.ready()
    tasks = _tasks(snap, options.chunk_bytes)
    batches = runs([task.raw.size for task in tasks])
    results: list[tuple[int, Chunk] | None] = [None] * len(tasks)
    abort = threading.Event()
    counter = itertools.count().__next__
    encoders = max(1, min(options.io_threads, len(batches)))
    inbox: queue.Queue = queue.Queue(maxsize=2 * encoders)
    write_started = time.perf_counter()
    make_encoder = functools.partial(
        Encoder, compression=options.compression, level=options.compression_level,
        adaptive=options.adaptive_compression, shuffle=options.byte_shuffle,
        chunk_bytes=options.chunk_bytes, disk=disk, threads=encoders)
    written = [0]
    if sink is None:
        sink = FileSink(os.path.join(directory, name), options.fsync)

    async def run_encoder() -> None:
        await workers.run(
            lambda: _encode_worker(tasks, batches, counter, make_encoder, abort, inbox),
            on_cancel=abort.set)

    async def run_writer() -> None:
        written[0] = await workers.run(
            lambda: _write_worker(sink, name, tasks, encoders, abort, inbox, results),
            on_cancel=abort.set)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_writer)
        for _ in range(encoders):
            tg.start_soon(run_encoder)
    disk.observe(written[0], time.perf_counter() - write_started)
    return tasks, results, written[0]


async def write_snapshot(snap: Snapshot, path: str, options: CheckpointOptions,
                         workers: WorkerThreads, disk: DiskModel, *, publish: bool = True
                         ) -> tuple[SaveMetrics, str]:
    """Write a snapshot for ``path``; always releases the staging memory.

    With ``publish``, the checkpoint is published at ``path`` and ``(metrics, path)`` is
    returned. Without, it is left complete and sealed in a temporary directory next to
    ``path`` and ``(metrics, temporary directory)`` is returned: the caller publishes it
    (``_commit.publish``) or removes it.

    Raises ``SaveError`` (with the cause) on any failure; the temporary directory is then
    removed and whatever was at ``path`` before is untouched.

    Cancellation: before publication starts, the workers stop after their current batch, the
    temporary directory is removed and nothing is published; publication itself is shielded.
    """
    tmp = _commit.temp_dir_for(path)
    phase = "starting"
    try:
        phase = "creating the temporary directory"
        await anyio.to_thread.run_sync(_prepare, path, tmp)
        phase = "writing shards"
        tasks, results, stored = await write_shard(snap, tmp, shard_name(0), options,
                                                   workers, disk)
        phase = "writing the manifest"
        manifest = await anyio.to_thread.run_sync(_manifest, snap, results)  # JSON off the loop
        await _commit.seal(tmp, manifest, sync=options.fsync)
        phase = "publishing"
        if publish:
            await _commit.publish(tmp, path, sync=options.fsync)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_commit.discard, tmp)
        cause = first_error(exc)
        if isinstance(cause, SaveError):
            raise cause
        if isinstance(cause, Exception):
            raise SaveError(_describe(cause, path, phase)) from cause
        raise
    finally:
        snap.release()
    compressed = sum(1 for r in results if r is not None and r[1].codec == "zstd")
    return SaveMetrics(
        raw_bytes=snap.raw_bytes, stored_bytes=stored, snapshot_seconds=snap.snapshot_seconds,
        total_seconds=time.perf_counter() - snap.started,
        page_locked=snap.page_locked, chunks=len(tasks), compressed_chunks=compressed,
        device_staged=snap.device_staged), path if publish else tmp


def _make_parents(directory: str) -> None:
    """Create missing directories, each made durable in its own parent (a first save's new
    directory must survive a power loss along with the checkpoint in it)."""
    missing = []
    while directory and not _fs.is_dir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for new in reversed(missing):
        try:
            _fs.mkdir(new)
        except FileExistsError:
            continue
        _fs.fsync_dir(os.path.dirname(new) or ".")


def seconds_since(started: float) -> float:
    """Seconds since a ``Snapshot.started`` reading (the manager keeps no clock of its own,
    so tests can mock its ``time.time`` as TensorFlow's tests do)."""
    return time.perf_counter() - started


def _prepare(path: str, tmp: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        _make_parents(parent)
    _commit.recover_replaced(path)
    _fs.mkdir(tmp)


def array_table(snap: Snapshot, results: list[tuple[int, Chunk] | None]
                ) -> list[dict[str, Any]]:
    """The manifest's ``arrays`` entries; ``chunks`` is None for arrays not written here."""
    per_array: list[list[Chunk]] = [[] for _ in snap.arrays]
    for item in results:
        if item is None:
            raise SaveError("internal error: a chunk was not written")
        per_array[item[0]].append(item[1])
    return [{"path": p, "dtype": _tree.dtype_to_str(dt, p), "shape": list(shape),
             "chunks": [c.to_json() for c in chunks] if offset >= 0 else None}
            for (p, dt, shape, offset), chunks in zip(snap.arrays, per_array)]


def _manifest(snap: Snapshot, results: list[tuple[int, Chunk] | None]) -> bytes:
    return encode_manifest(snap.save_counter, snap.values, array_table(snap, results))


def _describe(exc: BaseException, path: str, phase: str) -> str:
    published = ("nothing was published and the previous checkpoint is untouched"
                 if isinstance(exc, OSError) else "nothing was published")
    return f"saving {path} failed while {phase}: {explain(exc)}; {published}"