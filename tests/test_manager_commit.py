"""What the manager does better than TF: durable ordered commits, cleanup, clear errors."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _fs


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


def visible(directory) -> list[str]:
    return [e for e in listing(directory) if not e.startswith(".")]


async def test_directory_matches_the_state_file_after_saves(tmp_path):
    ckpt = ac.Checkpoint(w=np.arange(1000.0))
    manager = ac.CheckpointManager(ckpt, tmp_path / "run", max_to_keep=2)
    for _ in range(5):
        await manager.save()
    assert visible(tmp_path / "run") == ["checkpoint", "ckpt-4", "ckpt-5"]
    assert manager.checkpoints == [str(tmp_path / "run" / "ckpt-4"),
                                   str(tmp_path / "run" / "ckpt-5")]


async def test_constructing_a_manager_deletes_nothing(tmp_path):
    for name in ["ckpt-1.asyncckpt-tmp-0000", "ckpt-2.asyncckpt-deleting-1111", "mine"]:
        os.mkdir(tmp_path / name)
    ac.CheckpointManager(ac.Checkpoint(), tmp_path, max_to_keep=1)
    assert len(listing(tmp_path)) == 3


async def test_residue_is_cleaned_on_enter_and_only_our_own(tmp_path):
    ckpt = ac.Checkpoint(x=np.ones(3))
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
    kept = await manager.save()
    retired = await manager.save()
    # Simulate a crash mid-commit: a retire list naming ckpt-2, and a state file that no
    # longer does; plus a temporary directory and a marked one.
    with open(tmp_path / "checkpoint", "w") as f:
        f.write('model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n')
    with open(tmp_path / ".asyncckpt-retire", "w") as f:
        f.write("ckpt-2\nckpt-1\n")
    for name in ["ckpt-3.asyncckpt-tmp-abcd", "ckpt-0.asyncckpt-deleting-ffff", "other",
                 "checkpoint.asyncckpt-tmp-1234"]:
        (tmp_path / name).mkdir() if "checkpoint." not in name else (tmp_path / name).touch()
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=3):
        pass
    assert visible(tmp_path) == ["checkpoint", "ckpt-1", "other"]
    assert os.path.isdir(kept) and not os.path.exists(retired)


async def test_failed_state_file_write_rolls_back_and_keeps_the_latest(tmp_path, monkeypatch):
    ckpt = ac.Checkpoint(x=np.ones(3))
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
    first = await manager.save()
    real = _fs.replace

    def failing(src, dst):
        if os.path.basename(dst) == "checkpoint":
            raise OSError(errno.ENOSPC, "No space left on device", src)
        return real(src, dst)

    monkeypatch.setattr(_fs, "replace", failing)
    with pytest.raises(ac.SaveError, match="No space left"):
        await manager.save()
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]
    assert ac.latest_checkpoint(tmp_path) == first
    assert visible(tmp_path) == ["checkpoint", "ckpt-1"]
    monkeypatch.setattr(_fs, "replace", real)
    third = await manager.save()
    assert visible(tmp_path) == ["checkpoint", os.path.basename(third)]


async def test_second_manager_on_one_directory_is_detected(tmp_path):
    ckpt = ac.Checkpoint(x=np.ones(3))
    old = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
    await old.save()
    new = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2)  # TF-style replacement: fine
    second = await new.save()
    with pytest.raises(ac.ConcurrentWriterError, match="another CheckpointManager"):
        await old.save()
    assert ac.latest_checkpoint(tmp_path) == second
    assert visible(tmp_path) == ["checkpoint", "ckpt-1", "ckpt-2"]
    third = await new.save()  # the live manager goes on
    assert new.checkpoints == [second, third]


async def test_plain_checkpoint_save_is_not_a_second_manager(tmp_path):
    ckpt = ac.Checkpoint(x=np.ones(3))
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
    await manager.save()
    plain = await ckpt.save(tmp_path / "plain")
    assert ac.latest_checkpoint(tmp_path) == plain
    assert manager.latest_checkpoint != plain  # the manager's own view, as in TF
    path = await manager.save()
    assert ac.latest_checkpoint(tmp_path) == path
    assert os.path.isdir(plain)


async def test_corrupt_state_file_is_a_clear_error_with_a_way_out(tmp_path):
    ckpt = ac.Checkpoint(x=np.arange(4))
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
    await manager.save()
    last = await manager.save()
    (tmp_path / "checkpoint").write_bytes(b"\x00garbage{")
    with pytest.raises(ac.CorruptCheckpointError, match="rebuild"):
        ac.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
    with pytest.raises(ac.CorruptCheckpointError):
        ac.latest_checkpoint(tmp_path)
    (tmp_path / "checkpoint").write_bytes(b"")
    with pytest.raises(ac.CorruptCheckpointError, match="empty"):
        ac.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
    assert await ac.CheckpointManager.rebuild_state(tmp_path) == last
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
    assert manager.latest_checkpoint == last and len(manager.checkpoints) == 2


@pytest.mark.parametrize("text", [
    'model_checkpoint_path: "/etc/passwd"\n'.replace("/etc/passwd", "../outside"),
    'model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "../../x"\n',
])
async def test_state_file_paths_leaving_the_directory_are_rejected(tmp_path, text):
    (tmp_path / "checkpoint").write_text(text)
    with pytest.raises(ac.CorruptCheckpointError, match="leaves the directory"):
        ac.CheckpointManager(ac.Checkpoint(), tmp_path, max_to_keep=1)


def test_constructor_validation(tmp_path):
    ckpt = ac.Checkpoint()
    with pytest.raises(ValueError, match="max_to_keep"):
        ac.CheckpointManager(ckpt, tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="step_counter"):
        ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1, checkpoint_interval=5)
    with pytest.raises(TypeError, match="Checkpoint"):
        ac.CheckpointManager({"x": 1}, tmp_path, max_to_keep=1)


async def test_step_counter_kinds(tmp_path):
    class Step:
        def __init__(self) -> None:
            self.n = 0

        def __index__(self) -> int:
            return self.n

    step = Step()
    values = iter([0, 1, 5])
    for counter in (np.array(0), step, lambda: next(values)):
        manager = ac.CheckpointManager(ac.Checkpoint(), tmp_path / str(id(counter)),
                                       max_to_keep=None, step_counter=counter,
                                       checkpoint_interval=3)
        assert await manager.save() is not None
    assert await manager.save() is None       # step 1: too early
    assert await manager.save() is not None   # step 5
