"""The save pipeline: snapshot isolation, pool reuse, loop responsiveness, publication."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import threading
import time

import anyio
import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _fs


async def test_mutating_arrays_after_the_snapshot_does_not_change_the_checkpoint(
        tmp_path, monkeypatch):
    w = np.arange(1 << 20, dtype=np.float32)
    expected = w.copy()
    mutated = threading.Event()
    real_open = _fs.open_new

    def open_then_mutate(path):
        # Runs in a background worker after the snapshot: the caller changes its array now.
        if not mutated.is_set():
            w[:] = -1.0
            mutated.set()
        return real_open(path)

    monkeypatch.setattr(_fs, "open_new", open_then_mutate)
    ckpt = ac.Checkpoint(w=w)
    path = await ckpt.write(tmp_path / "c")
    assert mutated.is_set() and (w == -1.0).all()
    assert np.array_equal((await ac.load(path))["w"], expected)


def test_pool_is_allocated_once_across_event_loops(tmp_path):
    ckpt = ac.Checkpoint(w=np.ones((256, 1024), np.float32), b=np.zeros(10))
    for i in range(10):
        ckpt.w[0, 0] = i
        anyio.run(ckpt.write, str(tmp_path / f"c{i}"), backend="asyncio")
    assert ckpt._pool.allocations == 1
    loaded = anyio.run(ac.load, str(tmp_path / "c9"), backend="asyncio")
    assert loaded["w"][0, 0] == 9


async def test_event_loop_keeps_ticking_during_a_save(tmp_path):
    state = {"w": np.random.default_rng(0).standard_normal(24 << 20 >> 3)}  # 24 MiB
    ckpt = ac.Checkpoint(s=state)
    await ckpt.write(tmp_path / "warm")  # allocate the pool outside the measurement
    gaps: list[float] = []
    stop = anyio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.01)
        started = time.perf_counter()
        for i in range(3):
            await ckpt.write(tmp_path / f"c{i}")
        elapsed = time.perf_counter() - started
        stop.set()
    # The loop ran all along: ticks cover the save, and no single stall took a big share.
    assert len(gaps) > 10
    assert max(gaps) < max(0.05, elapsed / 4), (max(gaps), elapsed)


def test_options_are_validated_with_field_names():
    for kwargs, field in [({"compression": "lz4"}, "compression"),
                          ({"compression_level": 99}, "compression_level"),
                          ({"chunk_bytes": 1000}, "chunk_bytes"),
                          ({"io_threads": 0}, "io_threads"),
                          ({"fsync": "yes"}, "fsync"),
                          ({"staging_budget_bytes": 0}, "staging_budget_bytes"),
                          ({"experimental_io_device": "/gpu:0"}, "experimental_io_device"),
                          ({"experimental_io_device": -1}, "experimental_io_device"),
                          ({"coordination_timeout": 0}, "coordination_timeout"),
                          ({"coordination_timeout": -1.0}, "coordination_timeout")]:
        with pytest.raises(ValueError, match=field):
            ac.CheckpointOptions(**kwargs)
    with pytest.raises(TypeError):
        ac.CheckpointOptions(1)  # keyword-only
    opts = ac.CheckpointOptions(experimental_io_device="/job:worker/replica:0/task:3/device:CPU:0")
    assert opts.io_rank == 3
    assert ac.CheckpointOptions(experimental_io_device="/job:localhost").io_rank == 0
    assert ac.CheckpointOptions(experimental_io_device=2).io_rank == 2
    with pytest.raises(Exception):
        opts.fsync = False  # frozen


async def test_failed_publish_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(x=np.ones(1000))
    path = await ckpt.write(tmp_path / "c")
    ckpt.x = np.zeros(1000)
    calls = {"n": 0}
    real = _fs.exchange

    def failing_exchange(a, b):
        calls["n"] += 1
        raise OSError(errno.EIO, "injected", a)

    monkeypatch.setattr(_fs, "exchange", failing_exchange)
    with pytest.raises(ac.SaveError, match="injected") as info:
        await ckpt.write(tmp_path / "c")
    assert isinstance(info.value.__cause__, OSError)
    assert calls["n"] == 1
    assert os.listdir(tmp_path) == ["c"]  # the temporary directory is gone
    assert np.array_equal((await ac.load(path))["x"], np.ones(1000))
    monkeypatch.setattr(_fs, "exchange", real)
    await ckpt.write(tmp_path / "c")
    assert np.array_equal((await ac.load(path))["x"], np.zeros(1000))


async def test_failed_shard_fsync_publishes_nothing(tmp_path, monkeypatch):
    def eio(fd):
        raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(_fs, "fsync", eio)
    ckpt = ac.Checkpoint(x=np.ones(1000))
    with pytest.raises(ac.SaveError, match=r"errno 5"):
        await ckpt.write(tmp_path / "c")
    assert os.listdir(tmp_path) == []


async def test_exchange_fallback_replaces_via_an_old_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(_fs, "exchange", lambda a, b: False)
    ckpt = ac.Checkpoint(x=np.ones(10))
    path = await ckpt.write(tmp_path / "c")
    ckpt.x = np.zeros(10)
    await ckpt.write(tmp_path / "c")
    assert os.listdir(tmp_path) == ["c"]
    assert np.array_equal((await ac.load(path))["x"], np.zeros(10))


async def test_cancelling_a_write_leaves_no_trace(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_write = _fs.write_all

    def slow_write(fd, data):
        entered.set()
        release.wait(10)
        real_write(fd, data)

    monkeypatch.setattr(_fs, "write_all", slow_write)
    ckpt = ac.Checkpoint(x=np.ones(1 << 20))
    async with anyio.create_task_group() as tg:
        tg.start_soon(ckpt.write, str(tmp_path / "c"))
        await anyio.to_thread.run_sync(entered.wait, 10)
        tg.cancel_scope.cancel()
        release.set()
    assert os.listdir(tmp_path) == []
    assert ckpt._pool._held == 0  # the staging memory went back to the pool


async def test_saves_from_asyncio_directly(tmp_path):
    ckpt = ac.Checkpoint(x=np.arange(5))
    path = await asyncio.wait_for(ckpt.write(tmp_path / "c"), 30)
    assert (await ac.load(path))["x"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
async def test_background_threads_run_at_the_lowest_priority():
    from asyncckpt._workers import WorkerThreads

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert await WorkerThreads(low_priority=True).run(priority, on_cancel=lambda: None) == 19
    assert await WorkerThreads(low_priority=False).run(priority, on_cancel=lambda: None) == \
        os.getpriority(os.PRIO_PROCESS, 0)
