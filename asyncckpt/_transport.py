"""Byte streams between ranks, for ``CheckpointOptions(experimental_io_device=...)``.

When one rank (the I/O rank) does all file access, the other ranks stream their encoded
chunks to it when saving, and it streams stored chunks back to them when restoring. The
bytes travel over a gloo process group created once per checkpoint for this purpose only,
so they never interleave with the training's own collectives; each stream is used by one
thread at a time, in an order every rank derives from the same calls.

A stream is a sequence of frames: a header ``[size, kind]`` (two int64) followed, for a
data frame, by ``size`` bytes. It ends with an ``END`` frame, or an ``ABORT`` frame when the
sending side failed (its own error reaches the I/O rank through the store). Memory in flight
is one chunk per stream at each end.
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np

__all__ = ["Channel", "SendSink", "DATA", "END", "ABORT", "StreamAborted"]

DATA, END, ABORT = 1, 2, 3
_MAX_FRAME = 1 << 31


class StreamAborted(Exception):
    """The sending rank gave up on this stream (its error is reported separately)."""


class Channel:
    """Point-to-point frames between the ranks of the checkpoint's own gloo group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    @classmethod
    def create(cls, process_group: Any, timeout: float) -> Channel:
        """A new gloo group over ``process_group``'s ranks. Collective: every rank of the
        default group must call it, in the same order as any other ``new_group``."""
        import torch.distributed as dist
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        group = dist.new_group(ranks=ranks, backend="gloo",
                               timeout=datetime.timedelta(seconds=timeout))
        return cls(group)

    def _tensor(self, data: Any) -> Any:
        import torch
        array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        if not array.flags.writeable:  # gloo only reads it, but torch wants writable memory
            array = array.copy()
        return torch.from_numpy(array)

    def send(self, dst: int, kind: int, data: Any = None) -> None:
        import torch
        import torch.distributed as dist
        size = 0 if data is None else memoryview(data).nbytes
        dist.send(torch.tensor([size, kind], dtype=torch.int64), group=self.group,
                  group_dst=dst)
        if size:
            dist.send(self._tensor(data), group=self.group, group_dst=dst)

    def recv_header(self, src: int) -> tuple[int, int]:
        import torch
        import torch.distributed as dist
        header = torch.empty(2, dtype=torch.int64)
        dist.recv(header, group=self.group, group_src=src)
        size, kind = (int(v) for v in header.tolist())
        if kind not in (DATA, END, ABORT) or not 0 <= size < _MAX_FRAME:
            raise ValueError(f"rank {src} sent a malformed frame header {[size, kind]}")
        return size, kind

    def recv_into(self, src: int, out: np.ndarray) -> None:
        import torch
        import torch.distributed as dist
        dist.recv(torch.from_numpy(out), group=self.group, group_src=src)


class SendSink:
    """Where a shard's encoded chunks go on a rank that does no file I/O: to the I/O rank."""

    def __init__(self, channel: Channel, dst: int) -> None:
        self.channel, self.dst, self.ended = channel, dst, False

    def write(self, data: memoryview | bytes) -> None:
        self.channel.send(self.dst, DATA, data)

    def finish(self) -> None:
        self.ended = True
        self.channel.send(self.dst, END)

    def close(self) -> None:
        if not self.ended:  # failed: tell the receiver, if the stream still works
            self.ended = True
            try:
                self.channel.send(self.dst, ABORT)
            except Exception:
                pass


def receive_shard(channel: Channel, src: int, sink: Any) -> int:
    """On the I/O rank: hand rank ``src``'s stream to ``sink`` (the writer's ``FileSink``
    for that rank's shard) and finish it (fsync). Returns the bytes written; raises
    ``StreamAborted`` if the sender gave up.

    After a write failure it keeps receiving (and dropping) until the stream ends, so the
    sender is never left blocked; then it raises that failure.
    """
    written = 0
    buffer = np.empty(0, np.uint8)
    failure: BaseException | None = None
    try:
        while True:
            size, kind = channel.recv_header(src)
            if kind == ABORT:
                raise StreamAborted(f"rank {src} aborted its stream")
            if kind == END:
                break
            if buffer.size < size:
                buffer = np.empty(size, np.uint8)
            chunk = buffer[:size]
            if size:
                channel.recv_into(src, chunk)
            if failure is not None:
                continue
            try:
                sink.write(memoryview(chunk))
                written += size
            except OSError as exc:
                failure = exc
        if failure is not None:
            raise failure
        sink.finish()
    finally:
        sink.close()
    return written


class ChunkReceiver:
    """A restore's chunk source on a rank that does no file I/O: the I/O rank sends each
    chunk's stored bytes, in :func:`._reader.chunk_order`; the receiver verifies them as if
    it had read them (end to end: the CRC is checked after the trip)."""

    def __init__(self, channel: Channel, src: int, why: Any) -> None:
        self.channel, self.src, self.why = channel, src, why
        self.ended = False

    def _header(self, expect: int) -> int:
        size, kind = self.channel.recv_header(self.src)
        self.ended = kind != DATA
        if kind == ABORT:
            raise StreamAborted(self.why())
        if kind != expect:
            raise ValueError(f"rank {self.src} sent frame kind {kind} where {expect} was due")
        return size

    def fetch(self, chunk: Any, into: memoryview) -> None:
        size = self._header(DATA)
        if size != into.nbytes:
            if size:  # take it off the stream anyway, so that it stays in step
                self.channel.recv_into(self.src, np.empty(size, np.uint8))
            raise ValueError(f"rank {self.src} sent {size} bytes for a chunk of "
                             f"{into.nbytes}")
        if size:
            self.channel.recv_into(self.src, np.frombuffer(into, np.uint8))

    def fetch_end(self) -> None:
        self._header(END)

    def close(self) -> None:
        """Read (and drop) what the sender still sends, up to its end: a receiver that
        stopped early (a damaged chunk) must not leave the sender blocked, nor the stream
        out of step for the next operation."""
        while not self.ended:
            size, kind = self.channel.recv_header(self.src)
            self.ended = kind != DATA
            if size and kind == DATA:
                self.channel.recv_into(self.src, np.empty(size, np.uint8))


def send_chunks(channel: Channel, dst: int, shards: Any, order: list[Any]) -> None:
    """On the I/O rank: read the chunks in ``order`` (from ``_reader.chunk_order``) and send
    their stored bytes to ``dst``, then ``END``. On failure the caller sends ``ABORT``."""
    buffer = np.empty(0, np.uint8)
    for _, _, chunk in order:
        if buffer.size < chunk.stored_len:
            buffer = np.empty(chunk.stored_len, np.uint8)
        part = buffer[:chunk.stored_len]
        shards.fetch(chunk, memoryview(part))
        channel.send(dst, DATA, part)
    channel.send(dst, END)
