"""Background saves: fire-and-forget, overlap, errors on every path, cancellation, sync face."""

from __future__ import annotations

import errno
import os
import threading
import time

import anyio
import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _fs, _writer


def state(n: int = 1 << 16) -> dict:
    return {"w": np.arange(n, dtype=np.float32), "b": np.zeros(10)}


class Gate:
    """Blocks a filesystem call in a worker thread until the test opens it."""

    def __init__(self, monkeypatch, name: str, match=lambda *a: True) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        real = getattr(_fs, name)

        def gated(*args):
            if match(*args):
                self.entered.set()
                assert self.opened.wait(20), "gate never opened"
            return real(*args)

        monkeypatch.setattr(_fs, name, gated)

    async def wait_entered(self) -> None:
        assert await anyio.to_thread.run_sync(self.entered.wait, 20)


async def test_fire_and_forget_then_exit_commits(tmp_path):
    ckpt = ac.Checkpoint(model=state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2) as manager:
        for _ in range(3):
            handle = await manager.start_save()
            assert handle is not None and handle.path.endswith(f"-{ckpt.save_counter}")
    assert manager.latest_checkpoint == str(tmp_path / "ckpt-3")
    assert manager.checkpoints == [str(tmp_path / "ckpt-2"), str(tmp_path / "ckpt-3")]
    assert sorted(e for e in os.listdir(tmp_path) if not e.startswith(".")) == [
        "checkpoint", "ckpt-2", "ckpt-3"]


async def test_start_save_returns_after_the_snapshot_and_arrays_may_change(
        tmp_path, monkeypatch):
    gate = Gate(monkeypatch, "open_new", lambda path: "shard" in path)
    w = np.arange(1 << 16, dtype=np.float32)
    ckpt = ac.Checkpoint(w=w)
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1) as manager:
        handle = await manager.start_save()
        await gate.wait_entered()
        assert not handle.done() and handle.metrics is None
        assert manager.latest_checkpoint is None  # committed state only
        w[:] = -1  # training goes on
        gate.opened.set()
        assert await handle.wait() == handle.path
        assert handle.done() and handle.metrics.raw_bytes == w.nbytes
        assert 0 < handle.metrics.snapshot_seconds <= handle.metrics.total_seconds
    assert np.array_equal((await ac.load(handle.path))["w"], np.arange(1 << 16, dtype=np.float32))


async def test_overlapping_saves_commit_in_order_within_the_budget(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(model=state(1 << 18))  # 1 MiB
    options = ac.CheckpointOptions(staging_budget_bytes=1)  # one arena at a time
    peak = {"held": 0}
    real_release = ckpt._pool.release

    def release(arena):
        peak["held"] = max(peak["held"], ckpt._pool._held)
        real_release(arena)

    monkeypatch.setattr(ckpt._pool, "release", release)
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=None,
                                    options=options) as manager:
        handles = []
        for i in range(6):
            ckpt.model["w"][0] = i
            handles.append(await manager.start_save())
        paths = [await h.wait() for h in handles]
    assert paths == [str(tmp_path / f"ckpt-{i}") for i in range(1, 7)]
    assert manager.checkpoints == paths
    for i, path in enumerate(paths):
        assert (await ac.load(path))["model"]["w"][0] == i
    assert ckpt._pool.allocations == 1 and peak["held"] <= ckpt._pool.total_bytes
    assert ckpt._pool.total_bytes < 2 * (1 << 20) + (2 << 20)


async def test_default_budget_lets_one_save_write_while_the_next_snapshots(tmp_path, monkeypatch):
    gate = Gate(monkeypatch, "open_new", lambda path: "shard" in path)
    ckpt = ac.Checkpoint(model=state(1 << 18))
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=None) as manager:
        first = await manager.start_save()
        await gate.wait_entered()
        with anyio.fail_after(10):
            second = await manager.start_save()  # does not wait for the first's write
        third_started = anyio.Event()

        async def third() -> None:
            await manager.start_save()
            third_started.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(third)
            await anyio.sleep(0.2)
            assert not third_started.is_set()  # budget of two snapshots: backpressure
            gate.opened.set()
        await first.wait()
        await second.wait()
    assert len(manager.checkpoints) == 3


def failing_fsync(monkeypatch, times: int | None):
    calls = {"n": 0}
    real = _fs.fsync

    def fsync(fd):
        calls["n"] += 1
        if times is None or calls["n"] <= times:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(_fs, "fsync", fsync)
    return calls


async def test_error_reaches_handle_wait(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(model=state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2) as manager:
        first = await (await manager.start_save()).wait()
        failing_fsync(monkeypatch, times=None)
        handle = await manager.start_save()
        with pytest.raises(ac.SaveError, match="Input/output error") as info:
            await handle.wait()
        assert isinstance(info.value.__cause__, OSError)
        monkeypatch.undo()
    assert manager.latest_checkpoint == first
    assert not any("asyncckpt-tmp" in e for e in os.listdir(tmp_path))
    assert np.array_equal((await ac.load(first))["model"]["w"], state()["w"])


async def test_unwaited_error_reaches_the_next_start_save(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(model=state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2) as manager:
        failing_fsync(monkeypatch, times=1)
        handle = await manager.start_save()
        while not handle.done():
            await anyio.sleep(0.01)
        with pytest.raises(ac.SaveError, match="Input/output error"):
            await manager.start_save()
        path = await manager.save()  # reported once; the fault is gone
    assert manager.latest_checkpoint == path


async def test_unwaited_error_reaches_wait_until_finished(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(model=state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2) as manager:
        failing_fsync(monkeypatch, times=1)
        await manager.start_save()
        with pytest.raises(ac.SaveError):
            await manager.wait_until_finished()
        await manager.wait_until_finished()  # reported once


async def test_unwaited_error_reaches_the_close(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(model=state())
    failing_fsync(monkeypatch, times=None)
    with pytest.raises(ac.SaveError, match="Input/output error"):
        async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2) as manager:
            await manager.start_save()
    assert manager.latest_checkpoint is None
    assert [e for e in os.listdir(tmp_path) if not e.startswith(".")] == []


async def test_start_save_needs_the_manager_entered(tmp_path):
    manager = ac.CheckpointManager(ac.Checkpoint(), tmp_path, max_to_keep=1)
    with pytest.raises(RuntimeError, match="async with"):
        await manager.start_save()
    assert await manager.save() is not None  # save() works without entering


async def test_cancelling_a_waiter_does_not_stop_the_save(tmp_path, monkeypatch):
    gate = Gate(monkeypatch, "open_new", lambda path: "shard" in path)
    ckpt = ac.Checkpoint(model=state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1) as manager:
        handle = await manager.start_save()
        with anyio.move_on_after(0.05) as scope:
            await handle.wait()
        assert scope.cancelled_caught and not handle.done()
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.save)   # its waiter is cancelled below
            while ckpt.save_counter < 2:  # until its snapshot is taken
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
        gate.opened.set()
        await handle.wait()
    assert manager.checkpoints == [str(tmp_path / "ckpt-2")]


async def test_cancelling_during_the_snapshot_leaves_no_trace(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_copy = _writer._copy_all

    def slow_copy(jobs):
        entered.set()
        release.wait(20)
        real_copy(jobs)

    monkeypatch.setattr(_writer, "_copy_all", slow_copy)
    ckpt = ac.Checkpoint(model=state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1) as manager:
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.start_save)
            assert await anyio.to_thread.run_sync(entered.wait, 20)
            tg.cancel_scope.cancel()
            release.set()
        assert ckpt._pool._held == 0
    assert [e for e in os.listdir(tmp_path) if not e.startswith(".")] == []
    assert manager.latest_checkpoint is None


async def test_event_loop_stays_responsive_during_background_saves(tmp_path):
    rng = np.random.default_rng(0)
    ckpt = ac.Checkpoint(model={"w": rng.standard_normal(3 << 20, dtype=np.float32)})
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1) as manager:
        await manager.save()  # warm the pool
        gaps: list[float] = []
        handle = await manager.start_save()
        last = time.perf_counter()
        while not handle.done():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        await handle.wait()
    assert len(gaps) >= 3
    assert max(gaps) < 0.05, max(gaps)


def test_sync_manager_from_a_plain_thread(tmp_path):
    ckpt = ac.Checkpoint(model=state(), step=0)
    result = {}

    def training_loop():
        with ac.SyncCheckpointManager(ckpt, tmp_path, max_to_keep=2) as manager:
            assert manager.restore_or_initialize() is None
            handles = []
            for step in range(3):
                ckpt.step = step
                ckpt.model["w"][0] = step
                handles.append(manager.start_save())
            assert handles[-1].wait() == handles[-1].path
            path = manager.save()
            manager.wait_until_finished()
            result["latest"], result["kept"] = manager.latest_checkpoint, manager.checkpoints
            result["path"] = path

    thread = threading.Thread(target=training_loop)
    thread.start()
    thread.join(60)
    assert result["latest"] == result["path"] == str(tmp_path / "ckpt-4")
    assert result["kept"] == [str(tmp_path / "ckpt-3"), str(tmp_path / "ckpt-4")]
    restored = ac.Checkpoint(model=state(), step=-1)
    with ac.SyncCheckpointManager(restored, tmp_path, max_to_keep=2) as manager:
        assert manager.restore_or_initialize() == result["latest"]
    assert restored.step == 2 and restored.model["w"][0] == 2


def test_sync_manager_raises_background_errors_on_close(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(model=state())
    manager = ac.SyncCheckpointManager(ckpt, tmp_path, max_to_keep=2)
    failing_fsync(monkeypatch, times=None)
    handle = manager.start_save()
    with pytest.raises(ac.SaveError):
        manager.close()
    assert handle.done()
    with pytest.raises(RuntimeError, match="closed"):
        manager.save()


def test_sync_manager_finishes_in_flight_saves_at_interpreter_exit(tmp_path):
    import subprocess
    import sys
    script = (
        "import sys, numpy as np, asyncckpt as ac\n"
        "ckpt = ac.Checkpoint(w=np.arange(1 << 20, dtype=np.float32))\n"
        "m = ac.SyncCheckpointManager(ckpt, sys.argv[1], max_to_keep=2)\n"
        "m.start_save()\n"
        "ckpt.w[:] = -1\n"   # the caller moves on and exits without closing
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ac.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")
    loaded = anyio.run(ac.load, str(tmp_path / "ckpt-1"))
    assert np.array_equal(loaded["w"], np.arange(1 << 20, dtype=np.float32))


async def test_wait_returns_before_retired_files_are_deleted_and_a_late_error_surfaces(
        tmp_path, monkeypatch):
    """A background save is acknowledged once committed; deleting the checkpoint it retired
    (already renamed away) follows, and a failure there reaches the next wait."""
    release, entered = threading.Event(), threading.Event()
    real = _fs.remove_tree

    def blocked_then_failing(path):
        entered.set()
        release.wait()
        raise OSError(errno.EIO, "Input/output error", path)
    ckpt = ac.Checkpoint(**state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1) as manager:
        first = await manager.save()
        monkeypatch.setattr(_fs, "remove_tree", blocked_then_failing)
        handle = await manager.start_save()
        try:
            with anyio.fail_after(20):  # would wait forever if it waited for the deletion
                assert await handle.wait() == handle.path and handle.done()
        finally:
            timed_out = not handle.done()
            if timed_out:
                release.set()
        assert not timed_out
        assert not os.path.exists(first)  # gone under its name already
        assert manager.checkpoints == [handle.path]
        await anyio.to_thread.run_sync(entered.wait)
        release.set()
        with pytest.raises(ac.SaveError, match="deleting the checkpoints it retired failed"):
            await manager.wait_until_finished()
    monkeypatch.setattr(_fs, "remove_tree", real)
    async with ac.CheckpointManager(ac.Checkpoint(**state()), tmp_path, max_to_keep=1) as m:
        assert m.latest_checkpoint == handle.path
    assert sorted(os.listdir(tmp_path)) == [".asyncckpt-lock", ".asyncckpt-owner", "checkpoint",
                                            "ckpt-2"]


def test_sync_manager_logs_a_save_that_fails_while_closing_at_interpreter_exit(tmp_path):
    """At exit nobody is left to raise a background save's error to: the atexit close logs
    it (logger "asyncckpt", with the path and the cause) and the interpreter exits as usual."""
    import subprocess
    import sys
    script = (
        "import errno, logging, sys, numpy as np, asyncckpt as ac\n"
        "from asyncckpt import _fs\n"
        "logging.basicConfig(format='LOGGED %(name)s %(levelname)s: %(message)s')\n"
        "ckpt = ac.Checkpoint(w=np.arange(1 << 20, dtype=np.float32))\n"
        "m = ac.SyncCheckpointManager(ckpt, sys.argv[1], max_to_keep=2)\n"
        "m.save()\n"                                 # ckpt-1 committed
        "def fsync(fd):\n"
        "    raise OSError(errno.EIO, 'Input/output error')\n"
        "_fs.fsync = fsync\n"                        # the disk fails from here on
        "m.start_save()\n"                           # ckpt-2 fails in the background ...
        "ckpt.w[:] = -1\n"                           # ... after the caller exits, unclosed
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=120,
                          capture_output=True, text=True)
    # The hook catches the error, so the exit status is the interpreter's own: 0.
    assert done.returncode == 0, done.stderr
    marker = "LOGGED asyncckpt ERROR: "
    assert done.stderr.count(marker) == 1, done.stderr
    record = done.stderr.split(marker, 1)[1]
    assert record.startswith("asyncckpt: a background save failed while closing at exit")
    # The logged traceback names the failed save's path and its cause.
    assert "SaveError" in record and str(tmp_path / "ckpt-2") in record, record
    assert "OSError: [Errno 5] Input/output error" in record, record
    assert "Exception ignored" not in done.stderr, done.stderr  # not left to the interpreter
    assert ac.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")
    assert sorted(e for e in os.listdir(tmp_path) if not e.startswith(".")) == [
        "checkpoint", "ckpt-1"]
    assert not any("asyncckpt-tmp" in e for e in os.listdir(tmp_path))


async def test_save_on_an_entered_manager_returns_after_the_retired_files_are_gone(
        tmp_path, monkeypatch):
    """Only SaveHandle.wait() returns before the deletion; save() waits for it, as
    TensorFlow's save does."""
    release, entered = threading.Event(), threading.Event()
    real = _fs.remove_tree

    def gated(path):
        entered.set()
        release.wait()
        return real(path)
    ckpt = ac.Checkpoint(**state())
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1) as manager:
        await manager.save()
        monkeypatch.setattr(_fs, "remove_tree", gated)
        saved = []

        async def save() -> None:
            saved.append(await manager.save())
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(save)
                await anyio.to_thread.run_sync(entered.wait)  # the deletion has begun
                await anyio.wait_all_tasks_blocked()
                assert saved == []  # ... and save() has not returned
                release.set()
        finally:
            release.set()
        assert saved and not [e for e in os.listdir(tmp_path) if "deleting" in e]
