"""``python -m asyncckpt bench``: benchmark your storage and machine before a long run.

Every figure is printed next to the physical limit it is bounded by, measured in the same run
on the same bytes: memcpy into reused buffers (the floor of the blocking snapshot), write +
fsync of the target directory (the floor of time to durable), zstd per thread, and cold
read (the floor of restore).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import numpy as np
import zstandard

from ._checkpoint import Checkpoint
from ._manager import CheckpointManager
from ._options import CheckpointOptions

__all__ = ["BenchConfig", "parse_size", "run_bench"]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}
MIXES = ("float32", "bf16", "optimizer")


def parse_size(text: str) -> int:
    """``256MiB``, ``4GiB``, ``1.5GB``, ``1000000`` -> bytes; ``ValueError`` naming the text."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"size {text!r} is not a size like 256MiB, 4GiB or 1GB")
    size = int(float(match[1]) * _UNITS[unit])
    if size < (1 << 20):
        raise ValueError(f"size {text!r} is below the 1 MiB minimum")
    return size


@dataclass(frozen=True)
class BenchConfig:
    directory: str | None = None
    size: int = 256 << 20
    dtype_mix: str = "optimizer"
    saves: int = 3
    background: bool = True
    compression_level: int = 1
    compression: str = "zstd"
    threads: int = 2
    json_path: str | None = None

    def __post_init__(self) -> None:
        if self.dtype_mix not in MIXES:
            raise ValueError(f"dtype_mix must be one of {MIXES}, got {self.dtype_mix!r}")
        if self.saves < 1:
            raise ValueError(f"saves must be at least 1, got {self.saves}")


def make_state(size: int, mix: str, seed: int = 0) -> dict[str, Any]:
    """A synthetic model state of about ``size`` bytes: ~100 layers of weights, and for the
    optimizer mix Adam-like moments (exp_avg small normals, exp_avg_sq their squares)."""
    rng = np.random.default_rng(seed)
    layers = 100
    if mix == "bf16":
        import ml_dtypes
        n = size // 2 // layers
        return {"params": {f"l{i}": rng.standard_normal(n, dtype=np.float32)
                           .astype(ml_dtypes.bfloat16) for i in range(layers)}, "step": 0}
    if mix == "float32":
        n = size // 4 // layers
        return {"params": {f"l{i}": rng.standard_normal(n, dtype=np.float32)
                           for i in range(layers)}, "step": 0}
    n = size // 4 // 3 // layers
    params = {f"l{i}": rng.standard_normal(n, dtype=np.float32) for i in range(layers)}
    exp_avg = {k: (v * np.float32(1e-3)) for k, v in params.items()}
    exp_avg_sq = {k: (v * v * np.float32(1e-6)) for k, v in exp_avg.items()}
    return {"params": params, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": 0}


def _arrays(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _arrays(v)]
    return [tree] if isinstance(tree, np.ndarray) else []


@dataclass
class Limits:
    memcpy_s: float
    write_fsync_s: float
    cold_read_s: float
    zstd_compress_bps_per_thread: float
    zstd_ratio: float


def _memcpy(arrays: list[np.ndarray]) -> float:
    dst = [np.empty_like(a) for a in arrays]
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        for d, a in zip(dst, arrays):
            np.copyto(d, a)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _write_fsync(directory: str, arrays: list[np.ndarray]) -> tuple[float, str]:
    path = os.path.join(directory, "bench-limit.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        for a in arrays:
            view = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            while view:
                view = view[os.write(fd, view[: 8 << 20]):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0, path


def _cold_read(path: str) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(8 << 20)
        t0 = time.perf_counter()
        while os.readv(fd, [buf]):
            pass
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _zstd(arrays: list[np.ndarray], level: int) -> tuple[float, float]:
    blob = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                           for a in arrays])[: 32 << 20]
    ctx = zstandard.ZstdCompressor(level=level)
    ctx.compress(blob[: 1 << 16])
    t0 = time.perf_counter()
    stored = sum(len(ctx.compress(blob[i:i + (4 << 20)])) for i in range(0, blob.size, 4 << 20))
    return blob.size / (time.perf_counter() - t0), stored / blob.size


def _drop_cache(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass
class Result:
    config: dict[str, Any]
    raw_bytes: int
    limits: dict[str, float]
    blocking_ms: list[float] = field(default_factory=list)
    durable_s: list[float] = field(default_factory=list)
    stored_bytes: int = 0
    restore_s: float = 0.0
    loop_lag_max_ms: float = 0.0
    loop_lag_p99_ms: float = 0.0


def _check_directory(directory: str, size: int) -> None:
    if not os.path.isdir(directory):
        raise ValueError(f"--dir {directory} is not a directory")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"--dir {directory} is not writable")
    free = shutil.disk_usage(directory).free
    if free < 3 * size:
        raise ValueError(f"--dir {directory} has {free / 2**30:.1f} GiB free; the benchmark "
                         f"needs about {3 * size / 2**30:.1f} GiB (three copies of --size)")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _measure(cfg: BenchConfig, work: str) -> Result:
    state = make_state(cfg.size, cfg.dtype_mix)
    arrays = _arrays(state)
    raw = sum(a.nbytes for a in arrays)
    _say(f"[bench] measuring limits on {raw / 2**20:.0f} MiB ...")
    memcpy = _memcpy(arrays)
    write_s, limit_file = await anyio.to_thread.run_sync(_write_fsync, work, arrays)
    cold = await anyio.to_thread.run_sync(_cold_read, limit_file)
    os.unlink(limit_file)
    zbps, zratio = _zstd(arrays, cfg.compression_level)
    result = Result(asdict(cfg), raw, asdict(Limits(memcpy, write_s, cold, zbps, zratio)))
    options = CheckpointOptions(compression=cfg.compression, io_threads=cfg.threads,
                                compression_level=cfg.compression_level)
    ckpt = Checkpoint(**state)
    lags: list[float] = []
    async with CheckpointManager(ckpt, os.path.join(work, "ckpts"), max_to_keep=2,
                                 options=options) as manager:
        await manager.save()  # allocate the staging pool outside the measurement
        for i in range(cfg.saves):
            _say(f"[bench] save {i + 1}/{cfg.saves}")
            state["step"] = i + 1
            ckpt.step = i + 1
            done = anyio.Event()

            async def tick() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    await anyio.sleep(0.001)
                    lags.append(time.perf_counter() - t0 - 0.001)

            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                t0 = time.perf_counter()
                if cfg.background:
                    handle = await manager.start_save()
                    result.blocking_ms.append((time.perf_counter() - t0) * 1e3)
                    await handle.wait()
                else:
                    await manager.save()
                    result.blocking_ms.append((time.perf_counter() - t0) * 1e3)
                result.durable_s.append(time.perf_counter() - t0)
                done.set()
        latest = manager.latest_checkpoint
    assert latest is not None and ckpt.last_save_metrics is not None
    result.stored_bytes = ckpt.last_save_metrics.stored_bytes
    await anyio.to_thread.run_sync(_drop_cache, latest)
    _say("[bench] restoring (cold) ...")
    t0 = time.perf_counter()
    await ckpt.restore(latest, options=options)
    result.restore_s = time.perf_counter() - t0
    lags.sort()
    result.loop_lag_max_ms = lags[-1] * 1e3 if lags else 0.0
    result.loop_lag_p99_ms = lags[max(0, math.ceil(len(lags) * 0.99) - 1)] * 1e3 if lags else 0.0
    return result


def report(result: Result) -> list[str]:
    gb = 1e9
    raw, lim = result.raw_bytes, result.limits
    blocking = statistics.median(result.blocking_ms) / 1e3
    durable = statistics.median(result.durable_s)
    zstd_time = raw / (lim["zstd_compress_bps_per_thread"] * result.config["threads"])
    rows = [
        ("blocking per save", f"{blocking * 1e3:.1f} ms", f"{blocking / lim['memcpy_s']:.2f}x memcpy"),
        ("time to durable", f"{durable:.3f} s", f"{durable / lim['write_fsync_s']:.2f}x write+fsync"),
        ("raw GB/s to durable", f"{raw / durable / gb:.2f}", f"limit {raw / lim['write_fsync_s'] / gb:.2f}"),
        ("stored GB/s", f"{result.stored_bytes / durable / gb:.2f}", ""),
        ("stored / raw", f"{result.stored_bytes / raw:.3f}", f"zstd alone {lim['zstd_ratio']:.3f}"),
        ("restore GB/s (cold)", f"{raw / result.restore_s / gb:.2f}",
         f"{(raw / result.restore_s) / (raw / max(lim['cold_read_s'], 1e-9)):.2f}x cold read"),
        ("zstd GB/s per thread", f"{lim['zstd_compress_bps_per_thread'] / gb:.2f}",
         f"all-zstd save would take {zstd_time:.2f} s of CPU"),
        ("event-loop lag max / p99", f"{result.loop_lag_max_ms:.1f} / {result.loop_lag_p99_ms:.1f} ms", ""),
    ]
    cfg = result.config
    lines = [f"asyncckpt bench: {raw / 2**20:.0f} MiB {cfg['dtype_mix']}, {cfg['saves']} "
             f"{'background' if cfg['background'] else 'foreground'} saves, zstd level "
             f"{cfg['compression_level']}, {cfg['threads']} threads, {os.cpu_count()} CPUs",
             f"limits: memcpy {lim['memcpy_s'] * 1e3:.1f} ms, write+fsync "
             f"{lim['write_fsync_s']:.3f} s, cold read {lim['cold_read_s']:.3f} s", ""]
    lines += [f"  {name:<26} {value:>14}   {ratio}" for name, value, ratio in rows]
    return lines


def run_bench(cfg: BenchConfig) -> int:
    """Run, print the table (and write JSON); Ctrl-C stops and removes every file written."""
    if cfg.directory is not None:
        _check_directory(cfg.directory, cfg.size)
    base = cfg.directory or tempfile.gettempdir()
    _check_directory(base, cfg.size)
    work = tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=base)
    try:
        result = anyio.run(_measure, cfg, work, backend="asyncio")
    except KeyboardInterrupt:
        _say("[bench] interrupted; removing the benchmark's files")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for line in report(result):
        print(line)
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0
