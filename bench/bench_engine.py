"""The save/restore engine against this machine's physical limits (issue 9).

Run: python bench/bench_engine.py [--size 1GiB] [--repeats 3] [--dir PATH] [--json FILE]

One synthetic model state (default 1 GiB, ~400 arrays of varied sizes):
  * float32 weights, ~50% of the bytes (init-scale normal values);
  * Adam moments for the trainable weights, ~35%: ``exp_avg`` small normal values,
    ``exp_avg_sq`` squares of small values (as a real optimizer holds them);
  * a frozen bfloat16 part, ~15% (needs ml_dtypes; skipped without it);
  * a few scalars (step, learning rate, betas, a numpy loss scale, a name).
and a "compressible" variant of it: optimizer state early in training, where most rows of
``exp_avg`` / ``exp_avg_sq`` are still exactly zero (rows never touched yet).

Measured in the same run (bench/_limits.py): memcpy into reused buffers (the floor of a
snapshot), write + fsync of the same raw bytes, cold read, zstd level 1 per core. Then, for the
default options and for ``compression="none"`` (and the default on the compressible variant):
snapshot seconds (blocking), time to durable (``SaveMetrics.total_seconds``), stored/raw, and
cold in-place restore seconds (page cache of the shard files dropped before each restore).
Saves are medians over ``--repeats`` after one warm-up save (the staging pool is reused).
Peers (np.savez, safetensors.numpy) are run on the same state when importable.

Targets: snapshot / memcpy <= 1.3; durable / (write + fsync of the raw bytes) <= 1.25 on
incompressible data and < 1 on compressible data; restore GB/s / min(cold read, zstd
decompress) >= 0.8 (decompress only counts when some chunk is stored compressed).
All files are written in a temporary directory (under --dir, default the system temp dir)
that is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _limits as lim  # noqa: E402

import asyncckpt as ac  # noqa: E402

try:
    import ml_dtypes
except ImportError:  # the bfloat16 part is skipped
    ml_dtypes = None

GB = 1e9
MiB = 1 << 20

# --- the state ---------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB, 1GiB, 1e9)")
    unit = m.group(2).upper()
    base = 1024 if (m.group(3) or not unit) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit or " "))


def _sizes(rng: np.random.Generator, count: int, total: int, itemsize: int, cols: int
           ) -> list[tuple[int, ...]]:
    """Shapes of ``count`` arrays adding up to about ``total`` bytes: a quarter are small
    vectors (norms, biases), the rest matrices with lognormal sizes."""
    n_vec = count // 4
    vec_elems = [int(rng.choice([256, 1024, 2048, 4096, 8192])) for _ in range(n_vec)]
    left = max(total - sum(vec_elems) * itemsize, 0)
    weights = rng.lognormal(0.0, 0.9, count - n_vec)
    shapes: list[tuple[int, ...]] = [(n,) for n in vec_elems]
    for w in weights:
        rows = max(1, int(left * w / weights.sum()) // (itemsize * cols))
        shapes.append((rows, cols))
    order = rng.permutation(len(shapes))
    return [shapes[i] for i in order]


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(scale)
    return a


def make_state(size: int, *, seed: int = 0, early_training: bool = False) -> dict[str, Any]:
    """The tracked values: ``{"model": ..., "optimizer": ..., "step": ...}``.

    ``early_training``: most rows (90%) of both Adam moments are exactly zero.
    """
    rng = np.random.default_rng(seed)
    bf16_share = 0.15 if ml_dtypes is not None else 0.0
    moment_share = 0.35
    weight_share = 1.0 - bf16_share - moment_share
    trainable_bytes = int(size * moment_share / 2)
    frozen_bytes = int(size * weight_share) - trainable_bytes

    model: dict[str, Any] = {}
    opt_state: dict[int, dict[str, Any]] = {}
    trainable = _sizes(rng, 90, trainable_bytes, 4, 1024)
    for i, shape in enumerate(trainable):
        w = _normal(rng, shape, 0.02)
        model[f"block{i // 6}.trainable{i % 6}.weight"] = w
        m = _normal(rng, shape, 1e-3)
        v = _normal(rng, shape, 1e-3)
        np.square(v, out=v)
        if early_training:
            rows = shape[0]
            zero = rng.random(rows) < 0.9
            m[zero] = 0
            v[zero] = 0
        opt_state[i] = {"step": np.float32(1000.0), "exp_avg": m, "exp_avg_sq": v}
    for i, shape in enumerate(_sizes(rng, 60, frozen_bytes, 4, 1024)):
        model[f"frozen{i}.weight"] = _normal(rng, shape, 0.02)
    if ml_dtypes is not None:
        bf16 = {}
        for i, shape in enumerate(_sizes(rng, 70, int(size * bf16_share), 2, 2048)):
            bf16[f"tower{i}.weight"] = _normal(rng, shape, 0.02).astype(ml_dtypes.bfloat16)
        model["bf16_tower"] = bf16
    optimizer = {
        "state": opt_state,
        "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                          "params": list(range(len(trainable)))}],
        "loss_scale": np.float32(65536.0),
        "name": "adamw",
    }
    return {"model": model, "optimizer": optimizer, "step": 1000}


def leaves(tree: Any, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """(path, array) for every non-scalar numpy array in the tree."""
    out: list[tuple[str, np.ndarray]] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.extend(leaves(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for k, v in enumerate(tree):
            out.extend(leaves(v, f"{prefix}/{k}"))
    elif isinstance(tree, np.ndarray) and tree.ndim:
        out.append((prefix, tree))
    return out


def describe_state(tree: dict[str, Any]) -> dict[str, Any]:
    arrays = [a for _, a in leaves(tree)]
    raw = sum(a.nbytes for a in arrays)
    kinds = {"fp32 weights": 0, "adam moments": 0, "bf16": 0}
    for p, a in leaves(tree):
        if "exp_avg" in p:
            kinds["adam moments"] += a.nbytes
        elif a.dtype == np.float32:
            kinds["fp32 weights"] += a.nbytes
        else:
            kinds["bf16"] += a.nbytes
    sizes = sorted(a.nbytes for a in arrays)
    return {"raw_bytes": raw, "arrays": len(arrays),
            "shares": {k: v / raw for k, v in kinds.items()},
            "smallest_array": sizes[0], "median_array": sizes[len(sizes) // 2],
            "largest_array": sizes[-1]}


# --- limits ------------------------------------------------------------------------------------


def measure_zstd(arrays: list[np.ndarray], repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    frames = lim.sample_frames(arrays, total=64 * MiB)
    for t in (1, 2):
        z = lim.zstd_throughput(frames, level=1, threads=t, repeats=repeats)
        out[f"zstd_compress_{t}t_bps"] = z["compress_bps"]
        out[f"zstd_decompress_{t}t_bps"] = z["decompress_bps"]
        out["zstd_ratio"] = z["ratio"]
        out["zstd_sample_bytes"] = z["sample_bytes"]
    return out


def floor_medians(samples: dict[str, list[float]]) -> dict[str, float]:
    out = {f"{k}_s": statistics.median(v) for k, v in samples.items()}
    out["memcpy_s"] = min(out["memcpy_1t_s"], out["memcpy_2t_s"])
    out["cold_read_s"] = min(out["cold_read_1t_s"], out["cold_read_2t_s"])
    return out


# --- the engine --------------------------------------------------------------------------------


def manifest_stats(path: str) -> dict[str, int]:
    """Raw bytes stored compressed / raw, read from manifest.json (docs/format.md)."""
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        data = f.read()
    body = json.loads(data[data.index(b"\n") + 1:])
    zstd_raw = raw_raw = 0
    files = set()
    for arr in body["arrays"]:
        for c in arr["chunks"]:
            files.add(c["file"])
            if c["codec"] == "zstd":
                zstd_raw += c["raw_len"]
            else:
                raw_raw += c["raw_len"]
    return {"zstd_raw_bytes": zstd_raw, "raw_stored_raw_bytes": raw_raw, "shard_files": len(files)}


def _corrupt_some(tree: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Overwrite every 25th array with a constant; returns (array, expected) pairs."""
    picked = []
    for i, (_, a) in enumerate(leaves(tree)):
        if i % 25 == 0:
            picked.append((a, a.copy()))
            a.view(np.uint8).fill(0xA5)
    return picked


async def run_engine(tree: dict[str, Any], options: ac.CheckpointOptions, directory: str,
                     label: str, repeats: int, floors: lim.Floors) -> dict[str, Any]:
    """Warm-up save, then ``repeats`` saves each right after its floors (memcpy 1 and 2
    threads, write + fsync), then a warm-up restore and ``repeats`` cold restores each right
    after a cold read of the same bytes (1 and 2 threads)."""
    ckpt = ac.Checkpoint(**tree)
    paths = []
    saves = []
    samples: dict[str, list[float]] = {}
    watch = lim.CpuWatch()

    def floor(name: str, fn: Callable[[], float]) -> None:
        samples.setdefault(name, []).append(fn())

    try:
        for r in range(repeats + 1):               # r == 0: warm-up
            if r:
                floor("memcpy_1t", lambda: floors.memcpy(1))
                floor("memcpy_2t", lambda: floors.memcpy(2))
                floor("write_fsync", floors.write_fsync)
                floor("write_sfr_fsync", lambda: floors.write_fsync(early_writeback=True))
            path = os.path.join(directory, f"{label}-{r}")
            t0 = time.perf_counter()
            await ckpt.write(path, options=options)
            wall = time.perf_counter() - t0
            paths.append(path)
            m = ckpt.last_save_metrics
            if r:
                saves.append({"snapshot_s": m.snapshot_seconds, "durable_s": m.total_seconds,
                              "wall_s": wall, "stored_bytes": m.stored_bytes,
                              "raw_bytes": m.raw_bytes, "chunks": m.chunks,
                              "compressed_chunks": m.compressed_chunks,
                              "page_locked": m.page_locked})
            else:
                warm = {"snapshot_s": m.snapshot_seconds, "durable_s": m.total_seconds}
        last = paths[-1]
        restores = []
        for r in range(repeats + 1):               # r == 0: warm-up (also cold)
            if r:
                floor("cold_read_1t", lambda: floors.cold_read(1))
                floor("cold_read_2t", lambda: floors.cold_read(2))
            lim.drop_page_cache(last)
            t0 = time.perf_counter()
            status = await ckpt.restore(last, options=options)
            dt = time.perf_counter() - t0
            status.assert_consumed()
            if r:
                restores.append(dt)
        picked = _corrupt_some(ckpt.tracked)       # check the in-place restore really writes
        lim.drop_page_cache(last)
        await ckpt.restore(last, options=options)
        restore_ok = all(np.array_equal(a.view(np.uint8), e.view(np.uint8)) for a, e in picked)
        lim.drop_page_cache(last)
        t0 = time.perf_counter()
        loaded = await ac.load(last, options=options)
        load_s = time.perf_counter() - t0
        del loaded
        stats = manifest_stats(last)
    finally:
        del ckpt
        gc.collect()
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
    med = lambda key: statistics.median(s[key] for s in saves)  # noqa: E731
    return {
        "label": label, "options": repr(options), "warmup": warm,
        "snapshot_s": med("snapshot_s"), "durable_s": med("durable_s"), "wall_s": med("wall_s"),
        "snapshot_all_s": [s["snapshot_s"] for s in saves],
        "durable_all_s": [s["durable_s"] for s in saves],
        "raw_bytes": saves[0]["raw_bytes"], "stored_bytes": med("stored_bytes"),
        "chunks": saves[-1]["chunks"], "compressed_chunks": saves[-1]["compressed_chunks"],
        "page_locked": saves[-1]["page_locked"],
        "restore_s": statistics.median(restores), "restore_all_s": restores,
        "restore_verified": restore_ok, "load_fresh_s": load_s, **stats,
        "floor_samples": samples, "floors": floor_medians(samples), "cpu": watch.result(),
    }


# --- peers -------------------------------------------------------------------------------------


def run_peer(name: str, save: Callable[[str], None], load: Callable[[str], Any],
             directory: str, repeats: int) -> dict[str, Any]:
    blocking, durable, loads = [], [], []
    for r in range(repeats + 1):
        path = os.path.join(directory, f"peer-{r}")
        t0 = time.perf_counter()
        save(path)
        t1 = time.perf_counter()
        lim.fsync_path(path)
        lim.fsync_path(directory)
        t2 = time.perf_counter()
        if r:
            blocking.append(t1 - t0)
            durable.append(t2 - t0)
            lim.drop_page_cache(path)
            t0 = time.perf_counter()
            out = load(path)
            loads.append(time.perf_counter() - t0)
            del out
        os.unlink(path)
    return {"name": name, "blocking_s": statistics.median(blocking),
            "durable_s": statistics.median(durable), "load_s": statistics.median(loads)}


def peers(tree: dict[str, Any], directory: str, repeats: int) -> list[dict[str, Any]]:
    flat = {p: a for p, a in leaves(tree)}
    out = []

    def savez(path: str) -> None:
        with open(path, "wb") as f:
            np.savez(f, **flat)

    def loadz(path: str) -> dict[str, np.ndarray]:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    out.append(run_peer("np.savez + fsync", savez, loadz, directory, repeats))
    try:
        import safetensors.numpy as stn
    except ImportError:
        return out
    out.append(run_peer("safetensors.numpy save_file + fsync",
                        lambda p: stn.save_file(flat, p), stn.load_file, directory, repeats))
    return out


# --- report ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    import zstandard
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "memory_bytes": mem,
            "python": platform.python_version(), "numpy": np.__version__,
            "zstandard": zstandard.__version__,
            "ml_dtypes": getattr(ml_dtypes, "__version__", None),
            "rlimit_memlock": None if soft == resource.RLIM_INFINITY else soft}


def revision() -> str:
    """The package's git revision (read-only git commands), '+dirty' if asyncckpt/ has edits."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(ac.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "asyncckpt"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def fs_of(path: str) -> str:
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, f"{typ} ({dev} on {mnt})"
    except OSError:
        pass
    return fstype


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1)) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def gbps(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / GB:.2f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.0995 else f"{seconds * 1e3:.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def evaluate(run: dict[str, Any], zstd: dict[str, Any], compressible_target: bool
             ) -> dict[str, Any]:
    """The target ratios of one config, against the floors measured alongside its runs."""
    raw, fl = run["raw_bytes"], run["floors"]
    snap_ratio = run["snapshot_s"] / fl["memcpy_s"]
    durable_ratio = run["durable_s"] / fl["write_fsync_s"]
    cold_bps = raw / fl["cold_read_s"]
    restore_limit = cold_bps
    if run["compressed_chunks"]:
        restore_limit = min(cold_bps, zstd["zstd_decompress_2t_bps"])
    restore_bps = raw / run["restore_s"]
    # a stricter model of the restore floor: reading the stored bytes while 2 threads inflate
    # the compressed part (overlapped)
    floor_s = max(run["stored_bytes"] / cold_bps,
                  run["zstd_raw_bytes"] / zstd["zstd_decompress_2t_bps"])
    durable_target = 1.0 if compressible_target else 1.25
    return {
        "snapshot_over_memcpy": snap_ratio, "snapshot_pass": snap_ratio <= 1.3,
        "durable_over_write": durable_ratio, "durable_target": durable_target,
        "durable_pass": (durable_ratio < 1.0) if compressible_target else durable_ratio <= 1.25,
        "restore_limit_bps": restore_limit, "restore_bps": restore_bps,
        "restore_over_limit": restore_bps / restore_limit,
        "restore_pass": restore_bps / restore_limit >= 0.8,
        "restore_model_floor_s": floor_s,
    }


def limits_table(states: list[tuple[str, dict[str, list[float]], dict[str, Any], int]]) -> str:
    names = [("memcpy_1t", "memcpy into reused buffers, 1 thread"),
             ("memcpy_2t", "memcpy into reused buffers, 2 threads"),
             ("write_fsync", "os.write 8 MiB blocks + fsync, fresh file"),
             ("write_sfr_fsync", "the same + sync_file_range every 64 MiB"),
             ("cold_read_1t", "cold read (fadvise DONTNEED), 1 thread"),
             ("cold_read_2t", "cold read, 2 threads (8 MiB blocks interleaved)")]
    rows = []
    for label, samples, z, raw in states:
        for key, text in names:
            v = samples[key]
            med = statistics.median(v)
            rows.append([f"{label}: {text}", f"{ms(med)} ({ms(min(v))}-{ms(max(v))})",
                         gbps(raw, med), str(len(v))])
        rows.append([f"{label}: zstd-1 compress, 1 / 2 threads (ratio {z['zstd_ratio']:.3f})",
                     "", f"{z['zstd_compress_1t_bps'] / GB:.2f} / "
                     f"{z['zstd_compress_2t_bps'] / GB:.2f}", "3"])
        rows.append([f"{label}: zstd-1 decompress, 1 / 2 threads", "",
                     f"{z['zstd_decompress_1t_bps'] / GB:.2f} / "
                     f"{z['zstd_decompress_2t_bps'] / GB:.2f}", "3"])
    return table(["floor (same run, same bytes)", "median ms (min-max)", "GB/s", "n"], rows)


def engine_table(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    rows = []
    for run, ev in runs:
        raw, fl = run["raw_bytes"], run["floors"]
        rows.append([
            run["label"],
            f"{ms(run['snapshot_s'])} ({gbps(raw, run['snapshot_s'])})", ms(fl["memcpy_s"]),
            f"{ev['snapshot_over_memcpy']:.2f} {verdict(ev['snapshot_pass'])}",
            f"{ms(run['durable_s'])} ({gbps(raw, run['durable_s'])})", ms(fl["write_fsync_s"]),
            f"{ev['durable_over_write']:.2f} {verdict(ev['durable_pass'])}"
            + (" (<1)" if ev["durable_target"] == 1.0 else ""),
            f"{run['durable_s'] / fl['write_sfr_fsync_s']:.2f}",
            f"{run['stored_bytes'] / raw:.3f}", f"{run['compressed_chunks']}/{run['chunks']}",
            f"{ms(run['restore_s'])} ({gbps(raw, run['restore_s'])})",
            f"{ev['restore_limit_bps'] / GB:.2f}",
            f"{ev['restore_over_limit']:.2f} {verdict(ev['restore_pass'])}",
        ])
    return table(["config", "snapshot ms (GB/s)", "memcpy ms", "snap/memcpy <=1.3",
                  "durable ms (GB/s)", "write+fsync ms", "durable/write <=1.25",
                  "durable/(write+sfr)", "stored/raw", "zstd chunks", "restore ms (GB/s)", "limit GB/s",
                  "restore/limit >=0.8"], rows)


def peers_table(engine_runs: list[dict[str, Any]], peer_runs: list[dict[str, Any]],
                write_s: float) -> str:
    rows = []
    for r in engine_runs:
        rows.append([f"asyncckpt {r['label']}", ms(r["snapshot_s"]), ms(r["durable_s"]),
                     f"{r['durable_s'] / write_s:.2f}", ms(r["restore_s"]), ms(r["load_fresh_s"])])
    for p in peer_runs:
        rows.append([p["name"], ms(p["blocking_s"]), ms(p["durable_s"]),
                     f"{p['durable_s'] / write_s:.2f}", "-", ms(p["load_s"])])
    return table(["system (same state)", "blocking ms", "durable ms", "durable/write",
                  "restore in place ms", "load fresh ms"], rows)


def quiet(args: argparse.Namespace) -> None:
    """Let other processes' CPU bursts pass (this machine may be shared) before a phase."""
    if args.wait_quiet > 0:
        waited = lim.wait_quiet(args.wait_quiet)
        if waited >= args.wait_quiet:
            print(f"  (machine still busy after waiting {waited:.0f} s; going on)", flush=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=args.dir)
    result: dict[str, Any] = {"args": {"size": args.size, "repeats": args.repeats,
                                       "dir": base}, "machine": machine(),
                              "filesystem": fs_of(os.path.realpath(base)),
                              "revision": revision()}
    try:
        t_start = time.perf_counter()
        tree = make_state(args.size)
        info = describe_state(tree)
        arrays = [a for _, a in leaves(tree)]
        raw = info["raw_bytes"]
        result["state"] = info
        print(f"state: {raw / (1 << 30):.3f} GiB in {info['arrays']} arrays "
              f"({', '.join(f'{k} {v:.0%}' for k, v in info['shares'].items())}); arrays "
              f"{info['smallest_array'] / 1024:.0f} KiB .. {info['largest_array'] / MiB:.1f} "
              f"MiB, median {info['median_array'] / 1024:.0f} KiB; built in "
              f"{time.perf_counter() - t_start:.1f} s", flush=True)
        default = ac.CheckpointOptions()
        none = ac.CheckpointOptions(compression="none")
        runs = []
        per_state = []
        for state_label, early in (("model", False), ("early-training", True)):
            if early:
                tree = make_state(args.size, early_training=True)
                arrays = [a for _, a in leaves(tree)]
            quiet(args)
            zstd = measure_zstd(arrays, args.repeats)
            floors = lim.Floors(arrays, base)
            floors.prepare_read()
            try:
                configs = [("default (zstd adaptive)", default, early),
                           ('compression="none"', none, False)]
                for label, opts, target in configs:
                    label = f"{state_label}: {label}"
                    quiet(args)
                    r = await run_engine(tree, opts, base, f"ck{len(runs)}", args.repeats,
                                         floors)
                    r["label"], r["state"] = label, state_label
                    runs.append((r, evaluate(r, zstd, target)))
                    print(f"[{time.perf_counter() - t_start:5.0f} s] engine: {label} done",
                          flush=True)
            finally:
                floors.close()
            per_state.append((state_label, floors.samples, zstd, raw))
            result[f"zstd_{state_label}"] = zstd
            result[f"floors_{state_label}"] = floors.samples
            if not early:
                quiet(args)
                peer_runs = [] if args.no_peers else peers(tree, base, args.repeats)
                print(f"[{time.perf_counter() - t_start:5.0f} s] peers done", flush=True)
                peer_write_s = statistics.median(floors.samples["write_fsync"])
            del arrays, floors
            tree = None
            gc.collect()

        result["engine"] = [{**r, "eval": ev} for r, ev in runs]
        result["peers"] = peer_runs
        result["seconds"] = time.perf_counter() - t_start
        m = result["machine"]
        memlock = ("unlimited" if m["rlimit_memlock"] is None
                   else f"{m['rlimit_memlock'] // 1024} KiB")
        print()
        print(f"machine: {m['cpus']} CPUs, {m['memory_bytes'] / (1 << 30):.1f} GiB RAM, "
              f"{m['platform']}; python {m['python']}, numpy {m['numpy']}, zstandard "
              f"{m['zstandard']}, ml_dtypes {m['ml_dtypes']}; RLIMIT_MEMLOCK {memlock}")
        print(f"directory: {base} on {result['filesystem']}; asyncckpt {ac.__version__} at "
              f"{result['revision']}")
        print(f"state: {raw / (1 << 30):.3f} GiB raw, {info['arrays']} arrays; saves and restores "
              f"are medians of {args.repeats} after one warm-up; GB/s = 1e9 bytes/s of raw "
              f"state bytes")
        print()
        print(limits_table(per_state))
        print()
        print(engine_table(runs))
        print()
        print("Floors are medians of runs interleaved with the engine's: memcpy (the better of "
              "1/2 threads) and write+fsync right before each save, cold read right before each "
              "restore.\ndurable/(write+sfr): against the stronger raw write that also starts "
              "write-back every 64 MiB (information, not a target).\ndurable = SaveMetrics.total_seconds (call -> fsynced and published). "
              "restore = in-place Checkpoint.restore after dropping the shard files' page "
              "cache;\nits limit = cold read (better of 1/2 threads), or min(cold read, zstd "
              "decompress with 2 threads) when chunks are compressed.\nTargets: <= 1.3, "
              "<= 1.25 (< 1 for the default options on the compressible early-training state), "
              ">= 0.8.")
        for r, ev in runs:
            print(f"  {r['label']}: page_locked={r['page_locked']}, restore verified="
                  f"{r['restore_verified']}, snapshots {[ms(x) for x in r['snapshot_all_s']]} ms, "
                  f"durable {[ms(x) for x in r['durable_all_s']]} ms, restores "
                  f"{[ms(x) for x in r['restore_all_s']]} ms, load into fresh arrays "
                  f"{ms(r['load_fresh_s'])} ms, restore model floor "
                  f"{ms(ev['restore_model_floor_s'])} ms; other processes used "
                  f"{r['cpu']['other_cores']:.2f} cores on average, steal "
                  f"{r['cpu']['steal_cores']:.2f}")
        busy = max(r["cpu"]["other_cores"] for r, _ in runs)
        if busy > 0.25:
            print(f"WARNING: other processes used up to {busy:.2f} of {os.cpu_count()} cores "
                  f"while the engine ran: these figures are contended, run again on a quiet "
                  f"machine.")
        if peer_runs:
            print()
            print(peers_table([r for r, _ in runs[:2]], peer_runs, peer_write_s))
            print("peers: blocking = the save call; durable = + fsync of file and directory "
                  "(added by us); load fresh = cold read into new arrays (page cache dropped)")
        print(f"\ntotal benchmark time {result['seconds']:.0f} s")
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"),
                   help="raw bytes of the synthetic state (e.g. 256MiB, 1GiB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="parent of the temporary benchmark directory")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--no-peers", action="store_true", help="skip np.savez / safetensors")
    p.add_argument("--wait-quiet", type=float, default=20.0, metavar="SECONDS",
                   help="before each phase, wait up to this long for other processes to leave "
                        "the CPUs idle (0: don't wait)")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
