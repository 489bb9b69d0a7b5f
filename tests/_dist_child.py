"""One rank of a torch.distributed (gloo) scenario, run by tests/test_distributed.py.

usage: _dist_child.py SCENARIO RANK WORLD DIRECTORY INIT_FILE
Prints one JSON line with what the test checks.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import anyio
import numpy as np
import torch
import torch.distributed as dist

import asyncckpt as ac
from asyncckpt import _fs

scenario, rank, world, directory, init = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
OPTS = ac.CheckpointOptions(coordination_timeout=8.0)
CHECKED = ac.CheckpointOptions(coordination_timeout=8.0, check_replicated=True)


def model():
    rng = np.random.default_rng(0)  # identical on every rank: replicated
    return {"w": rng.standard_normal((256, 256), dtype=np.float32),
            "layers": [rng.standard_normal(1000, dtype=np.float32) for _ in range(5)]}


def local(step):
    # rank-local state (ZeRO shard, RNG state, ...): different on every rank
    return {"m": np.full(20000, rank * 100 + step, dtype=np.float32), "rank": rank,
            "t": torch.full((10,), float(rank))}


def emit(**kw):
    print(json.dumps(kw), flush=True)


async def three_saves(options):
    """Save steps 1-3 in the background (rank-local state new at each), keeping 2.
    Returns the checkpoint, its step array, the manager and the last save's handle."""
    step = np.array(0)
    ckpt = ac.Checkpoint(model=model(), optimizer=local(0), step=step, replicated=["model/**"])
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=2, options=options) as mgr:
        for i in (1, 2, 3):
            step[...] = i
            ckpt.optimizer = local(i)
            handle = await mgr.start_save()
            await handle.wait()
    return ckpt, step, mgr, handle


def clobber(ckpt, step):
    """Change the values a restore of step 3 must bring back."""
    ckpt.optimizer["m"][:] = -1
    ckpt.model["w"][:] = 0
    step[...] = 0


async def roundtrip():
    ckpt, step, mgr, handle = await three_saves(CHECKED)
    latest, kept, stored = mgr.latest_checkpoint, mgr.checkpoints, handle.metrics.stored_bytes
    saved_m = ckpt.optimizer["m"].copy()
    m = ckpt.optimizer["m"]
    clobber(ckpt, step)
    fresh = ac.CheckpointManager(ckpt, directory, max_to_keep=2, options=OPTS)
    restored = await fresh.restore_or_initialize()
    emit(latest=latest, kept=kept, stored=stored, restored=restored,
         same_m=bool(np.array_equal(m, saved_m)) and ckpt.optimizer["m"] is m,
         w_ok=bool(np.array_equal(ckpt.model["w"], model()["w"])), step=int(step),
         rank_value=ckpt.optimizer["rank"], tensor=float(ckpt.optimizer["t"][0]))


async def wrong_order():
    ckpt = ac.Checkpoint(model=model(), replicated=["model/**"])
    path = os.path.join(directory, "a" if rank == 0 else "b")
    try:
        await ckpt.write(path, options=OPTS)
        emit(error=None)
    except ac.SaveError as exc:
        emit(error=str(exc))


def eio(fd):
    raise OSError(5, "Input/output error")


async def second_save_fails(options, breaking) -> dict:
    """Save once, let ``breaking()`` break this rank, save again: what each rank saw."""
    ckpt = ac.Checkpoint(model=model(), optimizer=local(0), replicated=["model/**"])
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=2, options=options) as mgr:
        first = await mgr.save()
        breaking()
        try:
            await mgr.save()
            error = None
        except ac.SaveError as exc:
            error = str(exc)
        latest = mgr.latest_checkpoint
    return dict(first=first, latest=latest, error=error)


async def rank_fails():
    def breaking():
        if rank == 1:
            _fs.fsync = eio
    emit(**await second_save_fails(OPTS, breaking))


async def rank_dies():
    def breaking():
        if rank == 1:
            real = _fs.open_new
            def die(path):
                if "shard" in path:
                    os._exit(9)
                return real(path)
            _fs.open_new = die
    outcome = await second_save_fails(OPTS, breaking)
    emit(**outcome, entries=sorted(os.listdir(directory)))


async def replicated_differ():
    values = model()
    if rank == 1:
        values["layers"][2][7] += 1.0  # a bug: "replicated" state diverged on rank 1
    ckpt = ac.Checkpoint(model=values, replicated=["model/**"])
    try:
        await ckpt.write(os.path.join(directory, "c"), options=CHECKED)
        emit(error=None)
    except ac.SaveError as exc:
        emit(error=str(exc))


def spy_on_files(before):
    """Wrap every public function of the filesystem seam: ``before(name, args)`` runs first."""
    import inspect
    for name, fn in list(vars(_fs).items()):
        if inspect.isfunction(fn) and fn.__module__ == _fs.__name__ and not name.startswith("_"):
            def spy(*args, _fn=fn, _name=name, **kw):
                before(_name, args)
                return _fn(*args, **kw)
            setattr(_fs, name, spy)


def record_file_access():
    """Every call made through the filesystem seam from now on."""
    calls = []
    spy_on_files(lambda name, args: calls.append(f"{name}{tuple(str(a)[:80] for a in args)}"))
    return calls


async def io_device():
    io = world - 1
    calls = record_file_access()
    opts = ac.CheckpointOptions(coordination_timeout=20.0, check_replicated=True,
                                experimental_io_device=f"/job:worker/replica:0/task:{io}")
    ckpt, step, mgr, _ = await three_saves(opts)
    latest, kept = mgr.latest_checkpoint, mgr.checkpoints
    m = ckpt.optimizer["m"]
    clobber(ckpt, step)
    fresh = ac.CheckpointManager(ckpt, directory, max_to_keep=2, options=opts)
    restored = await fresh.restore_or_initialize()
    emit(latest=latest, kept=kept, restored=restored, step=int(step),
         m_ok=bool((m == rank * 100 + 3).all()) and ckpt.optimizer["m"] is m,
         w_ok=bool(np.array_equal(ckpt.model["w"], model()["w"])),
         tensor=float(ckpt.optimizer["t"][0]), calls=len(calls), some_calls=calls[:5])


async def io_failures():
    """Scenario ``io_dies``: rank 1 is killed while streaming to the I/O rank 0.
    Scenario ``io_eio``: the I/O rank 1 cannot fsync."""
    from asyncckpt import _transport
    io = 0 if scenario == "io_dies" else 1

    def breaking():
        if scenario == "io_dies" and rank == 1:
            _transport.SendSink.write = lambda self, data: os._exit(9)
        if scenario == "io_eio" and rank == io:
            _fs.fsync = eio
    opts = ac.CheckpointOptions(coordination_timeout=8.0, experimental_io_device=io)
    emit(**await second_save_fails(opts, breaking))


def dtensors(version):
    """Sharded values (and their whole contents) on a 1-D mesh over every rank."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    rng = np.random.default_rng(version)
    whole = {"big": torch.from_numpy(rng.standard_normal((256, 1024), dtype=np.float32)),
             "rows": torch.arange(13 * 7, dtype=torch.float32).reshape(13, 7) + version,
             "cols": torch.arange(5 * 9).reshape(5, 9).to(torch.bfloat16) + version}
    whole["rep"] = whole["rows"] * 2
    placements = {"big": Shard(0), "rows": Shard(0), "cols": Shard(1), "rep": Replicate()}
    return {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in whole.items()}, whole


async def dtensor_save():
    values, _ = dtensors(1)
    opts = ac.CheckpointOptions(coordination_timeout=20.0, chunk_bytes=64 << 10)
    ckpt = ac.Checkpoint(model=values, own=np.full(3, rank), replicated=["model/**"])
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=3, options=opts) as mgr:
        await mgr.save()
        emit(latest=mgr.latest_checkpoint)


async def dtensor_reshard():
    """Restore what another world size saved into this world's shards, then save again."""
    values, _ = dtensors(0)
    _, expected = dtensors(1)
    read = [0]
    real = _fs.pread_into
    def counting(fd, buffer, offset):
        read[0] += memoryview(buffer).nbytes
        return real(fd, buffer, offset)
    _fs.pread_into = counting
    opts = ac.CheckpointOptions(coordination_timeout=20.0, chunk_bytes=64 << 10)
    ckpt = ac.Checkpoint(model=values, own=np.full(3, rank), replicated=["model/**"])
    mgr = ac.CheckpointManager(ckpt, directory, max_to_keep=3, options=opts)
    restored = await mgr.restore_or_initialize()
    local_big = values["big"].to_local()
    same = {k: bool(torch.equal(v.full_tensor(), expected[k])) for k, v in values.items()}
    emit_later = dict(restored=restored, same=same, read=read[0],
                      in_place=values["big"].to_local().data_ptr() == local_big.data_ptr())
    # Again through an I/O rank: the others ask it for exactly their chunks.
    for v in values.values():
        v.to_local().zero_()
    io = ac.CheckpointOptions(coordination_timeout=20.0, experimental_io_device=world - 1)
    (await ckpt.restore(restored, io)).expect_partial()
    emit_later["same_io"] = {k: bool(torch.equal(v.full_tensor(), expected[k]))
                             for k, v in values.items()}
    ckpt.model = dtensors(2)[0]
    await mgr.save()
    emit(latest=mgr.latest_checkpoint, **emit_later)


async def dtensor_one():
    values, _ = dtensors(0)
    _, expected = dtensors(2)
    ckpt = ac.Checkpoint(model=values)
    (await ckpt.restore(ac.latest_checkpoint(directory))).expect_partial()
    emit(same={k: bool(torch.equal(v.full_tensor(), expected[k])) for k, v in values.items()})


async def two_checkpoints():
    """Two checkpoints (say, model and data loader) saved by their own managers in turn."""
    a = ac.Checkpoint(model=model(), optimizer=local(0), replicated=["model/**"])
    b = ac.Checkpoint(loader=np.full(10, rank))
    paths = []
    async with ac.CheckpointManager(a, os.path.join(directory, "a"), max_to_keep=1,
                                    options=OPTS) as ma, \
            ac.CheckpointManager(b, os.path.join(directory, "b"), max_to_keep=1,
                                 options=OPTS) as mb:
        for _ in range(2):
            paths.append(await ma.save())
            paths.append(await mb.save())
    emit(paths=paths)


async def collective_order():
    """Three background saves started back to back: their collective writes must run one at
    a time, in start order. Every write waits at its door until all three saves have
    started, so a write that does not wait its turn would be caught inside another one."""
    from asyncckpt import _collective
    real = _collective.write_collective
    events, active, started = [], [0], anyio.Event()

    async def recorded(coord, snap, path, *args, **kw):
        active[0] += 1
        events.append(("enter", os.path.basename(path), active[0]))
        try:
            await started.wait()
            return await real(coord, snap, path, *args, **kw)
        finally:
            active[0] -= 1
            events.append(("exit", os.path.basename(path), active[0]))

    _collective.write_collective = recorded  # what Checkpoint._write_collective calls
    step = np.array(0)
    m = np.zeros(20000, dtype=np.float32)
    # room for three snapshots at once: no save waits for staging memory
    opts = ac.CheckpointOptions(coordination_timeout=8.0, staging_budget_bytes=64 << 20)
    ckpt = ac.Checkpoint(model=model(), optimizer={"m": m}, step=step,
                         replicated=["model/**", "step"])
    paths, waited, errors = [], [], []
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=None, options=opts) as mgr:
        handles = []
        try:
            for i in (1, 2, 3):
                step[...] = i
                m[:] = rank * 100 + i  # in place: each save has its own snapshot
                handles.append(await mgr.start_save())
        finally:
            started.set()  # open the doors even if a start failed: no hang
        paths = [h.path for h in handles]
        for h in handles:
            try:
                waited.append(await h.wait())
            except ac.SaveError as exc:
                errors.append(str(exc))
        latest, kept = mgr.latest_checkpoint, mgr.checkpoints
    emit(events=events, paths=paths, waited=waited, errors=errors, latest=latest, kept=kept)


async def commit_crash():
    """Rank 0 (the committing rank) is killed at the k-th filesystem call after it gathered
    every rank's report for the second save (k = -1: count those calls, crash nowhere)."""
    from asyncckpt import _dist
    k = int(scenario.split(":")[1])
    calls, armed = [], [False]
    if rank == 0:
        real_gather = _dist.Coordinator.gather
        async def gather(self, key, payload, what):
            out = await real_gather(self, key, payload, what)
            armed[0] = step[()] == 2
            return out
        _dist.Coordinator.gather = gather

        def crash_at_k(name, args):
            if armed[0]:
                if len(calls) == k:
                    os._exit(9)
                calls.append(name)
        spy_on_files(crash_at_k)
    step = np.array(0)
    opts = ac.CheckpointOptions(coordination_timeout=3.0)
    ckpt = ac.Checkpoint(model=model(), optimizer=local(0), step=step, replicated=["model/**"])
    error = None
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=1, options=opts) as mgr:
        for i in (1, 2):
            step[...] = i
            ckpt.optimizer = local(i)
            try:
                await mgr.save()
            except ac.SaveError as exc:
                error = str(exc)
    emit(calls=calls, error=error)


async def store_keys():
    """The store must not grow with the number of saves (a long run saves thousands)."""
    from torch.distributed import distributed_c10d as c10d
    store = c10d._get_default_store()
    ckpt = ac.Checkpoint(model=model(), optimizer=local(0), replicated=["model/**"])
    counts = []
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=1, options=OPTS) as mgr:
        for i in range(8):
            ckpt.optimizer = local(i)
            await mgr.save()
            if i == 3:
                await ckpt.restore(mgr.latest_checkpoint, OPTS)
            counts.append(store.num_keys())
    emit(counts=counts)


async def io_damaged():
    """Rank 0's shard is damaged; restoring through the I/O rank 1 fails on rank 0 only, at
    once, and the channel stays usable for the next save."""
    opts = ac.CheckpointOptions(coordination_timeout=8.0, experimental_io_device=1,
                                compression="none")
    ckpt = ac.Checkpoint(model=model(), optimizer=local(0))  # rank 0's shard: its own only
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=2, options=opts) as mgr:
        first = await mgr.save()
        if rank == 1:
            shard = os.path.join(first, "shard-r00000.bin")
            with open(shard, "r+b") as f:
                f.seek(os.path.getsize(shard) // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))
        started = time.monotonic()
        try:
            await ckpt.restore(first, opts)
            error = None
        except ac.RestoreError as exc:
            error = f"{type(exc).__name__}: {exc}"
        took = time.monotonic() - started
        second = await mgr.save()
    emit(error=error, took=took, second=second)


async def io_interleaved():
    """A restore and an export started while a background save still streams: the
    checkpoint's collective operations take turns, in call order, on every rank."""
    opts = ac.CheckpointOptions(coordination_timeout=20.0, experimental_io_device=1,
                                compression="none")
    big = np.random.default_rng(rank).standard_normal(16 << 20, dtype=np.float32)  # 64 MiB
    ckpt = ac.Checkpoint(model=model(), optimizer=local(1), big=big, replicated=["model/**"])
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=3, options=opts) as mgr:
        first = await mgr.save()
        ckpt.optimizer = local(2)
        handle = await mgr.start_save()
        ckpt.optimizer["m"][:] = -1
        await ckpt.restore(first, opts)  # back to step 1's values, while step 2 is written
        restored = float(ckpt.optimizer["m"][0])
        export = await ckpt.write(os.path.join(directory, "export"), opts)
        second = await handle.wait()
    tree_ok = None
    if rank == 1:
        tree = await ac.load(second)
        tree_ok = float(tree["rank/0"]["optimizer"]["m"][0]) == 2.0
    emit(restored=restored, second=second, export=export, tree_ok=tree_ok)


async def dtensor_stages():
    """Two pipeline stages on a 2 x 2 mesh, each with its own "w" sharded over its own
    tensor-parallel sub-mesh: same key path, different values; each restores its own."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    stage = rank // 2
    whole = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3) + 100 * stage
    w = distribute_tensor(whole, mesh["tp"], [Shard(0)])
    ckpt = ac.Checkpoint(model={"w": w})
    path = await ckpt.write(os.path.join(directory, "stages"), OPTS)
    w.to_local().zero_()
    await ckpt.restore(path, OPTS)
    same = bool(torch.equal(w.full_tensor(), whole))
    # A plain (whole) array saved by one process (the test) restores into the shards too.
    w.to_local().zero_()
    (await ckpt.restore(os.path.join(directory, "plain"), OPTS)).assert_consumed()
    expected = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3) * 2
    # A strided shard (FSDP2 + TP) is not one box of the whole: refused, naming the key.
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard
    strided = DTensor.from_local(torch.zeros(4, 3), mesh["tp"],
                                 [_StridedShard(0, split_factor=2)])
    try:
        await ac.Checkpoint(s=strided).write(os.path.join(directory, "strided"), OPTS)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    emit(same=same, from_plain=bool(torch.equal(w.full_tensor(), expected)), refused=refused)


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


async def io_memory():
    """Rank 1 streams a 192 MiB rank-local state to the I/O rank 0, which holds almost
    nothing itself: how much did rank 0's peak resident memory grow while it received?"""
    rng = np.random.default_rng(rank)
    size = (192 << 20) if rank == 1 else (64 << 10)
    state = {f"a{i}": rng.random((size // 4) // 48, dtype=np.float32) for i in range(48)}
    opts = ac.CheckpointOptions(coordination_timeout=30.0, experimental_io_device=0)
    ckpt = ac.Checkpoint(state=state)

    def reset_peak() -> int:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the current resident size
        return _hwm_kib()
    start = reset_peak()
    async with ac.CheckpointManager(ckpt, directory, max_to_keep=1, options=opts) as mgr:
        await mgr.save()  # the first save also builds pools, threads and the gloo group
        first = _hwm_kib() - start
        before = reset_peak()
        await mgr.save()
        grew = _hwm_kib() - before
        stored = mgr.checkpoint.last_save_metrics.stored_bytes
    # both: a buffer kept from the first save would not show in the second's growth
    emit(grew_kib=grew, first_kib=first, stored=stored)


def sync_manager():
    ckpt = ac.Checkpoint(model=model(), optimizer=local(0), replicated=["model/**"])
    with ac.SyncCheckpointManager(ckpt, directory, max_to_keep=1, options=OPTS) as mgr:
        mgr.start_save()
        ckpt.optimizer = local(5)
        path = mgr.save()
        latest = mgr.latest_checkpoint
    emit(path=path, latest=latest)


if scenario == "sync":
    sync_manager()
elif scenario.startswith("commit_crash:"):
    anyio.run(commit_crash, backend="asyncio")
else:
    anyio.run({"roundtrip": roundtrip, "wrong_order": wrong_order, "rank_fails": rank_fails,
               "rank_dies": rank_dies,
               "replicated_differ": replicated_differ, "io_device": io_device,
               "io_dies": io_failures, "io_eio": io_failures,
               "dtensor_save": dtensor_save, "dtensor_reshard": dtensor_reshard,
               "dtensor_one": dtensor_one, "two_checkpoints": two_checkpoints,
               "store_keys": store_keys, "io_damaged": io_damaged,
               "io_interleaved": io_interleaved, "dtensor_stages": dtensor_stages,
               "collective_order": collective_order, "io_memory": io_memory}[scenario],
              backend="asyncio")
dist.destroy_process_group()
