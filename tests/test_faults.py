"""Every filesystem call site x {ENOSPC, EIO, EDQUOT, EROFS, EFBIG} x {once, persistent}.

Faults are injected through the filesystem seam (``asyncckpt._fs``) by event: "the first
(or every) call of F fails with E", never by timing.
"""

from __future__ import annotations

import errno
import os
import resource
import signal

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _fs

SITES = ["open_new", "write_all", "fsync", "fsync_dir", "mkdir", "rename",
         "exchange", "replace", "remove_tree", "unlink", "lock"]
ERRNOS = [errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG]


class Fault:
    def __init__(self, monkeypatch, site: str, err: int, persistent: bool) -> None:
        self.hits = 0
        real = getattr(_fs, site)

        def failing(*args, **kwargs):
            self.hits += 1
            if persistent or self.hits == 1:
                raise OSError(err, os.strerror(err), str(args[0]) if args else None)
            return real(*args, **kwargs)

        monkeypatch.setattr(_fs, site, failing)


def errnos_in(exc: BaseException) -> set[int]:
    found = set()
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            found.add(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return found


def state(value: float) -> dict:
    return {"w": np.full(50_000, value, dtype=np.float32), "b": np.arange(10) + value}


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
@pytest.mark.parametrize("err", ERRNOS, ids=[errno.errorcode[e] for e in ERRNOS])
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("replace", [False, True], ids=["new", "replace"])
async def test_fault_at_every_call_site(tmp_path, monkeypatch, site, err, persistent, replace):
    ckpt = ac.Checkpoint(model=state(1.0))
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
    old = await manager.save()
    ckpt.model = state(2.0)
    fault = Fault(monkeypatch, site, err, persistent)
    try:
        new = await manager.save(checkpoint_number=1 if replace else None)
        failed = None
    except ac.CheckpointError as exc:
        failed = exc
    monkeypatch.undo()
    if failed is not None:
        assert err in errnos_in(failed), repr(failed)
        assert os.strerror(err) in str(failed) or f"errno {err}" in str(failed)
    elif fault.hits:
        # Only a call whose failure the protocol may absorb: nothing else is acceptable.
        assert site in ("remove_tree", "unlink", "fsync_dir"), site
    # The state file names a complete checkpoint holding the old or the new state.
    latest = ac.latest_checkpoint(tmp_path)
    assert latest is not None
    value = (await ac.load(latest))["model"]["w"][0]
    if failed is not None and not replace:
        assert latest == old or value == 2.0
    assert value in (1.0, 2.0)
    # Once the fault is gone, a manager opening the directory saves and cleans up.
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1) as fresh:
        path = await fresh.save()
    assert (await ac.load(path))["model"]["w"][0] == 2.0
    leftovers = [e for e in os.listdir(tmp_path) if "asyncckpt-" in e and not e.startswith(".")]
    assert leftovers == []
    assert sorted(e for e in os.listdir(tmp_path) if not e.startswith(".")) == [
        "checkpoint", os.path.basename(path)]
    _ = new if failed is None else None


async def test_real_file_size_limit_gives_efbig(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE), not an injected one."""
    ckpt = ac.Checkpoint(model=state(1.0))
    manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
    first = await manager.save()
    ckpt.model = {"big": np.ones(1 << 20, dtype=np.float64)}  # 8 MiB > the limit below
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(ac.SaveError) as info:
            await manager.save(options=ac.CheckpointOptions(compression="none"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert errno.EFBIG in errnos_in(info.value)
    assert manager.latest_checkpoint == first == ac.latest_checkpoint(tmp_path)
    assert [e for e in os.listdir(tmp_path) if "asyncckpt-tmp" in e] == []
    assert (await ac.load(first))["model"]["w"][0] == 1.0
