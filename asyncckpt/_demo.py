"""The demo: a small numpy model trains with background saves, then a verified restore."""

from __future__ import annotations

import tempfile
import time

import anyio
import numpy as np

from ._checkpoint import Checkpoint, load
from ._manager import CheckpointManager


def _model(size_mib: int, rng: np.random.Generator) -> tuple[dict, dict]:
    n_layers = 8
    width = max(16, int(np.sqrt(size_mib * (1 << 20) / 4 / 3 / n_layers)))
    params = {f"layer{i}": {"w": rng.standard_normal((width, width), dtype=np.float32) * 0.02,
                            "b": np.zeros(width, np.float32)} for i in range(n_layers)}
    adam = {name: {k: {"m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in layer.items()}
            for name, layer in params.items()}
    return params, {"moments": adam, "lr": 1e-3, "betas": (0.9, 0.999)}


def _train_step(params: dict, opt: dict, step: int, rng: np.random.Generator) -> None:
    b1, b2 = opt["betas"]
    for name, layer in params.items():
        for key, value in layer.items():
            grad = np.float32(0.01) * np.sin(value + np.float32(step))  # deterministic "gradient"
            m, v = opt["moments"][name][key]["m"], opt["moments"][name][key]["v"]
            m *= b1
            m += (1 - b1) * grad
            v *= b2
            v += (1 - b2) * grad * grad
            value -= opt["lr"] * m / (np.sqrt(v) + 1e-8)


async def _demo(directory: str, steps: int, every: int, size_mib: int) -> int:
    rng = np.random.default_rng(0)
    params, opt = _model(size_mib, rng)
    step = np.array(0)
    ckpt = Checkpoint(model=params, optimizer=opt, step=step)
    raw = sum(a.nbytes for layer in params.values() for a in layer.values()) * 3
    print(f"model state: {raw / 2**20:.1f} MiB, saving every {every} steps into {directory}")
    print(f"{'step':>6} {'blocking ms':>12} {'background s':>13} {'stored/raw':>11}  path")
    expected = {}
    async with CheckpointManager(ckpt, directory, max_to_keep=3, step_counter=step,
                                 checkpoint_interval=every) as manager:
        pending = []
        for i in range(steps + 1):
            step[...] = i
            if i % every == 0:
                t0 = time.perf_counter()
                handle = await manager.start_save()
                blocking = time.perf_counter() - t0
                if handle is not None:
                    expected[handle.path] = {k: v["w"].copy() for k, v in params.items()}
                    pending.append((i, blocking, handle))
            _train_step(params, opt, i, rng)
            for item in [p for p in pending if p[2].done()]:
                pending.remove(item)
                at, blocking, h = item
                await h.wait()
                m = h.metrics
                print(f"{at:>6} {blocking * 1e3:>12.1f} {m.total_seconds:>13.3f} "
                      f"{m.compression_ratio:>11.3f}  {h.path}")
            await anyio.sleep(0)
        await manager.wait_until_finished()
        for at, blocking, h in pending:
            m = h.metrics
            print(f"{at:>6} {blocking * 1e3:>12.1f} {m.total_seconds:>13.3f} "
                  f"{m.compression_ratio:>11.3f}  {h.path}")
        latest = manager.latest_checkpoint
        print(f"kept: {[p.rsplit('/', 1)[-1] for p in manager.checkpoints]}")
    assert latest is not None
    fresh_params, fresh_opt = _model(size_mib, np.random.default_rng(1))
    fresh = Checkpoint(model=fresh_params, optimizer=fresh_opt, step=np.array(-1))
    t0 = time.perf_counter()
    (await fresh.restore(latest)).assert_consumed()
    took = time.perf_counter() - t0
    ok = all(np.array_equal(fresh_params[k]["w"], w) for k, w in expected[latest].items())
    tree = await load(latest)
    print(f"restored {latest} in {took * 1e3:.0f} ms at step {int(fresh.step)}: "
          f"{'identical to the state saved at that step' if ok else 'MISMATCH'}; "
          f"load() sees {sorted(tree)}")
    return 0 if ok else 1


def run_demo(*, directory: str | None, steps: int, every: int, size_mib: int) -> int:
    if directory is not None:
        return anyio.run(_demo, directory, steps, every, size_mib, backend="asyncio")
    with tempfile.TemporaryDirectory(prefix="asyncckpt-demo-") as tmp:
        return anyio.run(_demo, tmp, steps, every, size_mib, backend="asyncio")
