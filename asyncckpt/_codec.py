"""Chunk codec: byte-shuffle, zstd, the adaptive compress-or-not decision, checksums.

One :class:`Encoder` / :class:`Decoder` per worker thread (zstd contexts are not shared).
Everything here releases the GIL on the big buffers (zstd, zlib.crc32, numpy copies).
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import zstandard

from ._format import Chunk

__all__ = ["DiskModel", "Encoder", "Decoder", "ChunkDamaged"]

_PROBE_BYTES = 16 << 10
_MIN_PROBE_BYTES = 2 << 10
_SURE_RATIO = 0.1
_MAX_WINDOW = 128 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ChunkDamaged(Exception):
    """A chunk's stored bytes failed verification (turned into CorruptCheckpointError)."""


class DiskModel:
    """Running estimate of the durable write bandwidth, shared by the saves of one Checkpoint.

    The adaptive decision compares it with the compression speed measured per chunk.
    Before the first measurement it assumes ``initial_bps``.
    """

    def __init__(self, initial_bps: float = 1.5e9) -> None:
        self._bps = initial_bps
        self._lock = threading.Lock()

    @property
    def bytes_per_second(self) -> float:
        return self._bps

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes < (16 << 20) or seconds <= 0:
            return  # too small to say anything about the disk
        with self._lock:
            self._bps = 0.5 * self._bps + 0.5 * (nbytes / seconds)


def shuffle_into(src: np.ndarray, itemsize: int, out: np.ndarray) -> np.ndarray:
    """Byte-shuffle ``src`` (uint8, length a multiple of itemsize) into ``out``."""
    n = src.size // itemsize
    planes = out[: src.size].reshape(itemsize, n)
    grid = src.reshape(n, itemsize)
    for k in range(itemsize):
        planes[k] = grid[:, k]
    return out[: src.size]


def unshuffle_into(src: np.ndarray, itemsize: int, out: np.ndarray) -> None:
    """Inverse of :func:`shuffle_into`: ``out`` (uint8, C-contiguous) gets the raw bytes."""
    n = out.size // itemsize
    grid = out.reshape(n, itemsize)
    planes = src[: out.size].reshape(itemsize, n)
    for k in range(itemsize):
        grid[:, k] = planes[k]


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``, created (and warmed up) once."""
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
        cache[level].compress(bytes(_PROBE_BYTES))  # first use allocates; keep it out of timings
    return cache[level]


def _scratch(name: str, nbytes: int) -> np.ndarray:
    """This thread's reusable buffer ``name`` of at least ``nbytes`` (touched once)."""
    buf = _local.__dict__.get(name)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        buf.fill(0)
        setattr(_local, name, buf)
    return buf


class Encoder:
    """Turns one raw chunk into stored bytes (per worker thread)."""

    def __init__(self, *, compression: str, level: int, adaptive: bool, shuffle: bool,
                 chunk_bytes: int, disk: DiskModel, threads: int) -> None:
        self._zstd = _compressor(level) if compression == "zstd" else None
        self._adaptive = adaptive
        self._shuffle = shuffle
        self._disk = disk
        self._threads = threads
        self._scratch = _scratch("scratch", chunk_bytes) if shuffle else None
        self._probe = _scratch("probe", _PROBE_BYTES)

    def encode(self, raw: np.ndarray, itemsize: int) -> tuple[memoryview | bytes, str, str]:
        """Return (stored bytes, codec, filter) for ``raw`` (a uint8 view, not modified)."""
        if self._zstd is None:
            return memoryview(raw), "raw", "none"
        use_shuffle = self._shuffle and itemsize > 1
        if self._adaptive and not self._pays_off(raw, itemsize, use_shuffle):
            return memoryview(raw), "raw", "none"
        data = shuffle_into(raw, itemsize, self._scratch) if use_shuffle else raw
        out = self._zstd.compress(data)
        if len(out) >= raw.size:
            return memoryview(raw), "raw", "none"
        return out, "zstd", "shuffle" if use_shuffle else "none"

    def _pays_off(self, raw: np.ndarray, itemsize: int, use_shuffle: bool) -> bool:
        """Compress a sample from the middle of the chunk and weigh CPU time against disk time.

        With ``T`` threads each owning ``disk/T`` of the disk, compressing a chunk of ratio
        ``r`` at ``C`` bytes/s saves time iff ``1/C + r/(disk/T) < 1/(disk/T)``, that is iff
        ``r < 1 - (disk/T)/C``.
        """
        # A sixteenth of the chunk, within 2-16 KiB (the whole of a smaller chunk) and at
        # least one item: on hundreds of small arrays whole-chunk probes made the decision
        # cost a quarter of the save.
        size = min(_PROBE_BYTES, max(_MIN_PROBE_BYTES, raw.size // 16))
        size = min(max(size // itemsize, 1) * itemsize, raw.size // itemsize * itemsize)
        if size == 0:
            return False
        start = (raw.size // 2) // itemsize * itemsize
        start = min(start, raw.size - size)
        sample = raw[start:start + size]
        if use_shuffle:
            if self._probe.size < size:  # one item bigger than the usual probe
                self._probe = _scratch("probe", size)
            sample = shuffle_into(sample, itemsize, self._probe)
        per_thread_disk = self._disk.bytes_per_second / self._threads
        ratio, seconds = self._time(sample)

        def pays(seconds: float) -> bool:
            return ratio < 1.0 - per_thread_disk * seconds / size
        if ratio < _SURE_RATIO:
            # Shrinks tenfold (zeros, masks): zstd runs at several GB/s on such bytes, and
            # a probe of microseconds is too short to time against the disk reliably.
            return True
        if pays(seconds) or ratio > 0.9:
            return pays(seconds)
        # A sample that shrinks well but timed slow: a probe takes microseconds, so one
        # preemption or page fault can multiply its time. Time it once more, keep the best.
        return pays(min(seconds, self._time(sample)[1]))

    def _time(self, sample: np.ndarray) -> tuple[float, float]:
        """(compression ratio, seconds) of compressing ``sample``."""
        t0 = time.perf_counter()
        ratio = len(self._zstd.compress(sample)) / sample.size  # type: ignore[union-attr]
        return ratio, max(time.perf_counter() - t0, 1e-7)


class Decoder:
    """Verifies and decodes stored chunks into destination memory (per worker thread).

    Stored bytes are untrusted: the checksum is checked first, and a zstd frame must be one
    standard frame (no skippable frame, no dictionary) whose header declares exactly
    ``raw_len`` bytes and a window of at most 128 MiB, with nothing after it. Only then is
    ``raw_len`` bytes allocated for it (``raw_len`` itself is bounded by the manifest checks).
    """

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)

    def verify(self, stored: memoryview, chunk: Chunk) -> None:
        if zlib.crc32(stored) != chunk.crc32:
            raise ChunkDamaged("checksum mismatch")

    def decode(self, stored: memoryview, chunk: Chunk, itemsize: int, out: np.ndarray) -> None:
        """Check ``stored`` against ``chunk`` and write the raw bytes into ``out`` (uint8,
        ``raw_len`` long).

        A raw, unfiltered chunk is best read straight into ``out`` and checked with
        :meth:`verify` instead.
        """
        self.verify(stored, chunk)
        if chunk.codec == "raw":
            raw = np.frombuffer(stored, dtype=np.uint8)
        else:
            raw = np.frombuffer(self._inflate(stored, chunk), dtype=np.uint8)
        if raw.size != chunk.raw_len or out.size != chunk.raw_len:
            raise ChunkDamaged(f"{raw.size} bytes decoded, the manifest says {chunk.raw_len}")
        if chunk.filter == "shuffle":
            unshuffle_into(raw, itemsize, out)
        else:
            np.copyto(out, raw)

    def _inflate(self, stored: memoryview, chunk: Chunk) -> bytes:
        if bytes(stored[:4]) != _ZSTD_MAGIC:
            raise ChunkDamaged("not a zstd frame (bad magic number)")
        try:
            params = zstandard.get_frame_parameters(stored)
        except zstandard.ZstdError as exc:
            raise ChunkDamaged(f"bad zstd frame header ({exc})") from exc
        if params.content_size != chunk.raw_len:
            raise ChunkDamaged(f"zstd frame declares {params.content_size} bytes, the manifest "
                               f"says {chunk.raw_len}")
        if params.window_size > _MAX_WINDOW:
            raise ChunkDamaged(f"zstd window of {params.window_size} bytes is too large")
        if params.dict_id:
            raise ChunkDamaged(f"zstd frame needs dictionary {params.dict_id}")
        try:
            # One frame of the declared size; any byte after it (even an empty frame) is an
            # error.
            return self._zstd.decompress(stored, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise ChunkDamaged(f"zstd: {exc}") from exc
