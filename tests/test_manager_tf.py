"""TensorFlow's CheckpointManagerTest cases, one test each, against CheckpointManager.

Time is mocked the way TF's tests mock it: the manager module's ``time`` is replaced.
"""

from __future__ import annotations

import logging
import os
import pathlib
import types

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _directory, _manager


def exists(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "manifest.json"))


def state_of(directory):
    return _directory.read_state_sync(os.fspath(directory))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock(0.0)
    monkeypatch.setattr(_manager, "time", types.SimpleNamespace(time=fake.time))
    return fake


def new_ckpt(**values):
    return ac.Checkpoint(**values)


async def test_deletion(tmp_path):
    manager = ac.CheckpointManager(new_ckpt(), tmp_path, max_to_keep=3)
    paths = [await manager.save() for _ in range(4)]
    assert [exists(p) for p in paths] == [False, True, True, True]


async def test_keep_all(tmp_path):
    ckpt = new_ckpt()
    directory = tmp_path / "d"
    manager = ac.CheckpointManager(ckpt, directory, max_to_keep=None)
    first, second, third = [await manager.save() for _ in range(3)]
    assert all(map(exists, (first, second, third)))
    assert manager.latest_checkpoint == third
    assert manager.checkpoints == [first, second, third]
    manager = ac.CheckpointManager(ckpt, directory, max_to_keep=None)
    fourth = await manager.save()
    assert manager.checkpoints == [first, second, third, fourth]
    manager = ac.CheckpointManager(ckpt, directory, max_to_keep=3)
    assert manager.checkpoints == [first, second, third, fourth]
    assert all(map(exists, (first, second, third, fourth)))
    fifth = await manager.save()
    assert manager.checkpoints == [third, fourth, fifth]
    assert [exists(p) for p in (first, second, third, fourth, fifth)] == [
        False, False, True, True, True]


async def test_save_restore_state(tmp_path, clock):
    d = str(tmp_path)
    clock.now = 3.0
    ckpt = new_ckpt()
    first_manager = ac.CheckpointManager(ckpt, d, max_to_keep=2)
    first_time = 10000.0
    first_name = os.path.join(d, "ckpt-1")
    clock.now = first_time
    await first_manager.save()
    second_time = first_time + 3610.0
    second_name = os.path.join(d, "ckpt-2")
    clock.now = second_time
    await first_manager.save()
    assert list(state_of(d).all_model_checkpoint_timestamps) == [first_time, second_time]
    assert first_manager.checkpoints == [first_name, second_name]
    assert first_manager.latest_checkpoint == second_name
    del first_manager

    second_manager = ac.CheckpointManager(ckpt, d, max_to_keep=2,
                                          keep_checkpoint_every_n_hours=1.5)
    assert second_manager.checkpoints == [first_name, second_name]
    assert second_manager.latest_checkpoint == second_name
    third_name = os.path.join(d, "ckpt-3")
    third_time = second_time + 3600.0 * 0.2
    clock.now = third_time
    await second_manager.save()
    assert exists(first_name) and exists(second_name)
    assert second_manager.checkpoints == [second_name, third_name]
    assert state_of(d).last_preserved_timestamp == first_time
    fourth_time = third_time + 3600.0 * 0.5
    clock.now = fourth_time
    fourth_name = os.path.join(d, "ckpt-4")
    await second_manager.save()
    assert exists(first_name) and not exists(second_name)
    assert second_manager.checkpoints == [third_name, fourth_name]
    fifth_time = fourth_time + 3600.0 * 0.5
    clock.now = fifth_time
    fifth_name = os.path.join(d, "ckpt-5")
    await second_manager.save()
    assert second_manager.checkpoints == [fourth_name, fifth_name]
    assert state_of(d).last_preserved_timestamp == first_time
    del second_manager

    third_manager = ac.CheckpointManager(ckpt, d, max_to_keep=2,
                                         keep_checkpoint_every_n_hours=1.5)
    assert third_manager.latest_checkpoint == fifth_name
    clock.now += 10.0
    await third_manager.save()
    sixth_name = os.path.join(d, "ckpt-6")
    assert state_of(d).last_preserved_timestamp == fourth_time
    assert [exists(p) for p in (first_name, fourth_name, fifth_name, sixth_name)] == [True] * 4
    assert not exists(second_name) and not exists(third_name)
    assert third_manager.checkpoints == [fifth_name, sixth_name]
    # The state file is TensorFlow's text format, byte for byte.
    assert open(os.path.join(d, "checkpoint")).read() == (
        'model_checkpoint_path: "ckpt-6"\n'
        'all_model_checkpoint_paths: "ckpt-5"\n'
        'all_model_checkpoint_paths: "ckpt-6"\n'
        'all_model_checkpoint_timestamps: 17930.0\n'
        'all_model_checkpoint_timestamps: 17940.0\n'
        'last_preserved_timestamp: 16130.0\n')


async def test_continue_from_unmanaged(tmp_path):
    prefix = os.path.join(tmp_path, "unusual_prefix")
    ckpt = new_ckpt()
    first = await ckpt.save(prefix)
    second = await ckpt.save(prefix)
    assert open(tmp_path / "checkpoint").read() == (
        'model_checkpoint_path: "unusual_prefix-2"\n'
        'all_model_checkpoint_paths: "unusual_prefix-2"\n')
    ckpt = new_ckpt()
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
    await ckpt.restore(manager.latest_checkpoint)
    assert ckpt.save_counter == 2
    third = await manager.save()
    assert manager.checkpoints == [third]
    fourth = await manager.save()
    assert manager.checkpoints == [third, fourth]
    fifth = await manager.save()
    assert manager.checkpoints == [fourth, fifth]
    assert [exists(p) for p in (first, second, third, fourth, fifth)] == [
        True, True, False, True, True]


async def test_clock_reset(tmp_path, clock, caplog):
    d = str(tmp_path)
    clock.now = 10000.0
    ckpt = new_ckpt()
    first_manager = ac.CheckpointManager(ckpt, d, max_to_keep=1, keep_checkpoint_every_n_hours=1.0)
    first = await first_manager.save()
    clock.now += 3600.0
    second = await first_manager.save()
    clock.now += 3600.0
    third = await first_manager.save()
    assert not exists(first) and exists(second) and exists(third)
    assert first_manager.checkpoints == [third]
    assert state_of(d).last_preserved_timestamp == 13600.0
    clock.now = 5000.0
    del first_manager
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        second_manager = ac.CheckpointManager(ckpt, d, max_to_keep=1)
    assert "behind the last preserved checkpoint timestamp" in caplog.text
    assert exists(second)
    assert second_manager.latest_checkpoint == third
    assert second_manager.checkpoints == []
    clock.now += 10.0
    fourth = await second_manager.save()
    assert exists(second) and exists(third)
    assert second_manager.latest_checkpoint == fourth
    assert second_manager.checkpoints == [fourth]
    clock.now += 10.0
    fifth = await second_manager.save()
    assert exists(second) and exists(third)
    assert second_manager.checkpoints == [fifth]
    state = state_of(d)
    assert state.last_preserved_timestamp == 5000.0
    assert list(state.all_model_checkpoint_timestamps) == [5020.0]


async def test_custom_numbering(tmp_path):
    step = np.array(0, dtype=np.int64)
    ckpt = new_ckpt(step=step)
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
    for i in range(5):
        path = await manager.save(checkpoint_number=step)
        assert path.endswith(f"-{2 * i}")
        step += 2
    assert ckpt.save_counter == 5
    last = await manager.save(checkpoint_number=32)
    assert "-32" in last
    assert manager.latest_checkpoint == last
    assert ac.latest_checkpoint(tmp_path) == last
    assert [os.path.join(tmp_path, p) for p in state_of(tmp_path).all_model_checkpoint_paths] \
        == [path, last]


async def test_custom_checkpoint_prefix(tmp_path):
    ckpt = new_ckpt()
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2, checkpoint_name="ckpt_name")
    path = await manager.save(checkpoint_number=5)
    assert os.path.basename(path) == "ckpt_name-5"
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
    path = await manager.save(checkpoint_number=5)
    assert os.path.basename(path) == "ckpt-5"


async def test_restore_or_initialize(tmp_path):
    init_v = np.array(2.0)
    init_path = await new_ckpt(v=init_v).save(os.path.join(tmp_path, "init"))
    v = np.array(1.0)
    ckpt = new_ckpt(v=v)
    calls = []

    def init_fn():
        calls.append(1)
        v[...] = 2.0

    manager = ac.CheckpointManager(ckpt, tmp_path / "ckpt", max_to_keep=None, init_fn=init_fn)
    assert await manager.restore_or_initialize() is None
    assert calls == [1] and float(v) == 2.0 and init_path
    await manager.save()
    v[...] = 7.0
    assert await manager.restore_or_initialize() is not None
    assert float(v) == 2.0 and calls == [1]


async def test_fspath_directory(tmp_path):
    directory = pathlib.Path(tmp_path)
    v = np.array(0.0)
    manager = ac.CheckpointManager(new_ckpt(v=v), directory, max_to_keep=2,
                                   checkpoint_name="ckpt_name")
    assert await manager.save() == str(directory / "ckpt_name-1")
    assert await manager.restore_or_initialize() == str(directory / "ckpt_name-1")


async def test_latest_checkpoint_fspath_directory(tmp_path):
    directory = pathlib.Path(tmp_path)
    manager = ac.CheckpointManager(new_ckpt(), directory, max_to_keep=2,
                                   checkpoint_name="ckpt_name")
    await manager.save()
    assert ac.latest_checkpoint(directory) == str(directory / "ckpt_name-1")


async def test_checkpoint_interval(tmp_path):
    step = np.array(0)
    manager = ac.CheckpointManager(new_ckpt(v=np.array(1.0)), tmp_path, max_to_keep=None,
                                   step_counter=step, checkpoint_interval=2)
    assert exists(await manager.save(check_interval=True))
    step += 1
    assert await manager.save(check_interval=True) is None
    step += 1
    assert exists(await manager.save(check_interval=True))
    assert await manager.save(check_interval=True) is None
    step += 1
    assert await manager.save(check_interval=True) is None
    assert exists(await manager.save(check_interval=False))


async def test_checkpoint_interval_with_last_checkpoint_step(tmp_path):
    step = np.array(1)
    manager = ac.CheckpointManager(new_ckpt(v=np.array(1.0)), tmp_path, max_to_keep=None,
                                   step_counter=step, checkpoint_interval=2,
                                   last_checkpoint_step=1)
    assert await manager.save(check_interval=True) is None
    step += 1
    assert await manager.save(check_interval=True) is None
    step += 1
    assert exists(await manager.save(check_interval=True))


async def test_checkpoint_interval_with_restore(tmp_path):
    step = np.array(0)
    ckpt = new_ckpt(v=np.array(1.0))
    await ckpt.save(os.path.join(tmp_path, "ckpt"))
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=None, step_counter=step,
                                   checkpoint_interval=2)
    assert await manager.restore_or_initialize() is not None
    assert await manager.save() is None
