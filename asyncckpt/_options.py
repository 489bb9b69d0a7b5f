"""Options (frozen, validated) and the metrics every save reports."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

__all__ = ["CheckpointOptions", "SaveMetrics", "parse_io_device"]

_IO_DEVICE_RE = re.compile(
    r"^/job:[A-Za-z0-9_]+(?:/replica:(?P<replica>\d+))?(?:/task:(?P<task>\d+))?"
    r"(?:/device:CPU:\d+)?$"
)


def parse_io_device(value: str | int | None) -> int | None:
    """Turn ``experimental_io_device`` into the rank that does filesystem I/O (or None).

    Accepts a plain non-negative int rank or a TensorFlow device string such as
    ``"/job:localhost"`` (rank 0) or ``"/job:worker/replica:0/task:1"`` (rank 1).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"experimental_io_device must be None, an int rank or a device string like "
            f"'/job:worker/replica:0/task:1', got {value!r}"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"experimental_io_device must be a rank >= 0, got {value!r}")
        return value
    match = _IO_DEVICE_RE.match(value)
    if match is None:
        raise ValueError(
            f"experimental_io_device {value!r} is not a device string like "
            f"'/job:localhost' or '/job:worker/replica:0/task:1'"
        )
    task = match.group("task")
    return int(task) if task is not None else 0


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions:
    """How a checkpoint is written and read. Mirrors ``tf.train.CheckpointOptions``.

    Attributes:
        experimental_io_device: As in TensorFlow, where filesystem I/O happens. Here: which
            process (rank) touches the filesystem when several processes save or restore one
            checkpoint (an int rank or a TF device string whose ``task`` is the rank); the
            other ranks stream their chunks to it and get theirs back from it. In a single
            process it is validated and has no effect.
        compression: ``"zstd"`` or ``"none"``.
        compression_level: zstd level (-7..22); 1 is the fast default.
        adaptive_compression: store a chunk compressed only when the saving measured on a
            sample pays for the CPU time at the measured disk speed; otherwise write it raw.
            ``False`` compresses every chunk (still storing raw what does not shrink).
        byte_shuffle: byte-shuffle multi-byte dtypes before compressing (better ratios on
            floats, more CPU).
        chunk_bytes: bytes per independently decodable chunk (a multiple of 4096).
        io_threads: threads that compress and checksum chunks while one more thread writes
            them (and threads that read and decode on restore).
        fsync: fsync files and directories before publishing (only turn off for tests).
        page_lock: page-lock (``mlock``) the staging buffers where the OS allows.
        staging_budget_bytes: most staging memory that snapshots may hold at once; a
            snapshot that would exceed it waits for an earlier save to release its buffers.
            ``None``: two snapshots' worth (one writing while the next is taken).
        low_priority_threads: run background compress/write threads at the lowest CPU
            priority (Linux ``nice 19``) so a training step keeps its cores.
        coordination_timeout: with several processes (``torch.distributed``), the most
            seconds a rank waits for the others during a save; the error names each rank
            that did not arrive.
        check_replicated: debug check that values matched by ``Checkpoint(replicated=...)``
            really are equal on every rank (each rank checksums them during its snapshot;
            a mismatch fails the save naming the key and the ranks).
        device_staging: CUDA tensors are first copied, in one batched on-device copy, into
            spare device memory, and the snapshot ends there: the caller may change its
            tensors while the device-to-host copy into page-locked memory runs in the
            background. Costs one extra device copy of the CUDA tensors' bytes per GPU while
            that copy runs. When that much device memory is not free, the snapshot takes the
            direct path (``SaveMetrics.device_staged`` is then False). No effect without CUDA
            tensors.
    """

    experimental_io_device: str | int | None = None
    compression: str = "zstd"
    compression_level: int = 1
    adaptive_compression: bool = True
    byte_shuffle: bool = True
    chunk_bytes: int = 4 << 20
    io_threads: int = 2
    fsync: bool = True
    page_lock: bool = True
    staging_budget_bytes: int | None = None
    low_priority_threads: bool = True
    coordination_timeout: float = 600.0
    check_replicated: bool = False
    device_staging: bool = False

    def __post_init__(self) -> None:
        if (isinstance(self.coordination_timeout, bool)
                or not isinstance(self.coordination_timeout, (int, float))
                or not 0 < self.coordination_timeout < float("inf")):
            raise ValueError(f"coordination_timeout must be a positive number of seconds, got "
                             f"{self.coordination_timeout!r}")
        parse_io_device(self.experimental_io_device)
        if self.compression not in ("zstd", "none"):
            raise ValueError(f"compression must be 'zstd' or 'none', got {self.compression!r}")
        _check_int("compression_level", self.compression_level, -7, 22)
        _check_int("chunk_bytes", self.chunk_bytes, 4096, 1 << 30)
        if self.chunk_bytes % 4096:
            raise ValueError(
                f"chunk_bytes must be a positive multiple of 4096, got {self.chunk_bytes}"
            )
        _check_int("io_threads", self.io_threads, 1, 64)
        if self.staging_budget_bytes is not None:
            _check_int("staging_budget_bytes", self.staging_budget_bytes, 1, 1 << 50)
        for name in ("adaptive_compression", "byte_shuffle", "fsync", "page_lock",
                     "low_priority_threads", "check_replicated", "device_staging"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def io_rank(self) -> int | None:
        """The rank named by ``experimental_io_device`` (None when unset)."""
        return parse_io_device(self.experimental_io_device)

    def replace(self, **changes: object) -> CheckpointOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class SaveMetrics:
    """What one save did.

    Attributes:
        raw_bytes: bytes of array data snapshotted.
        stored_bytes: bytes written to shard files.
        snapshot_seconds: the blocking part: until the caller may change its arrays.
        total_seconds: from the call until the checkpoint was durable and published.
        page_locked: whether the staging buffers are page-locked.
        chunks: chunks written; compressed_chunks: of those, stored compressed.
        device_staged: whether CUDA tensors went through spare device memory
            (``CheckpointOptions(device_staging=True)``; False when it fell back).
    """

    raw_bytes: int
    stored_bytes: int
    snapshot_seconds: float
    total_seconds: float
    page_locked: bool
    chunks: int = 0
    compressed_chunks: int = 0
    device_staged: bool = False

    @property
    def compression_ratio(self) -> float:
        """stored / raw (1.0 when nothing was saved)."""
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0
