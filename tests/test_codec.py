"""The chunk codec's compress-or-not decision and the writer's batching of small chunks."""

from __future__ import annotations

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _codec, _workers

rng = np.random.default_rng(7)


def encoder(disk_bps: float = 1.5e9) -> _codec.Encoder:
    return _codec.Encoder(compression="zstd", level=1, adaptive=True, shuffle=True,
                          chunk_bytes=4 << 20, disk=_codec.DiskModel(disk_bps), threads=2)


def test_zeros_are_compressed_and_noise_is_stored_raw():
    enc = encoder()
    stored, codec, _ = enc.encode(np.zeros(3 << 20, np.uint8), 1)
    assert codec == "zstd" and len(stored) < 1000
    noise = rng.standard_normal(1 << 18).view(np.uint8)  # float64 noise barely shrinks
    assert enc.encode(noise, 8)[1] == "raw"


@pytest.mark.parametrize("chunk, probe", [(3 << 20, 16 << 10), (40 << 10, 2560),
                                          (8 << 10, 2 << 10), (1000, 1000)])
def test_the_probe_is_at_most_a_sixteenth_of_big_chunks(monkeypatch, chunk, probe):
    enc, seen = encoder(), []

    def timed(sample):
        seen.append(sample.size)
        return 0.95, 1.0  # barely shrinks and slow: never pays, one probe per chunk
    monkeypatch.setattr(enc, "_time", timed)
    assert enc.encode(np.zeros(chunk, np.uint8), 1)[1] == "raw"
    assert seen == [probe]


def test_items_bigger_than_the_probe_are_probed_whole():
    zeros = np.zeros(10 * 20000, np.uint8)  # ten items of a 20,000-byte dtype (say U5000)
    assert encoder().encode(zeros, 20000)[1] == "zstd"


def test_a_well_shrinking_probe_that_timed_slow_is_timed_again(monkeypatch):
    enc = encoder()
    timings = iter([(0.3, 1.0), (0.3, 1e-6)])  # preempted once, then at its real speed
    monkeypatch.setattr(enc, "_time", lambda sample: next(timings))
    assert enc.encode(np.zeros(1 << 20, np.uint8), 1)[1] == "zstd"

    always_slow = iter([(0.3, 1.0), (0.3, 1.0)])
    monkeypatch.setattr(enc, "_time", lambda sample: next(always_slow))
    assert enc.encode(np.zeros(1 << 20, np.uint8), 1)[1] == "raw"

    tenfold = iter([(0.05, 1.0)])  # shrinks tenfold: compressed however slow the probe looked
    monkeypatch.setattr(enc, "_time", lambda sample: next(tenfold))
    assert enc.encode(np.zeros(1 << 20, np.uint8), 1)[1] == "zstd"

    hardly_shrinks = iter([(0.95, 1.0)])  # not worth a second look
    monkeypatch.setattr(enc, "_time", lambda sample: next(hardly_shrinks))
    assert enc.encode(np.zeros(1 << 20, np.uint8), 1)[1] == "raw"


def test_small_chunks_are_batched_in_order():
    sizes = [100 << 10] * 25 + [4 << 20, 3 << 20] + [10 << 10] * 7
    runs = _workers.runs(sizes)
    assert [i for run in runs for i in run] == list(range(len(sizes)))
    totals = [sum(sizes[i] for i in run) for run in runs]
    assert all(t >= _workers.BATCH_BYTES for t in totals[:-1])
    assert list(runs[2]) == [22, 23, 24, 25]  # the 4 MiB chunk ends the run it joins
    assert list(runs[3]) == [26]                   # a big chunk alone
    assert list(runs[-1]) == list(range(27, 34))   # the short tail
    assert _workers.runs([]) == []


async def test_many_small_arrays_round_trip_in_batches(tmp_path):
    values = {f"a{i}": rng.standard_normal(int(rng.integers(1, 9000))).astype(np.float32)
              for i in range(300)}
    values["zeros"] = np.zeros(1 << 20, np.float32)
    await ac.Checkpoint(v=values).write(tmp_path / "c")
    back = (await ac.load(tmp_path / "c"))["v"]
    assert back.keys() == values.keys()
    for k, v in values.items():
        np.testing.assert_array_equal(back[k], v)


async def test_a_damaged_small_chunk_inside_a_batch_is_named(tmp_path):
    from asyncckpt import _reader
    values = {f"a{i}": rng.standard_normal(3000).astype(np.float32) for i in range(300)}
    ckpt = ac.Checkpoint(v=values)
    path = await ckpt.write(tmp_path / "c")
    manifest = await _reader.read_manifest(path)
    spec = next(s for s in manifest.arrays if s.path == "v/a150")
    chunk = spec.chunks[0]
    with open(tmp_path / "c" / chunk.file, "r+b") as f:
        f.seek(chunk.offset + chunk.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ac.CorruptCheckpointError, match="v/a150"):
        await ckpt.restore(path)
