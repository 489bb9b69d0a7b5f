"""Reading a checkpoint: manifest, then chunks verified and decoded in parallel.

Chunks go straight into their destination arrays (raw chunks are read in place and then
checked); only non-contiguous destinations need a temporary. Every file is untrusted: the
manifest is fully validated (:mod:`._format`), shard files are opened without following
symlinks, must be regular files, and must hold every range the manifest points into. All of
that is checked by :func:`read_manifest`, before a caller allocates anything for the arrays.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from typing import Any

import anyio
import numpy as np

from . import _fs, _tree
from ._codec import ChunkDamaged, Decoder
from ._workers import runs
from ._errors import CorruptCheckpointError, RestoreError, first_error
from ._format import MANIFEST_LIMIT, MANIFEST_NAME, ArraySpec, Chunk, Manifest, decode_manifest

__all__ = ["read_manifest", "read_manifest_data", "read_arrays", "byte_view", "chunk_order"]


async def read_manifest(path: str) -> Manifest:
    """Read and validate ``path``'s manifest.

    Cancellation: the read is abandoned; nothing was changed.
    """
    return (await read_manifest_data(path))[1]


async def read_manifest_data(path: str) -> tuple[bytes, Manifest]:
    """The manifest file's bytes (to share with ranks that cannot read it) and the validated
    manifest."""
    if not await anyio.to_thread.run_sync(_fs.is_dir, path):
        raise RestoreError(f"no checkpoint at {path}: it is not a directory")
    source = os.path.join(path, MANIFEST_NAME)
    try:
        # Sized first: a read of up to the limit would reserve 256 MiB for every manifest,
        # and a file over the limit is rejected without reading it.
        size = await anyio.to_thread.run_sync(_file_size, source)
        if size > MANIFEST_LIMIT + 64:
            raise ValueError(f"{source} is {size} bytes, more than a manifest can be "
                             f"({MANIFEST_LIMIT} bytes of body)")
        data = await _fs.read_small(source, size + 64)
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{source} is missing: {path} is not a complete "
                                     f"checkpoint") from exc
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"cannot read {source}: {exc}") from exc
    # Off the event loop: a large manifest takes a while to parse and validate.
    return data, await anyio.to_thread.run_sync(_decode_and_check, data, source, path)


def _file_size(path: str) -> int:
    fd = _fs.open_read(path)
    try:
        return _fs.file_size(fd)
    finally:
        _fs.close(fd)


def _decode_and_check(data: bytes, source: str, path: str) -> Manifest:
    """The validated manifest, once every shard it names was found to be a regular file in
    ``path`` that holds the chunks the manifest puts in it."""
    manifest = decode_manifest(data, source=source)
    _Shards(path, list(manifest.arrays)).close()
    return manifest


def byte_view(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a flat uint8 view (shares memory)."""
    return array.reshape(-1).view(np.uint8)


# open(2) failures that mean "no regular file there" (ELOOP: a symlink, ENXIO: a socket...).
_NOT_A_FILE = frozenset({errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.ENOTDIR, errno.EISDIR,
                         errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP, errno.ENAMETOOLONG})


class _Shards:
    """Shard files opened once per restore, each checked to hold its chunks."""

    def __init__(self, directory: str, specs: list[ArraySpec]) -> None:
        self.directory = directory
        self.fds: dict[str, int] = {}
        needed: dict[str, int] = {}
        for spec in specs:
            for c in spec.chunks:
                needed[c.file] = max(needed.get(c.file, 0), c.offset + c.stored_len)
        try:
            for name, end in needed.items():
                path = os.path.join(directory, name)
                try:
                    self.fds[name] = fd = _fs.open_read(path)
                except OSError as exc:
                    if exc.errno in _NOT_A_FILE:
                        raise CorruptCheckpointError(
                            f"shard {path} is missing or not a regular file ({exc.strerror}); "
                            f"the checkpoint is incomplete: restore another one") from exc
                    raise RestoreError(f"cannot open shard {path}: {exc}; the checkpoint may "
                                       f"be fine, check permissions and storage") from exc
                size = _fs.file_size(fd)
                if size < end:
                    raise CorruptCheckpointError(
                        f"shard {path} is truncated: {size} bytes, the manifest needs {end}")
        except BaseException:
            self.close()
            raise

    def fetch(self, chunk: Chunk, into: memoryview) -> None:
        _fs.pread_into(self.fds[chunk.file], into, chunk.offset)

    def fetch_end(self) -> None:
        pass

    def close(self) -> None:
        for fd in self.fds.values():
            _fs.close(fd)
        self.fds.clear()


_Job = tuple[ArraySpec, Chunk, int, np.ndarray]


def is_raw(chunk: Chunk) -> bool:
    """Stored as is: read straight into the destination, then checked."""
    return chunk.codec == "raw" and chunk.filter == "none"


def chunk_order(specs: list[ArraySpec]) -> list[tuple[int, int, Chunk]]:
    """``(spec index, byte offset in the array, chunk)`` in file order: the order chunks are
    read, and sent between ranks (both ends derive it from the same specs)."""
    out = []
    for i, spec in enumerate(specs):
        start = 0
        for chunk in spec.chunks:
            out.append((i, start, chunk))
            start += chunk.raw_len
    out.sort(key=lambda item: (item[2].file, item[2].offset))
    return out


_Read = list[tuple[_Job, "memoryview | None"]]


def _read_stage(jobs: list[_Job], shards: Any, abort: threading.Event, consumers: int,
                out: queue.Queue[_Read | None]) -> None:
    """Read the chunks in file order, one sequential stream (measured faster here than
    interleaved readers): raw chunks straight into their destination, others into a buffer.
    ``shards`` reads a chunk's stored bytes into a buffer (``fetch(chunk, into)``): from the
    shard files, or from the I/O rank. Chunks are handed over in runs (``_workers.runs``).
    Always ends with one end marker per verifier."""
    try:
        for run in runs([job[1].stored_len for job in jobs]):
            batch: _Read = []
            for job in (jobs[i] for i in run):
                if abort.is_set():
                    return
                spec, chunk, start, out_bytes = job
                if is_raw(chunk):
                    shards.fetch(chunk, memoryview(out_bytes[start:start + chunk.raw_len]))
                    batch.append((job, None))
                else:
                    stored = memoryview(bytearray(chunk.stored_len))
                    shards.fetch(chunk, stored)
                    batch.append((job, stored))
            out.put(batch)
        shards.fetch_end()
    except EOFError as exc:
        abort.set()
        raise CorruptCheckpointError(f"a shard of {shards.directory} became shorter while it "
                                     f"was read ({exc}); restore from another checkpoint"
                                     ) from exc
    except BaseException:
        abort.set()
        raise
    finally:
        for _ in range(consumers):
            out.put(None)


def _verify_stage(directory: str, inbox: queue.Queue[_Read | None],
                  abort: threading.Event) -> None:
    """Check and decode what the reader hands over; drains the queue after a failure."""
    decoder = Decoder()
    failure: BaseException | None = None
    while True:
        item = inbox.get()
        if item is None:
            break
        for (spec, chunk, start, out_bytes), stored in item:
            if failure is not None or abort.is_set():
                break
            failure = _check(decoder, directory, spec, chunk, stored,
                             out_bytes[start:start + chunk.raw_len], abort)
    if failure is not None:
        raise failure


def _check(decoder: Decoder, directory: str, spec: ArraySpec, chunk: Chunk,
           stored: memoryview | None, out: np.ndarray, abort: threading.Event
           ) -> BaseException | None:
    """Verify (and decode) one chunk into ``out``; its failure, if any (abort is then set)."""
    try:
        if stored is None:
            decoder.verify(memoryview(out), chunk)
        else:
            decoder.decode(stored, chunk, spec.dtype.itemsize, out)
        if spec.dtype.kind == "U":
            try:
                _tree.check_code_points(out.view(spec.dtype))
            except ValueError as exc:
                raise ChunkDamaged(str(exc)) from exc
    except ChunkDamaged as exc:
        abort.set()
        failure = CorruptCheckpointError(
            f"{spec.path}: chunk at {os.path.join(directory, chunk.file)}:{chunk.offset} "
            f"is damaged ({exc}); restore from another checkpoint")
        failure.__cause__ = exc
        return failure
    except BaseException as exc:
        abort.set()
        return exc
    return None


async def read_arrays(directory: str, specs: list[ArraySpec], destinations: list[np.ndarray],
                      *, threads: int, source: Any = None) -> None:
    """Fill each destination array (matching shape and dtype) from its spec's chunks.

    ``source`` replaces the shard files (an object with ``fetch(chunk, into)``,
    ``fetch_end()`` and ``close()``, e.g. chunks streamed from the I/O rank).

    Cancellation: workers stop after their current chunk; destinations may then hold a mix
    of old and restored data.
    """
    staged: list[tuple[np.ndarray, np.ndarray]] = []   # non-contiguous dest <- temporary
    targets = []
    for dest in destinations:
        target = dest
        if not dest.flags.c_contiguous:
            target = np.empty(dest.shape, dest.dtype)
            staged.append((dest, target))
        targets.append(byte_view(target))
    jobs = [(specs[i], chunk, start, targets[i]) for i, start, chunk in chunk_order(specs)]
    shards = source or await anyio.to_thread.run_sync(_Shards, directory, specs)
    abort = threading.Event()
    verifiers = max(1, min(threads, len(jobs)))
    handoff: queue.Queue = queue.Queue(maxsize=4 * verifiers)
    limiter = anyio.CapacityLimiter(verifiers + 1)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: anyio.to_thread.run_sync(
                _read_stage, jobs, shards, abort, verifiers, handoff, limiter=limiter))
            for _ in range(verifiers):
                tg.start_soon(lambda: anyio.to_thread.run_sync(
                    _verify_stage, directory, handoff, abort, limiter=limiter))
    except Exception as exc:
        first = first_error(exc)
        if isinstance(first, RestoreError):
            raise first from first.__cause__
        if isinstance(first, OSError):
            raise RestoreError(f"reading {directory} failed: {first}; the checkpoint may be "
                               f"fine, check the storage") from first
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shards.close)
    if staged:
        await anyio.to_thread.run_sync(_copy_back, staged)


def _copy_back(staged: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for dest, tmp in staged:
        np.copyto(dest, tmp)
