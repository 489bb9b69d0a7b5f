"""asyncckpt vs torch.distributed.checkpoint with several processes (issue 12).

Run: python bench/bench_dist.py [--worlds 2,4] [--mib-per-rank 64] [--saves 5] [--dir PATH]
                                [--json FILE]

For each world size, that many processes (gloo on CPU, a TCPStore on rank 0 as torchrun sets up; as
tests/_dist_child.py does) each hold the same-size state of float32 CPU tensors: a "model" part
identical on every rank (``--replicated-share``, default half; ``Checkpoint(replicated=
["model/**"])``, and the same keys on every rank for DCP, whose planner writes such tensors once)
and an "optimizer" part that is rank-local (a ZeRO shard: different values on every rank, keyed
per rank for DCP). The same tensor objects are saved by every system:

  * asyncckpt, default options: blocking = ``await mgr.start_save()``, durable = until
    ``handle.wait()`` returns (committed, files and directories fsynced); ``max_to_keep=None``
    and each checkpoint deleted after it was measured, untimed, as DCP's are;
  * the same with ``max_to_keep=1``: deleting the previous checkpoint is part of the save;
  * asyncckpt with ``experimental_io_device=0`` (one rank does the file I/O, the others
    stream their chunks to it);
  * DCP ``async_save``: plain (a fresh staging copy per save), with a reused ``DefaultStager``
    (staging in a background thread, storages cached across saves; pinned memory only with
    CUDA), and with ``FileSystemWriter(cache_staged_state_dict=True)`` (cached pinned copy);
    blocking = until async_save returns, reusable = until the staging copy is done (the state
    may change), durable = until the upload future's result and then rank 0's fsync of the
    checkpoint directory and its parent (FileSystemWriter ``sync_files`` fsyncs its files, but
    DCP fsyncs no directory: without that fsync a power loss can take the new files' names
    back, so the durable time of every peer includes it, as in ``report.py``);
  * DCP ``save`` (synchronous): blocking = until it returns, durable = the same plus rank 0's
    directory fsyncs. The target is asyncckpt durable <= DCP synchronous save (both figures
    are printed).

Each iteration saves once with every system, in an order rotated per iteration, with a barrier
before each save (interleaved, so drift of the machine cancels); iteration 0 is a warm-up. Per
rank the median over ``--saves`` saves, then the max over ranks. stored = bytes of the
checkpoint directory. Every file is written in a temporary directory (under --dir, default the
system temp dir) that is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import inspect
import socket
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _limits as lim  # noqa: E402
from bench_engine import fs_of, ms, revision, table  # noqa: E402

MiB = 1 << 20
COLS = 1024
CONFIGS = {  # name -> label; the order of the tables
    "asyncckpt": "asyncckpt (default options)",
    "asyncckpt_keep1": "asyncckpt, max_to_keep=1",
    "asyncckpt_io0": "asyncckpt, experimental_io_device=0",
    "dcp_async": "DCP async_save (plain)",
    "dcp_async_stager": "DCP async_save + reused DefaultStager",
    "dcp_async_cached": "DCP async_save + cache_staged_state_dict",
    "dcp_sync": "DCP save (synchronous)",
}
METRICS = ("blocking", "reusable", "durable")

# --- one rank ----------------------------------------------------------------------------------


def make_part(nbytes: int, seed: int, count: int = 12) -> dict[str, Any]:
    """``count`` float32 matrices of 1..4 relative sizes adding up to ~nbytes, and a bias."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    weights = [1 + i % 4 for i in range(count)]
    out = {f"w{i}": torch.randn(max(1, nbytes * w // sum(weights) // (4 * COLS)), COLS,
                                generator=gen) for i, w in enumerate(weights)}
    out["bias"] = torch.randn(4096, generator=gen)
    return out


def why_unavailable(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> str | None:
    """'Type: first line' when ``exc`` (or the one error in an exception group) is of ``kinds``:
    that configuration is not available here; None: a real failure."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if not isinstance(exc, kinds):
        return None
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


async def child(args: argparse.Namespace, rank: int, world: int, base: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

    import asyncckpt as ac

    dist.init_process_group("gloo", init_method="env://", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    total = args.mib_per_rank * MiB
    shared = int(total * args.replicated_share)
    model = make_part(shared, seed=0)                  # identical on every rank: replicated
    local = make_part(total - shared, seed=1000 + rank)
    # DCP takes equal keys on several ranks for replicated tensors (and writes them once):
    # rank-local tensors need a key of their own on each rank.
    state = {"model": model, f"optimizer_rank{rank}": local}
    unavailable: dict[str, tuple[type[BaseException], ...]] = {
        "asyncckpt_io0": (NotImplementedError,),
        "dcp_async_cached": (RuntimeError,),  # CPU-only torch: it pins memory unconditionally
    }
    res: dict[str, dict[str, Any]] = {n: {**{m: [] for m in METRICS}, "stored": [], "error": None}
                                      for n in CONFIGS}

    async with contextlib.AsyncExitStack() as stack:
        # One Checkpoint for every manager: Checkpoint objects count their collective saves
        # separately and name the store keys by that count, so two of them would collide.
        ckpt = ac.Checkpoint(model=model, optimizer=local, replicated=["model/**"])
        mgrs = {}
        keep = {"asyncckpt": None, "asyncckpt_keep1": 1, "asyncckpt_io0": None}
        for name, opts in (("asyncckpt", ac.CheckpointOptions()),
                           ("asyncckpt_keep1", ac.CheckpointOptions()),
                           ("asyncckpt_io0", ac.CheckpointOptions(experimental_io_device=0))):
            mgr = ac.CheckpointManager(ckpt, os.path.join(base, name), max_to_keep=keep[name],
                                       options=opts)
            try:
                mgrs[name] = await stack.enter_async_context(mgr)
            except BaseException as exc:
                if not (why := why_unavailable(exc, unavailable.get(name, ()))):
                    raise
                res[name]["error"] = why
        stager = DefaultStager(StagingOptions(
            use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
            use_async_staging=True, use_non_blocking_copy=False))
        stack.callback(stager.close)
        cached = dcp.FileSystemWriter(os.path.join(base, "unused"), cache_staged_state_dict=True)

        async def one_save(name: str, i: int) -> tuple[list[float], str]:
            path = os.path.join(base, f"{name}-{i}")
            t0 = time.perf_counter()
            if name in mgrs:
                handle = await mgrs[name].start_save()
                t1 = t2 = time.perf_counter()
                path = await handle.wait()
            elif name == "dcp_sync":
                dcp.save(state, checkpoint_id=path)
                t1 = t2 = time.perf_counter()
                durable_names(path)
            else:
                kw = ({"async_stager": stager} if name == "dcp_async_stager" else
                      {"storage_writer": cached} if name == "dcp_async_cached" else {})
                response = dcp.async_save(state, checkpoint_id=path, **kw)
                t1 = time.perf_counter()
                if isinstance(response, AsyncSaveResponse):  # staging runs in the background
                    response.staging_completion.result()
                    response = response.upload_completion
                t2 = time.perf_counter()
                response.result()
                durable_names(path)
            return [t1 - t0, t2 - t0, time.perf_counter() - t0], path

        def durable_names(path: str) -> None:
            """What DCP leaves out: fsync the directory holding every rank's files (rank 0
            wrote the metadata last, after the others' files) and the one holding it."""
            if rank == 0:
                lim.fsync_path(path)
                lim.fsync_path(os.path.dirname(path))

        names = list(CONFIGS)
        for i in range(args.saves + 1):                   # i == 0: warm-up
            k = i % len(names)
            for name in names[k:] + names[:k]:
                r = res[name]
                if r["error"]:
                    continue
                dist.barrier()
                try:
                    times, path = await one_save(name, i)
                except BaseException as exc:
                    if not (why := why_unavailable(exc, unavailable.get(name, ()))):
                        raise
                    r["error"] = why
                    continue
                dist.barrier()                            # every rank durable
                if i:
                    for m, t in zip(METRICS, times):
                        r[m].append(t)
                if rank == 0:
                    if i:
                        r["stored"].append(dir_bytes(path))
                    if keep.get(name) is None:  # untimed, as DCP's; max_to_keep=1: timed
                        shutil.rmtree(path)
                with torch.no_grad():                     # a "training step": change the state
                    for t in [*model.values(), *local.values()]:
                        t.view(-1)[i % t.numel()] += 1.0
    with open(os.path.join(base, f"rank{rank}.json"), "w") as f:
        json.dump({"configs": res, "model_bytes": sum(t.nbytes for t in model.values()),
                   "local_bytes": sum(t.nbytes for t in local.values())}, f)
    dist.destroy_process_group()


# --- the launcher ------------------------------------------------------------------------------


class Watch(lim.CpuWatch):
    """CPU used by other processes; our ranks (reaped children) count as our own."""

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def run_world(args: argparse.Namespace, world: int, base: str) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix=f"world{world}-", dir=base)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it with several ranks per node
    with socket.socket() as probe:  # a TCPStore on rank 0, as torchrun sets up
        probe.bind(("127.0.0.1", 0))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(probe.getsockname()[1]))
    argv = [sys.executable, os.path.abspath(__file__), "--mib-per-rank", str(args.mib_per_rank),
            "--saves", str(args.saves), "--replicated-share", str(args.replicated_share)]
    watch = Watch()
    procs = [subprocess.Popen(argv + ["--_child", f"{r},{world},{d}"], env=env)
             for r in range(world)]
    try:
        for p in procs:
            p.wait(timeout=args.timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    cpu = watch.result()
    if any(p.returncode for p in procs):
        raise SystemExit(f"world {world}: rank exit codes {[p.returncode for p in procs]}")
    reports = []
    for r in range(world):
        with open(os.path.join(d, f"rank{r}.json")) as f:
            reports.append(json.load(f))
    shutil.rmtree(d, ignore_errors=True)
    out: dict[str, Any] = {"world": world, "seconds": cpu["wall_s"],
                           "other_cores": cpu["other_cores"], "configs": {},
                           "unique_bytes": reports[0]["model_bytes"]
                           + sum(rep["local_bytes"] for rep in reports)}
    for name in CONFIGS:
        per = [rep["configs"][name] for rep in reports]
        errors = {rk["error"] for rk in per if rk["error"]}
        if errors:
            out["configs"][name] = {"error": "; ".join(sorted(errors))}
            continue
        s: dict[str, Any] = {"stored_bytes": statistics.median(per[0]["stored"])}
        for m in METRICS:
            meds = [statistics.median(rk[m]) for rk in per]
            s[m + "_s"], s[m + "_per_rank_s"] = max(meds), meds
            s[m + "_all_s"] = [rk[m] for rk in per]
        out["configs"][name] = s
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def world_table(w: dict[str, Any], unique: int) -> str:
    cs = w["configs"]
    ac = cs["asyncckpt"]
    rows = []
    for name, label in CONFIGS.items():
        c = cs[name]
        if "error" in c:
            rows.append([f"{label}: not available ({c['error'].split(':')[0]})"] + ["-"] * 7)
            continue
        rows.append([label, ms(c["blocking_s"]), ms(c["reusable_s"]), ms(c["durable_s"]),
                     f"{unique / c['durable_s'] / 1e9:.2f}", f"{c['stored_bytes'] / MiB:.1f}",
                     ratio(ac["reusable_s"], c["reusable_s"]),
                     ratio(ac["durable_s"], c["durable_s"])])
    return table(["system", "blocking ms", "reusable ms", "durable ms", "durable GB/s",
                  "stored MiB", "ac reusable / this", "ac durable / this"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    p.add_argument("--mib-per-rank", type=int, default=64, help="state per rank, MiB")
    p.add_argument("--replicated-share", type=float, default=0.5,
                   help="share of each rank's state that is replicated (the same on every rank)")
    p.add_argument("--saves", type=int, default=5, help="measured saves per system (+1 warm-up)")
    p.add_argument("--dir", default=None, help="parent of the temporary benchmark directory")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    p.add_argument("--wait-quiet", type=float, default=10.0, metavar="SECONDS",
                   help="before each world size, wait up to this long for idle CPUs (0: don't)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.saves < 1 or not 0 <= args.replicated_share <= 1:
        p.error("--saves must be >= 1 and --replicated-share in [0, 1]")
    if args._child:
        rank, world, base = args._child.split(",", 2)
        asyncio.run(child(args, int(rank), int(world), base))
        return

    import torch
    from torch.distributed.checkpoint import FileSystemWriter

    import asyncckpt as ac
    sync_files = inspect.signature(FileSystemWriter.__init__).parameters["sync_files"].default
    base = tempfile.mkdtemp(prefix="asyncckpt-bench-dist-", dir=args.dir)
    result: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "_child"},
        "torch": torch.__version__, "cpus": os.cpu_count(), "revision": revision(),
        "filesystem": fs_of(os.path.realpath(base)), "dcp_sync_files_default": sync_files,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"), "worlds": []}
    try:
        t_start = time.perf_counter()
        for world in [int(x) for x in args.worlds.split(",")]:
            if args.wait_quiet > 0 and lim.wait_quiet(args.wait_quiet) >= args.wait_quiet:
                print(f"  (machine still busy after {args.wait_quiet:.0f} s; going on)")
            result["worlds"].append(run_world(args, world, base))
            print(f"[{time.perf_counter() - t_start:5.0f} s] world {world} done", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(f"torch {torch.__version__}, asyncckpt {ac.__version__} at {result['revision']}; "
          f"{result['cpus']} CPUs; OMP_NUM_THREADS={result['omp_num_threads']} per rank; "
          f"directory on {result['filesystem']}")
    print(f"state per rank: {args.mib_per_rank} MiB float32 ({args.replicated_share:.0%} "
          f"replicated); medians of {args.saves} saves per rank (after one warm-up), max over "
          f"ranks; DCP FileSystemWriter sync_files default = {sync_files}")
    for w in result["worlds"]:
        unique = w["unique_bytes"]
        print(f"\nworld {w['world']}: {unique / MiB:.0f} MiB unique state in all ranks "
              f"({w['seconds']:.0f} s; other processes used {w['other_cores']:.2f} cores)")
        print(world_table(w, unique))
        cs, a = w["configs"], w["configs"]["asyncckpt"]
        for name in ("dcp_async", "dcp_async_stager", "dcp_async_cached"):
            if "error" not in cs[name]:
                c = cs[name]
                print(f"  asyncckpt blocking / {CONFIGS[name]}: "
                      f"{ratio(a['blocking_s'], c['blocking_s'])} (until reusable: "
                      f"{ratio(a['reusable_s'], c['reusable_s'])})")
        print(f"  asyncckpt durable / DCP synchronous save: "
              f"{ratio(a['durable_s'], cs['dcp_sync']['durable_s'])} (target <= 1.00; against "
              f"DCP's return, without the directory fsyncs: "
              f"{ratio(a['durable_s'], cs['dcp_sync']['blocking_s'])})")
        for name, c in cs.items():
            if "error" in c:
                print(f"  {CONFIGS[name]}: {c['error']}")
        if w["other_cores"] > 0.25:
            print(f"  WARNING: other processes used {w['other_cores']:.2f} of {os.cpu_count()} "
                  f"cores: these figures are contended")
    print("\nblocking = until the save call returns; reusable = until the state may change "
          "(DefaultStager: its staging future); durable = until committed (asyncckpt: files and "
          "directories fsynced; DCP: its files fsynced by DCP, then the directory and its parent "
          "by rank 0, which DCP leaves out); durable GB/s = unique "
          "state bytes / durable; ac ... / this = asyncckpt's figure over the row's.")
    print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
