"""Side by side with the peers (issue 7): the comparison users will read.

Run: python bench/report.py [--sizes 256MiB,1GiB] [--repeats 3] [--dir PATH] [--no-docs]

One torch state dict (the model-like state of bench_engine.py as a flat dict of ~400 CPU
tensors: float32 weights ~50%, Adam moments ~35%, a bfloat16 part ~15%) at each size, saved by
every system in turn, pair by pair: for each repeat every system runs once, in the same order,
so drift of the machine (its disk changes speed by 2x within a minute) hits all of them alike;
each repeat starts one system later, so no system always runs right after the same one.
One warm-up save per system first (not counted). Medians and min-max over the repeats.

  asyncckpt foreground   ``await ckpt.write(path)``: blocking = durable (returns durable).
  asyncckpt foreground,  the same with ``CheckpointOptions(adaptive_compression=False)``:
  zstd every chunk       every chunk byte-shuffled and zstd-compressed, whether or not that
                         is faster than writing it raw (the default decides per chunk).
  asyncckpt background   ``await manager.start_save()``: blocking = until it returns (the
                         caller may change its tensors); durable = until ``handle.wait()``.
                         The deletion of the checkpoint ``max_to_keep=1`` retires is then
                         awaited untimed (``wait_until_finished``), so it never overlaps the
                         next system's save.
  np.save + fsync        every array ``np.save``d into one file (bf16 as its uint16 bits).
  torch.save + fsync     blocking = the call; durable = + fsync of the file and directory.
  to_thread(torch.save)  ``await asyncio.to_thread(save + fsync)``: the event loop is free, but
                         the caller may change its tensors only when it finished (torch.save
                         copies nothing first), so blocking = durable.
  safetensors + fsync    ``safetensors.torch.save_file``.
  DCP async_save         ``torch.distributed.checkpoint.async_save`` in one process (gloo,
                         world size 1), with one reused ``FileSystemWriter(...,
                         cache_staged_state_dict=True)`` as its stager (staging buffers kept
                         between saves: the fastest documented CPU configuration); blocking =
                         until async_save returns, durable = its future + fsync of its files.
  orbax                  ``ocp.StandardCheckpointer`` (async): blocking = until ``save``
                         returns (tensors handed over as numpy views), durable =
                         ``wait_until_finished`` + fsync of its files.

Peers that cannot be imported are reported as missing, with the import error.
Limits measured in the same run, interleaved with the saves (bench/_limits.py): memcpy into
reused buffers (1 and 2 threads) and write + fsync of the same raw bytes (plain, and with
``sync_file_range`` every 64 MiB).

Writes docs/benchmarks.png and the section between ``<!-- report:begin -->`` and
``<!-- report:end -->`` in docs/benchmarks.md (``--no-docs``: print only). Every file the run
writes lives in one temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _limits as lim  # noqa: E402
from bench_engine import leaves, make_state, parse_size  # noqa: E402

import asyncckpt as ac  # noqa: E402

MiB = 1 << 20
GB = 1e9
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
SECTION = "## Side by side with the peers (issue 7)"

# --- the state ---------------------------------------------------------------------------------


def torch_state(size: int) -> dict[str, Any]:
    """A flat torch state dict of ~400 tensors sharing the numpy state's memory."""
    import torch
    out: dict[str, Any] = {}
    for path, a in leaves(make_state(size)):
        if a.dtype == np.float32:
            out[path.replace("/", ".")] = torch.from_numpy(a)
        else:  # ml_dtypes bfloat16 -> torch.bfloat16, same bits
            out[path.replace("/", ".")] = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return out


def numpy_view(t: Any) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


def stored_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def fsync_tree(path: str) -> None:
    """fsync a file, or every file and directory below a directory; then its parent."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for f in files:
                lim.fsync_path(os.path.join(root, f))
            lim.fsync_path(root)
    else:
        lim.fsync_path(path)
    lim.fsync_path(os.path.dirname(path))


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


# --- systems -----------------------------------------------------------------------------------

Timing = tuple[float, float, str]   # blocking s, durable s, path written
SMALLEST = "asyncckpt foreground, zstd every chunk"


@dataclass
class System:
    name: str
    kind: str                      # "ours", "sync" (synchronous peer), "async" (async peer)
    save: Callable[[str], Awaitable[Timing]] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    missing: str | None = None
    note: str = ""
    blocking: list[float] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)


async def make_systems(state: dict[str, Any], base: str) -> list[System]:
    systems: list[System] = []
    ckpt = ac.Checkpoint(model=state)

    async def fg(path: str) -> Timing:
        t0 = time.perf_counter()
        await ckpt.write(path)
        t = time.perf_counter() - t0
        return t, t, path
    systems.append(System("asyncckpt foreground (write)", "ours", fg))

    small = ac.CheckpointOptions(adaptive_compression=False)
    # Its own Checkpoint: the disk speed a Checkpoint learns from its saves steers its
    # compress-or-not decisions, and this config's CPU-bound saves would lower it for the
    # default configs.
    dense = ac.Checkpoint(model=state)

    async def fg_small(path: str) -> Timing:
        t0 = time.perf_counter()
        await dense.write(path, options=small)
        t = time.perf_counter() - t0
        return t, t, path
    systems.append(System(SMALLEST, "ours", fg_small))

    manager = ac.CheckpointManager(ckpt, os.path.join(base, "managed"), max_to_keep=1)
    await manager.__aenter__()

    async def bg(path: str) -> Timing:
        t0 = time.perf_counter()
        handle = await manager.start_save()
        t1 = time.perf_counter()
        written = await handle.wait()
        t2 = time.perf_counter()
        # Durable at t2; the manager then deletes the checkpoint max_to_keep retires. Let
        # that finish here, untimed, so it does not run into the next system's save.
        await manager.wait_until_finished()
        return t1 - t0, t2 - t0, written

    async def bg_close() -> None:
        await manager.__aexit__(None, None, None)
    systems.append(System("asyncckpt background (start_save)", "ours", bg, bg_close))

    def np_save(path: str) -> None:
        with open(path, "wb") as f:
            for t in state.values():
                np.save(f, numpy_view(t))

    def sync_peer(name: str, fn: Callable[[str], None]) -> System:
        async def run(path: str) -> Timing:
            t0 = time.perf_counter()
            fn(path)
            t1 = time.perf_counter()
            fsync_tree(path)
            return t1 - t0, time.perf_counter() - t0, path
        return System(name, "sync", run)

    systems.append(sync_peer("np.save (one file) + fsync", np_save))
    try:
        import torch
    except ImportError as e:
        for n in ("torch.save + fsync", "to_thread(torch.save + fsync)"):
            systems.append(System(n, "sync", missing=repr(e)))
    else:
        systems.append(sync_peer("torch.save + fsync", lambda p: torch.save(state, p)))

        def torch_save_synced(path: str) -> None:
            torch.save(state, path)
            fsync_tree(path)

        async def offloaded(path: str) -> Timing:
            t0 = time.perf_counter()
            task = asyncio.ensure_future(asyncio.to_thread(torch_save_synced, path))
            loop_blocked = time.perf_counter() - t0
            await task
            t = time.perf_counter() - t0
            offloaded.loop_blocked.append(loop_blocked)  # type: ignore[attr-defined]
            return t, t, path
        offloaded.loop_blocked = []  # type: ignore[attr-defined]
        s = System("to_thread(torch.save + fsync)", "async", offloaded)
        s.note = "loop_blocked"
        s.loop_blocked = offloaded.loop_blocked  # type: ignore[attr-defined]
        systems.append(s)
    try:
        import safetensors.torch as stt
    except ImportError as e:
        systems.append(System("safetensors save_file + fsync", "sync", missing=repr(e)))
    else:
        systems.append(sync_peer("safetensors save_file + fsync",
                                 lambda p: stt.save_file(state, p)))
    systems.extend(await dcp_systems(state, base))
    systems.append(orbax_system(state))
    return systems


async def dcp_systems(state: dict[str, Any], base: str) -> list[System]:
    """Two configurations of DCP async_save, both reusing their stager across saves.

    ``cache_staged_state_dict=True`` (FileSystemWriter) pins memory and fails without CUDA, so
    on a CPU machine the candidates are: one reused ``FileSystemWriter`` (blocking staging
    copy inside async_save), and one reused ``DefaultStager(StagingOptions(use_async_staging=
    True, others False))``, whose async_save returns before the copy is taken: its blocking
    time is until ``staging_completion`` resolves (before that the caller may not change its
    tensors); the time async_save itself took is kept in ``call_s``.
    """
    names = ("DCP async_save (reused FileSystemWriter)",
             "DCP async_save (DefaultStager, async staging)")
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError as e:
        return [System(n, "async", missing=repr(e)) for n in names]
    try:
        owned_pg = False
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="file://" + os.path.join(base, "pg-init"),
                                    rank=0, world_size=1)
            owned_pg = True
        writer = FileSystemWriter(os.path.join(base, "dcp-unused"))
        stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                              use_async_staging=True,
                                              use_non_blocking_copy=False))
    except Exception as e:  # noqa: BLE001
        return [System(n, "async", missing=f"{type(e).__name__}: {e}") for n in names]

    def runner(kwargs: dict[str, Any], calls: list[float]) -> Callable[[str], Awaitable[Timing]]:
        async def run(path: str) -> Timing:
            t0 = time.perf_counter()
            resp = dcp.async_save(state, checkpoint_id=path, **kwargs)
            t_call = time.perf_counter() - t0
            staged = getattr(resp, "staging_completion", None)
            if staged is not None:
                await asyncio.wrap_future(staged)
            t1 = time.perf_counter()
            await asyncio.wrap_future(getattr(resp, "upload_completion", resp))
            await asyncio.to_thread(fsync_tree, path)
            calls.append(t_call)
            return t1 - t0, time.perf_counter() - t0, path
        return run

    async def close() -> None:
        try:
            stager.close()
        except Exception:  # noqa: BLE001
            pass
        if owned_pg:
            dist.destroy_process_group()
    out = []
    for n, kw in zip(names, ({"storage_writer": writer}, {"async_stager": stager})):
        s = System(n, "async")
        s.call_s = []  # type: ignore[attr-defined]
        s.save = runner(kw, s.call_s)  # type: ignore[attr-defined]
        out.append(s)
    out[-1].close = close
    return out


def orbax_system(state: dict[str, Any]) -> System:
    name = "orbax StandardCheckpointer (async)"
    try:
        import orbax.checkpoint as ocp
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken dependency)
        return System(name, "async", missing=f"{type(e).__name__}: {e}")
    import ml_dtypes
    checkpointer = ocp.StandardCheckpointer()

    def tree() -> dict[str, np.ndarray]:
        import torch
        return {k: (t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
                    if t.dtype == torch.bfloat16 else t.numpy()) for k, t in state.items()}

    async def run(path: str) -> Timing:
        # orbax runs its own event loop: call it from a thread, as an asyncio program must
        t0 = time.perf_counter()
        await asyncio.to_thread(checkpointer.save, path, tree())
        t1 = time.perf_counter()
        await asyncio.to_thread(checkpointer.wait_until_finished)
        await asyncio.to_thread(fsync_tree, path)
        return t1 - t0, time.perf_counter() - t0, path

    async def close() -> None:
        await asyncio.to_thread(checkpointer.close)
    return System(name, "async", run, close)


# --- one size ----------------------------------------------------------------------------------


async def run_size(size: int, repeats: int, base: str, log: Callable[[str], None]
                   ) -> dict[str, Any]:
    state = torch_state(size)
    arrays = [numpy_view(t) for t in state.values()]
    raw = sum(a.nbytes for a in arrays)
    work = tempfile.mkdtemp(prefix=f"size-{size >> 20}MiB-", dir=base)
    floors = lim.Floors(arrays, work)
    systems = await make_systems(state, work)
    waited = lim.wait_quiet(10.0)
    watch = lim.CpuWatch()
    try:
        for r in range(repeats + 1):          # r == 0: warm-up, not counted
            # Each repeat starts one system later, so no system always follows the same one
            # (a peer's page-cache or journal work spilling into the next is spread evenly).
            for s in systems[r % len(systems):] + systems[:r % len(systems)]:
                if s.missing:
                    continue
                path = os.path.join(work, f"out-{len(s.blocking)}-{abs(hash(s.name))}")
                try:
                    b, d, written = await s.save(path)
                except Exception as e:  # noqa: BLE001
                    s.missing = f"failed: {type(e).__name__}: {e}"
                    traceback.print_exc()
                    continue
                n = stored_bytes(written)
                if s.kind != "ours" or "foreground" in s.name:
                    remove(written)
                if r:
                    s.blocking.append(b)
                    s.durable.append(d)
                    s.stored.append(n)
                gc.collect()
            floors.memcpy(1)
            floors.memcpy(2)
            floors.write_fsync()
            floors.write_fsync(early_writeback=True)
            log(f"  {size / MiB:.0f} MiB: repeat {r}/{repeats} done"
                + (" (warm-up)" if r == 0 else ""))
    finally:
        for s in systems:
            if s.close is not None and s.save is not None:
                try:
                    await s.close()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
        floors.close()
        shutil.rmtree(work, ignore_errors=True)
    cpu = watch.result()
    limits = {k: list(v) for k, v in floors.samples.items()}
    out = {"size": size, "raw": raw, "tensors": len(state), "systems": systems,
           "limits": limits, "other_cores": cpu["other_cores"], "waited_quiet_s": waited}
    del state, arrays, floors, systems
    gc.collect()
    return out


# --- report ------------------------------------------------------------------------------------


def med(v: list[float]) -> float:
    return statistics.median(v)


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def cell(v: list[float]) -> str:
    return f"{fmt_ms(med(v))} ({fmt_ms(min(v))}-{fmt_ms(max(v))})"


def size_name(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MiB:g} MiB"


def evaluate(res: dict[str, Any]) -> tuple[str, list[str]]:
    systems: list[System] = res["systems"]
    ok = [s for s in systems if not s.missing and s.blocking]
    peers = [s for s in ok if s.kind != "ours"]
    best_block = min((med(s.blocking) for s in peers), default=float("nan"))
    best_dur = min((med(s.durable) for s in peers), default=float("nan"))
    best_stored = min((med(s.stored) for s in peers), default=float("nan"))
    rows = ["| system | blocking ms (min-max) | durable ms (min-max) | stored bytes "
            "| blocking / best peer | durable / best peer | stored / best peer |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for s in systems:
        if s.missing or not s.blocking:
            rows.append(f"| {s.name} | missing | | | | | |")
            continue
        rows.append(f"| {s.name} | {cell(s.blocking)} | {cell(s.durable)} | "
                    f"{int(med(s.stored)):,} | {med(s.blocking) / best_block:.3f} | "
                    f"{med(s.durable) / best_dur:.2f} | {med(s.stored) / best_stored:.4f} |")
    lim_rows = ["| limit (same run, same raw bytes) | median ms (min-max) | GB/s |",
                "|---|---:|---:|"]
    names = {"memcpy_1t": "memcpy into reused buffers, 1 thread",
             "memcpy_2t": "memcpy into reused buffers, 2 threads",
             "write_fsync": "os.write 8 MiB blocks + fsync, fresh file",
             "write_sfr_fsync": "the same + sync_file_range every 64 MiB"}
    for k, label in names.items():
        v = res["limits"].get(k)
        if v:
            lim_rows.append(f"| {label} | {cell(v)} | {res['raw'] / med(v) / GB:.2f} |")

    # targets
    lines = []
    by = {s.name: s for s in ok}
    bg = by.get("asyncckpt background (start_save)")
    fg = by.get("asyncckpt foreground (write)")
    sync = [s for s in ok if s.kind == "sync"]
    if bg and sync:
        best = min(sync, key=lambda s: med(s.blocking))
        ratio = med(best.blocking) / med(bg.blocking)
        floor = ""
        copies = [med(v) for k, v in res["limits"].items() if k.startswith("memcpy") and v]
        if copies and ratio < 10:
            f = min(copies)
            reach = med(best.blocking) / f
            floor = (f" (the memcpy of the same bytes into reused buffers took {fmt_ms(f)} ms, "
                     f"{reach:.1f}x lower than that peer"
                     + (": a snapshot that copies cannot reach 10x on this machine)"
                        if reach < 10 else ")"))
        lines.append(f"- Blocking time per save at least 10x lower than the best synchronous peer "
                     f"({best.name}, {fmt_ms(med(best.blocking))} ms): start_save "
                     f"{fmt_ms(med(bg.blocking))} ms, {ratio:.1f}x lower: "
                     f"**{'PASS' if ratio >= 10 else 'MISS'}**{floor}")
    if peers and (fg or bg):
        fast = min(peers, key=lambda s: med(s.durable))
        parts, all_ok = [], True
        for s in (fg, bg):
            if s:
                r = med(s.durable) / med(fast.durable)
                all_ok &= r <= 1.0
                parts.append(f"{'foreground' if s is fg else 'background'} "
                             f"{fmt_ms(med(s.durable))} ms ({r:.2f}x)")
        lines.append(f"- Time to durable no worse than the fastest peer that fsyncs "
                     f"({fast.name}, {fmt_ms(med(fast.durable))} ms): " + ", ".join(parts)
                     + f": **{'PASS' if all_ok else 'MISS'}**")
    dcps = [x for x in ok if x.name.startswith("DCP")]
    if bg and dcps:
        dcp_s = min(dcps, key=lambda x: med(x.blocking))
        r = med(dcp_s.blocking) / med(bg.blocking)
        lines.append(f"- Lower blocking time than DCP async_save (its fastest configuration here, "
                     f"{dcp_s.name[len('DCP async_save '):].strip('()')}: {fmt_ms(med(dcp_s.blocking))} ms"
                     f"): start_save {fmt_ms(med(bg.blocking))} ms ({r:.1f}x lower): "
                     f"**{'PASS' if r > 1 else 'MISS'}**")
    elif bg:
        lines.append("- Lower blocking time than DCP async_save: DCP missing, not evaluated")
    dense = by.get(SMALLEST)
    if (fg or bg or dense) and peers:
        smallest = min(peers, key=lambda s: med(s.stored))
        least = med(smallest.stored)
        parts = []
        for s, label in ((fg or bg, "default"), (dense, "zstd every chunk")):
            if s:
                n = med(s.stored)
                parts.append(f"{label} {int(n):,} B ({n / res['raw']:.4f}x raw, at most "
                             f"{sum(n <= med(p.stored) for p in peers)} of {len(peers)} peers)")
        passed = dense is not None and med(dense.stored) <= least
        speed = ""
        if dense:
            speed = (f"; zstd every chunk is durable in {fmt_ms(med(dense.durable))} ms vs "
                     f"{fmt_ms(med(smallest.durable))} ms for {smallest.name}")
        lines.append(f"- Stored bytes at most the peers' (fp32 + Adam + bf16 state), smallest "
                     f"peer {smallest.name} {int(least):,} B ({least / res['raw']:.4f}x raw): "
                     f"asyncckpt " + ", ".join(parts) + speed + ": "
                     f"**{'PASS' if passed else 'MISS'}** (the default stores a chunk "
                     f"compressed only where that is faster than writing it raw)")
    table = "\n".join(rows) + "\n\n" + "\n".join(lim_rows)
    return table, lines


def machine() -> str:
    import torch
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    fs = "?"
    tmp = os.path.realpath(tempfile.gettempdir())
    try:
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (tmp == mnt or tmp.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, typ
    except OSError:
        pass
    vers = [f"Python {platform.python_version()}", f"numpy {np.__version__}",
            f"torch {torch.__version__}"]
    from importlib import metadata
    for dist_name in ("safetensors", "orbax-checkpoint", "tensorstore", "jax", "asyncckpt"):
        try:
            vers.append(f"{dist_name} {metadata.version(dist_name)}")
        except metadata.PackageNotFoundError:
            vers.append(f"{dist_name} not installed")
    return (f"{os.cpu_count()} CPUs, {mem:.1f} GiB RAM, {platform.machine()} Linux "
            f"{platform.release()}, temp dir {tmp} on {fs}; " + ", ".join(vers))


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [s.name for s in results[0]["systems"]]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    width = 0.8 / len(results)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, attr, title in ((axes[0], "blocking", "blocking time per save (ms)"),
                            (axes[1], "durable", "time to durable (ms)")):
        for k, res in enumerate(results):
            xs, ys, lo, hi = [], [], [], []
            for i, s in enumerate(res["systems"]):
                v = getattr(s, attr)
                if s.missing or not v:
                    ax.text(i + (k - (len(results) - 1) / 2) * width, 1, "missing",
                            rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                m = med(v) * 1e3
                xs.append(i + (k - (len(results) - 1) / 2) * width)
                ys.append(m)
                lo.append(m - min(v) * 1e3)
                hi.append(max(v) * 1e3 - m)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=size_name(res["size"]),
                   color=colors[k % len(colors)])
        ax.set_yscale("log")
        ax.set_title(title + ", median, bars = min-max")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(title="state size")
    fig.suptitle("asyncckpt vs peers on the same torch state dict (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(md_path: str, body: str) -> None:
    with open(md_path, encoding="utf-8") as f:
        text = f.read()
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        anchor = "## Your own storage"
        insert = f"{SECTION}\n\n{block}\n\n"
        if anchor in text:
            i = text.index(anchor)
            text = text[:i] + insert + text[i:]
        else:
            text = text.rstrip("\n") + "\n\n" + insert
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)


async def amain(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {msg}", flush=True)

    base = tempfile.mkdtemp(prefix="asyncckpt-report-", dir=args.dir)
    results = []
    try:
        for size in sizes:
            log(f"size {size_name(size)}")
            results.append(await run_size(size, args.repeats, base, log))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    command = "python bench/report.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = [f"Command: `{command.strip()}` ({time.perf_counter() - t_start:.0f} s). "
           f"Machine: {machine()}.",
           "",
           f"State: a flat torch state dict (CPU tensors) made by `bench_engine.make_state`: "
           f"float32 weights ~50%, Adam moments ~35%, bfloat16 ~15% of the bytes. "
           f"Repeats: {args.repeats} per system after one warm-up save each, interleaved "
           f"(each repeat runs every system once, in turn, starting one system later than the "
           f"repeat before); median (min-max). asyncckpt runs three configurations: foreground "
           f"`write` with default options and background `start_save` through a "
           f"`CheckpointManager` (`max_to_keep=1`; the deletion of the retired checkpoint is "
           f"awaited untimed), sharing one `Checkpoint` (its staging pool), and foreground "
           f"`write` with `adaptive_compression=False` (every chunk byte-shuffled and "
           f"zstd-compressed) on a `Checkpoint` of its own. "
           f"DCP runs in one process (gloo, "
           f"world size 1) in two configurations, each reusing its stager across saves: one "
           f"`FileSystemWriter` (staging copy inside `async_save`) and one "
           f"`DefaultStager(StagingOptions(use_async_staging=True))` (other options off); "
           f"`FileSystemWriter(cache_staged_state_dict=True)`, the documented buffer-reuse "
           f"option, pins memory and fails without CUDA (`RuntimeError: Cannot access "
           f"accelerator device when none is available`). With async staging `async_save` "
           f"returns before the copy is taken ({{dcpcall}}), so its blocking time is until "
           f"`staging_completion` resolves: before that the caller may not change its tensors.",
           "",
           "Columns: **blocking** = until the caller may change its tensors again (sync peers: "
           "the save call, without fsync); **durable** = until the bytes are fsynced (peers: "
           "+ fsync of every written file and the directory); **stored** = sum of file sizes. "
           "Ratios are against the best peer (not asyncckpt) in each column. "
           "`to_thread(torch.save + fsync)` leaves the event loop free (it is blocked "
           "{loop} ms) but copies nothing, so the tensors are only free again when it "
           "finished: blocking = durable.",
           ""]
    loop_blocked = []
    all_lines = []
    for res in results:
        for s in res["systems"]:
            if hasattr(s, "loop_blocked") and s.loop_blocked:
                loop_blocked.extend(s.loop_blocked)
    out[4] = out[4].replace("{loop}", fmt_ms(med(loop_blocked)) if loop_blocked else "~0")
    calls = []
    for res in results:
        for s in res["systems"]:
            if "async staging" in s.name and getattr(s, "call_s", None):
                calls.append(f"{size_name(res['size'])}: {fmt_ms(med(s.call_s))} ms")
    out[2] = out[2].replace("{dcpcall}", "the call took " + ", ".join(calls) if calls
                            else "not measured")
    for res in results:
        table, lines = evaluate(res)
        contended = res["other_cores"] > 0.5
        out += [f"### {size_name(res['size'])} ({res['tensors']} tensors, "
                f"{res['raw']:,} raw bytes)", "",
                f"Other processes used {res['other_cores']:.2f} cores during this size"
                + (" (**contended: figures not to be trusted**)." if contended else "."), "",
                table, "", "Targets (issue 7):", ""] + lines + [""]
        all_lines += [f"{size_name(res['size'])}: {ln[2:]}" for ln in lines]
    missing = [(s.name, s.missing) for s in results[0]["systems"] if s.missing]
    if missing:
        out += ["Missing peers: " + "; ".join(f"{n}: `{m}`" for n, m in missing) + ".", ""]
    out += ["![blocking time and time to durable per system, by size (log scale)]"
            "(benchmarks.png)", ""]
    body = "\n".join(out)
    print()
    print(body)
    if not args.no_docs:
        plot(results, os.path.join(ROOT, "docs", "benchmarks.png"))
        update_docs(os.path.join(ROOT, "docs", "benchmarks.md"), body)
        log("wrote docs/benchmarks.png and the report section of docs/benchmarks.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256MiB,1GiB", help="comma-separated (default 256MiB,1GiB)")
    p.add_argument("--repeats", type=int, default=3, help="counted saves per system (default 3)")
    p.add_argument("--dir", default=None, help="parent of the temporary directory")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/ unchanged")
    args = p.parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
