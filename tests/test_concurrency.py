"""Several processes on one directory: two managers, and readers racing a writer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

import asyncckpt as ac

WRITER = r"""
import sys, time, anyio, numpy as np, asyncckpt as ac
directory, saves, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
async def main():
    ckpt = ac.Checkpoint(w=np.zeros(1 << 16), tag=tag)
    manager = ac.CheckpointManager(ckpt, directory, max_to_keep=2)
    print("ready", flush=True)
    sys.stdin.readline()  # wait for the go
    failures = 0
    for i in range(saves):
        ckpt.w[:] = tag * 1000 + i
        try:
            await manager.save()
        except ac.ConcurrentWriterError:
            failures += 1
    print("conflicts", failures, flush=True)
anyio.run(main)
"""


def _start(directory, saves, tag):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(saves), str(tag)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


DRIVEN = r"""
import sys, anyio, numpy as np, asyncckpt as ac
async def main():
    ckpt = ac.Checkpoint(w=np.zeros(1 << 16))
    manager = ac.CheckpointManager(ckpt, sys.argv[1], max_to_keep=2)
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            print("ok", await manager.save(), flush=True)
        except ac.ConcurrentWriterError as exc:
            print("conflict", str(exc).replace(chr(10), " "), flush=True)
anyio.run(main)
"""


def _driven(directory):
    proc = subprocess.Popen([sys.executable, "-c", DRIVEN, str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _save(proc) -> str:
    proc.stdin.write("save\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


async def test_two_managers_in_two_processes(tmp_path):
    old = _driven(tmp_path)
    assert _save(old).startswith("ok")
    assert _save(old).startswith("ok")
    new = _driven(tmp_path)             # a second process opens the same directory
    first_new = _save(new)
    assert first_new.startswith("ok")
    answer = _save(old)                 # the stale manager must not drop the new one's work
    assert answer.startswith("conflict") and "another CheckpointManager" in answer
    assert _save(new).startswith("ok")
    for proc in (old, new):
        proc.stdin.close()
        assert proc.wait(60) == 0
    state = ac._directory.read_state_sync(str(tmp_path))
    assert ac.latest_checkpoint(tmp_path).endswith("ckpt-2")  # new's second save (counter 2)
    for rel in state.all_model_checkpoint_paths:
        await ac.load(os.path.join(tmp_path, rel))
    assert [e for e in os.listdir(tmp_path) if "asyncckpt-tmp" in e] == []


async def test_readers_never_see_a_half_checkpoint(tmp_path):
    writer = _start(tmp_path, 40, 3.0)
    writer.stdin.write("go\n")
    writer.stdin.flush()
    seen, retired = 0, 0
    while writer.poll() is None:
        try:
            latest = ac.latest_checkpoint(tmp_path)
        except ac.CorruptCheckpointError:
            raise
        if latest is None:
            continue
        try:
            loaded = await ac.load(latest)
        except ac.RestoreError as exc:  # retired while being read: a clear error
            retired += 1
            assert "missing" in str(exc) or "no checkpoint" in str(exc) or "removed" in str(exc)
            continue
        w = loaded["w"]
        assert (w == w[0]).all() and w[0] >= 3000
        seen += 1
    assert writer.wait(120) == 0
    assert seen > 0
    final = await ac.load(ac.latest_checkpoint(tmp_path))
    assert final["w"][0] == 3039 and np.all(final["w"] == 3039)
