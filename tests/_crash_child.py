"""The process that gets crashed, for tests/test_crash.py (not a test module itself).

Run as ``python tests/_crash_child.py serve``: a fork server. It imports asyncckpt and numpy
once, then reads one JSON job per line on stdin; for each it forks a child that runs the job,
writes ``pid <pid>`` and, once the child is gone, ``exit <code>`` (negative: killed by that
signal). Forking from a process that already imported everything makes a crash cost a few
milliseconds instead of a Python start-up; the server itself never starts a thread or an
event loop, so forking it is safe.

``python tests/_crash_child.py run '<json job>'`` runs one job in this process (debugging).

Jobs (``kind``):

- ``scenario``: a fixed, deterministic sequence of saves (``mode`` ``async``: a plain
  ``Checkpoint.save`` then two ``CheckpointManager`` sessions; ``sync``: one
  ``SyncCheckpointManager`` session; ``replace``: saves that replace checkpoint numbers;
  ``resume``: a restarted job on a directory an earlier crash left: clean, restore, save).
  With ``no_exchange``, ``exchange`` reports "not supported" (as off Linux), so replacing
  saves take the fallback path through an ``-old-`` directory.
  With ``crash: {"fn": F, "k": k}`` the k-th call of ``asyncckpt._fs.F`` (counted over all
  threads) ends the process with ``os._exit(86)`` first: no cleanup, no atexit hooks, no
  flushing, like a crash. ``write_all`` and ``write_small`` first write half of their data
  (a torn write), ``remove_tree`` first removes half of the tree's files (a torn delete).
  With ``count`` nothing crashes; the calls are counted and recorded, in order, with their
  completions and the acknowledgements, and written there as JSON (:func:`dump`).
- ``train``: restore the latest checkpoint (or start at step 0) and train forever, saving in
  the background every few steps; the parent kills it with SIGKILL at a random moment.

Both log ``acknowledged <path> <step>`` to the ``oracle`` file (appended and fsynced with
plain ``os`` calls, never through ``_fs``) after a save returned to the caller.

The state of a step is a pure function of the step (:func:`state_for`), so whatever
checkpoint survives a crash can be checked exactly against the step it records.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import sys
import threading
import time
import traceback

import numpy as np

CRASH_EXIT = 86
MAX_TO_KEEP = 2

# (rows, columns, chunk bytes). "walk": three chunks per shard (so torn shard writes happen
# between chunks) and few calls; "kill": the 2 MiB state of the kill -9 harness, 9 chunks.
SIZES = {"walk": (48, 256, 64 << 10), "kill": (512, 512, 512 << 10)}


def state_for(step: int, size: str = "walk") -> dict:
    """The training state after ``step`` steps: deterministic, different for every step."""
    rows, cols, _ = SIZES[size]
    rng = np.random.default_rng(1_000_003 * (step + 1))
    w = rng.standard_normal((rows, cols), dtype=np.float32)      # incompressible
    m = np.zeros((rows, cols), np.float32)                         # mostly zeros: zstd path
    m[:: 5] = step + 0.5
    b = np.arange(cols, dtype=np.int64) * (step + 1)
    return {"model": {"w": w, "b": b}, "opt": {"m": m, "lr": 0.1 / (step + 1)},
            "step": step, "tag": f"step-{step}"}


def options(size: str):
    import asyncckpt as ac
    return ac.CheckpointOptions(chunk_bytes=SIZES[size][2], page_lock=False)


def new_checkpoint(step: int, size: str):
    import asyncckpt as ac
    s = state_for(step, size)
    return ac.Checkpoint(model=s["model"], opt=s["opt"], step=s["step"], tag=s["tag"])


def set_step(ckpt, step: int, size: str) -> None:
    """Train: the tracked arrays take the next step's values in place."""
    s = state_for(step, size)
    for group in ("model", "opt"):
        target = getattr(ckpt, group)
        for key, value in s[group].items():
            if isinstance(value, np.ndarray):
                np.copyto(target[key], value)
            else:
                target[key] = value
    ckpt.step = step
    ckpt.tag = s["tag"]


# -- the oracle ------------------------------------------------------------------------------

class Oracle:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def ack(self, path: str, step: int) -> None:
        os.write(self._fd, f"acknowledged {path} {step}\n".encode())
        os.fsync(self._fd)
        if _EVENTS is not None:
            with _LOCK:
                _EVENTS.append({"e": "ack", "path": os.path.relpath(path, _ROOT), "step": step})


def read_acks(path: str) -> list[tuple[str, int]]:
    """The acknowledged saves, in order (a torn last line is ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        word, path_, step = line.split(" ")
        assert word == "acknowledged"
        out.append((path_, int(step)))
    return out


# -- crash points ------------------------------------------------------------------------------

TORN = ("write_all", "write_small", "remove_tree")


def _describe(name: str, args: tuple, root: str) -> str:
    shown = []
    for a in args:
        if isinstance(a, str):
            shown.append(os.path.relpath(a, root) if os.path.isabs(a) else a)
        elif isinstance(a, (bytes, bytearray, memoryview)):
            shown.append(f"<{memoryview(a).nbytes} bytes>")
        elif isinstance(a, bool):
            shown.append(repr(a))
        elif isinstance(a, int):
            shown.append("fd")
        else:
            shown.append(type(a).__name__)
    return f"{name}({', '.join(shown)})"


def _die_torn(name: str, args: tuple, kwargs: dict) -> None:
    """Do half of a write / delete, then die."""
    if name == "write_all":
        fd, data = args
        view = memoryview(data).cast("B")
        if view.nbytes:
            os.write(fd, view[: max(1, view.nbytes // 2)])
    elif name == "write_small":
        path, data = args[0], args[1]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data[: max(1, len(data) // 2)] if data else b"")
    elif name == "remove_tree":
        files = []
        for top, _dirs, names in os.walk(args[0]):
            files.extend(os.path.join(top, n) for n in names)
        files.sort()
        for f in files[: max(1, len(files) // 2)] if files else []:
            os.unlink(f)
    os._exit(CRASH_EXIT)


_LOCK = threading.Lock()
_EVENTS: list[dict] | None = None   # with ``count``: every call, its completion, every ack
_ROOT = "."


def install(root: str, crash: dict | None, count: str | None, no_exchange: bool,
            note: str | None) -> None:
    """Wrap every function of ``asyncckpt._fs`` (callers look them up at call time).

    With ``count``, the events are recorded for :func:`dump`: ``call`` (function, k, the
    arguments: paths relative to ``root``, fds as numbers), ``done`` (with an ``open_new``'s
    fd) and ``ack``. Calls are recorded before they run, completions after, under one lock.
    """
    global _EVENTS, _ROOT
    from asyncckpt import _fs
    counts: dict[str, int] = {}
    _ROOT = root
    if count is not None:
        _EVENTS = []

    def hit(name: str, args: tuple, kwargs: dict) -> int:
        with _LOCK:
            n = counts[name] = counts.get(name, 0) + 1
            if _EVENTS is not None:
                _EVENTS.append({"e": "call", "fn": name, "k": n, "args": _args(args, root),
                                "text": f"{name}#{n} {_describe(name, args, root)}",
                                "kwargs": {k: v for k, v in kwargs.items()
                                           if isinstance(v, (bool, int, str))}})
            if crash is None or crash["fn"] != name or crash["k"] != n:
                return n
            # The k-th call of F: note where, then die. The lock stays held, so no other
            # thread gets past its next filesystem call meanwhile.
            if note is not None:
                fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                torn = " (torn)" if name in TORN else ""
                os.write(fd, f"{name}#{n}{torn} {_describe(name, args, root)}\n".encode())
                os.close(fd)
            if name in TORN:
                _die_torn(name, args, kwargs)
            os._exit(CRASH_EXIT)

    def done(name: str, n: int, ret: object) -> None:
        if _EVENTS is not None:
            with _LOCK:
                _EVENTS.append({"e": "done", "fn": name, "k": n,
                                "ret": ret if isinstance(ret, (bool, int)) else None})

    def wrap(name: str, real):
        if inspect.iscoroutinefunction(real):
            @functools.wraps(real)
            async def awrapper(*args, **kwargs):
                n = hit(name, args, kwargs)
                ret = await real(*args, **kwargs)
                done(name, n, ret)
                return ret
            return awrapper

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            n = hit(name, args, kwargs)
            ret = False if name == "exchange" and no_exchange else real(*args, **kwargs)
            done(name, n, ret)
            return ret
        return wrapper

    for name in _fs.__all__:
        setattr(_fs, name, wrap(name, getattr(_fs, name)))


def _args(args: tuple, root: str) -> list:
    out: list = []
    for a in args:
        if isinstance(a, str):
            out.append(os.path.relpath(a, root) if os.path.isabs(a) else a)
        elif isinstance(a, (bool, int)):
            out.append(a)
        else:
            out.append(None)
    return out


def dump(path: str) -> None:
    with _LOCK:
        events = list(_EVENTS or [])
    counts: dict[str, int] = {}
    for ev in events:
        if ev["e"] == "call":
            counts[ev["fn"]] = ev["k"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"counts": counts, "events": events}, f)


# -- the deterministic scenarios ----------------------------------------------------------------

async def scenario_async(d: str, oracle: Oracle, size: str) -> None:
    """plain save -> manager A: save, start_save+wait, a save replacing the older managed
    number, two saves in flight -> manager B (a restarted job): restore, save."""
    import asyncckpt as ac
    opts = options(size)
    ckpt = new_checkpoint(0, size)
    path = await ckpt.save(os.path.join(d, "plain"), options=opts)      # plain-1
    oracle.ack(path, 0)
    async with ac.CheckpointManager(ckpt, d, max_to_keep=MAX_TO_KEEP, options=opts) as m:
        set_step(ckpt, 1, size)
        oracle.ack(await m.save(), 1)                                   # ckpt-2
        set_step(ckpt, 2, size)
        handle = await m.start_save()                                   # ckpt-3
        oracle.ack(await handle.wait(), 2)
        set_step(ckpt, 3, size)
        oracle.ack(await m.save(checkpoint_number=2), 3)                # replaces ckpt-2
        set_step(ckpt, 4, size)
        h4 = await m.start_save()                                       # ckpt-5, retires 3
        set_step(ckpt, 5, size)
        h5 = await m.start_save()                                       # ckpt-6, retires 2
        oracle.ack(await h4.wait(), 4)
        oracle.ack(await h5.wait(), 5)
    ckpt = new_checkpoint(0, size)
    async with ac.CheckpointManager(ckpt, d, max_to_keep=MAX_TO_KEEP, options=opts) as m:
        restored = await m.restore_or_initialize()
        assert restored is not None and ckpt.step == 5, (restored, ckpt.step)
        set_step(ckpt, 6, size)
        oracle.ack(await m.save(), 6)                                   # ckpt-7, retires 5


def scenario_sync(d: str, oracle: Oracle, size: str) -> None:
    """SyncCheckpointManager: save, start_save+wait, a save replacing the newest number, two
    saves in flight."""
    import asyncckpt as ac
    ckpt = new_checkpoint(0, size)
    with ac.SyncCheckpointManager(ckpt, d, max_to_keep=MAX_TO_KEEP, options=options(size)) as m:
        set_step(ckpt, 1, size)
        oracle.ack(m.save(), 1)                                         # ckpt-1
        set_step(ckpt, 2, size)
        oracle.ack(m.start_save().wait(), 2)                            # ckpt-2
        set_step(ckpt, 3, size)
        oracle.ack(m.save(checkpoint_number=2), 3)                      # replaces ckpt-2
        set_step(ckpt, 4, size)
        h4 = m.start_save()                                             # ckpt-4, retires 1
        set_step(ckpt, 5, size)
        h5 = m.start_save()                                             # ckpt-5, retires 2
        oracle.ack(h4.wait(), 4)
        oracle.ack(h5.wait(), 5)


async def scenario_replace(d: str, oracle: Oracle, size: str) -> None:
    """Replacing saves: the newest number, then an older (still managed) one."""
    import asyncckpt as ac
    opts = options(size)
    ckpt = new_checkpoint(0, size)
    async with ac.CheckpointManager(ckpt, d, max_to_keep=MAX_TO_KEEP, options=opts) as m:
        set_step(ckpt, 1, size)
        oracle.ack(await m.save(), 1)                                   # ckpt-1
        set_step(ckpt, 2, size)
        oracle.ack(await m.save(checkpoint_number=1), 2)                # replaces ckpt-1
        set_step(ckpt, 3, size)
        oracle.ack(await m.save(checkpoint_number=5), 3)                # ckpt-5
        set_step(ckpt, 4, size)
        oracle.ack(await m.save(checkpoint_number=1), 4)                # replaces ckpt-1 (older)


async def scenario_resume(d: str, oracle: Oracle, size: str) -> None:
    """A restarted job on a directory a crash left behind: enter a manager (it cleans up),
    restore, save once more."""
    import asyncckpt as ac
    ckpt = new_checkpoint(0, size)
    async with ac.CheckpointManager(ckpt, d, max_to_keep=MAX_TO_KEEP,
                                    options=options(size)) as m:
        await m.restore_or_initialize()
        step = ckpt.step + 1
        set_step(ckpt, step, size)
        oracle.ack(await m.save(), step)


# -- the kill -9 training loops ----------------------------------------------------------------

def _number(path: str | None) -> int | None:
    return None if path is None else int(path.rsplit("-", 1)[1])


def _orphaned(deadline: float) -> bool:
    """The training loops stop by themselves if nobody will ever kill them."""
    return time.monotonic() > deadline or os.getppid() == 1


async def train_async(d: str, oracle: Oracle, size: str, seed: int, deadline: float) -> None:
    import asyncckpt as ac
    rng = np.random.default_rng(seed)
    ckpt = new_checkpoint(0, size)
    async with ac.CheckpointManager(ckpt, d, max_to_keep=MAX_TO_KEEP,
                                    options=options(size)) as m:
        await m.restore_or_initialize()
        step, saves, pending = ckpt.step, 0, []
        while not _orphaned(deadline):
            step += 1
            set_step(ckpt, step, size)
            await asyncio.sleep(float(rng.uniform(0, 0.004)))          # "training"
            if step % 3 == 0:
                saves += 1
                if saves % 7 == 0 and m.latest_checkpoint is not None:
                    # a blocking save that replaces the newest checkpoint number
                    oracle.ack(await m.save(checkpoint_number=_number(m.latest_checkpoint)),
                               step)
                else:
                    pending.append((await m.start_save(), step))
            for handle, s in [p for p in pending if p[0].done()]:
                oracle.ack(await handle.wait(), s)
                pending.remove((handle, s))


def train_sync(d: str, oracle: Oracle, size: str, seed: int, deadline: float) -> None:
    import asyncckpt as ac
    rng = np.random.default_rng(seed)
    ckpt = new_checkpoint(0, size)
    with ac.SyncCheckpointManager(ckpt, d, max_to_keep=MAX_TO_KEEP,
                                  options=options(size)) as m:
        m.restore_or_initialize()
        step, saves, pending = ckpt.step, 0, []
        while not _orphaned(deadline):
            step += 1
            set_step(ckpt, step, size)
            time.sleep(float(rng.uniform(0, 0.004)))                     # "training"
            if step % 3 == 0:
                saves += 1
                if saves % 7 == 0 and m.latest_checkpoint is not None:
                    oracle.ack(m.save(checkpoint_number=_number(m.latest_checkpoint)), step)
                elif saves % 5 == 0:
                    oracle.ack(m.save(), step)
                else:
                    pending.append((m.start_save(), step))
            for handle, s in [p for p in pending if p[0].done()]:
                oracle.ack(handle.wait(), s)
                pending.remove((handle, s))


# -- running jobs ----------------------------------------------------------------------------------

def run_job(job: dict) -> int:
    d, size = job["dir"], job.get("size", "walk")
    oracle = Oracle(job["oracle"])    # (the checkpoint directory is created by the saves)
    if job["kind"] == "scenario":
        install(d, job.get("crash"), job.get("count"), job.get("no_exchange", False),
                job.get("note"))
        mode = job["mode"]
        if mode == "async":
            asyncio.run(scenario_async(d, oracle, size))
        elif mode == "sync":
            scenario_sync(d, oracle, size)
        elif mode == "replace":
            asyncio.run(scenario_replace(d, oracle, size))
        elif mode == "resume":
            asyncio.run(scenario_resume(d, oracle, size))
        else:
            raise ValueError(mode)
        if job.get("count"):
            dump(job["count"])
        return 0
    if job["kind"] == "train":
        deadline = time.monotonic() + job.get("max_seconds", 60)
        if job["mode"] == "async":
            asyncio.run(train_async(d, oracle, size, job["seed"], deadline))
        else:
            train_sync(d, oracle, size, job["seed"], deadline)
        return 3  # only when orphaned: the parent expects it to be killed
    raise ValueError(job["kind"])


def _child(job: dict) -> None:
    """In the forked child: run the job, never return into the server's loop."""
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        code = run_job(job)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # no atexit hooks, no flushing of the server's buffers


def serve() -> None:
    # Import once, before any fork, everything a job imports lazily (no thread is started).
    import anyio._backends._asyncio  # noqa: F401
    import anyio.from_thread  # noqa: F401
    import anyio.streams.memory  # noqa: F401
    import anyio.to_thread  # noqa: F401
    import numpy.random  # noqa: F401

    import asyncckpt  # noqa: F401
    import asyncckpt._fs  # noqa: F401
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        out.flush()
        pid = os.fork()
        if pid == 0:
            _child(job)
        out.write(f"pid {pid}\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(f"exit {os.waitstatus_to_exitcode(status)}\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        serve()
    elif len(sys.argv) == 3 and sys.argv[1] == "run":
        sys.exit(run_job(json.loads(sys.argv[2])))
    else:
        sys.exit("usage: _crash_child.py serve | run '<json job>'")
