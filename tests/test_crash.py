"""Crash consistency, proven by crashing: a crash at any instant leaves the previous state or
the complete new one (docs/guarantees.md lists the promises and the tests that prove them).

The saver runs in a separate process (tests/_crash_child.py, forked from a server that
imported everything once, so a crash costs milliseconds, not a Python start-up):

- **The walk.** Every function of ``asyncckpt._fs`` (the filesystem seam) is wrapped in the
  child so that its k-th call (counted over all threads) kills the process first
  (``write_all``, ``write_small``: after writing half; ``remove_tree``: after removing half
  the files). A run without a crash counts the calls; then every (function, k) pair of the
  commit-critical functions is crashed at, and a sample of the others (all with ``-m slow``).
- **Crashes during recovery.** The same walk over a restarted job (cleanup, restore, save)
  on a directory an earlier crash left.
- **kill -9.** The child trains forever with background saves; it is SIGKILLed at random
  (seeded) moments, restarted on the same directory (it restores and goes on), killed again.
- **The fsync order.** A killed process cannot show a missing fsync, so the recorded order
  of the calls is audited against what a power loss could undo.

After every crash the directory is checked (:func:`check_directory`): the latest checkpoint
loads and equals the state of the step it records and is not older than the last
acknowledged save; an acknowledged checkpoint still there holds its step or a newer one;
every checkpoint the state file names, and every directory under a final name, loads; and
after entering a new ``CheckpointManager`` no residue is left, the latest is unchanged and
the number of checkpoints is within the policy.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt import _directory

CHILD_PATH = Path(__file__).with_name("_crash_child.py")
_spec = importlib.util.spec_from_file_location("_crash_child", CHILD_PATH)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

MARKS = (".asyncckpt-tmp-", ".asyncckpt-deleting-", ".asyncckpt-old-")
CRITICAL = ("fsync", "fsync_dir", "rename", "exchange", "replace", "unlink", "remove_tree",
            "open_new", "write_all")
SAMPLED_PER_FUNCTION = 2      # default run: k's per non-critical function (all with -m slow)
WORKERS = 2                   # fork servers running crash jobs side by side


# -- the fork servers ------------------------------------------------------------------------

class Server:
    """One ``_crash_child.py serve`` process: forks a child per job."""

    def __init__(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([sys.executable, str(CHILD_PATH), "serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1, env=env)
        self.child: int | None = None   # the pid of the job running now
        self._busy = threading.Lock()      # one job at a time, from start to wait

    def _read(self, word: str) -> int:
        line = self.proc.stdout.readline()
        if not line.startswith(word + " "):
            raise RuntimeError(f"fork server said {line!r}, expected {word!r} "
                               f"(exit code {self.proc.poll()})")
        return int(line.split()[1])

    def start(self, job: dict) -> int:
        """Fork a child running ``job``; its pid. Every start must be followed by a wait."""
        if not self._busy.acquire(timeout=120):
            raise RuntimeError("the fork server is still busy with an earlier job")
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.child = self._read("pid")
        return self.child

    def wait(self) -> int:
        """The child's exit code (negative: killed by that signal)."""
        try:
            return self._read("exit")
        finally:
            self.child = None
            self._busy.release()

    def kill_child(self) -> None:
        if self.child is not None:
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self, job: dict) -> int:
        self.start(job)
        return self.wait()

    def close(self) -> None:
        self.kill_child()
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def servers():
    pool = [Server() for _ in range(WORKERS)]
    yield pool
    for server in pool:
        server.close()


# -- the checks ------------------------------------------------------------------------------

def listing(d: str | os.PathLike[str]) -> list[str]:
    """The entries of ``d`` (none if a crash came before the first save created it)."""
    try:
        return sorted(os.listdir(d))
    except FileNotFoundError:
        return []


def residue(names: list[str]) -> list[str]:
    return [n for n in names if any(mark in n for mark in MARKS)]


def final_checkpoints(names: list[str], prefix: str) -> list[str]:
    return [n for n in names if re.fullmatch(re.escape(prefix) + r"-[0-9]+", n)]


def _expect_equal(tree: dict, path: str) -> int:
    """``tree`` (a loaded checkpoint) must be exactly the state of the step it records."""
    step = tree["step"]
    want = child.state_for(step, _size_of(tree))
    for group in ("model", "opt"):
        assert set(tree[group]) == set(want[group]), f"{path}: {group} keys {set(tree[group])}"
        for key, value in want[group].items():
            got = tree[group][key]
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and np.array_equal(got, value), (
                    f"{path}: {group}/{key} is not the state of step {step}")
            else:
                assert got == value, f"{path}: {group}/{key} = {got!r}, step {step} has {value!r}"
    assert tree["tag"] == want["tag"], f"{path}: tag {tree['tag']!r} at step {step}"
    return step


def _size_of(tree: dict) -> str:
    rows = tree["model"]["w"].shape[0]
    return next(name for name, (r, _, _) in child.SIZES.items() if r == rows)


async def load_step(path: str) -> int:
    """Load ``path`` (verifying every checksum) and check it; the step it holds."""
    return _expect_equal(await ac.load(path), path)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    residue_before: list[str] = field(default_factory=list)
    problems_after_cleanup: int = 0     # how many of ``problems`` remain once a manager entered
    final_missing_old_present: bool = False  # the exchange fallback's window (see below)
    latest_step: int | None = None


async def check_directory(d: str, acks: list[tuple[str, int]], *, prefix: str = "ckpt",
                          plain: int = 0, clean_in_place: bool = True,
                          scratch: str | None = None) -> Report:
    """Every invariant a crash must leave; the violations, in words.

    With ``clean_in_place=False`` the cleanup by a new manager happens on a hard-linked copy
    (under ``scratch``), so that the next child still finds the residue and cleans it itself.
    """
    report = Report()
    problems = report.problems

    loaded: dict[tuple[int, int], int] = {}   # (inode, mtime) of a checked directory

    async def loads(path: str, what: str) -> int | None:
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns)
            if key not in loaded:
                loaded[key] = await load_step(path)
            return loaded[key]
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{what} {os.path.basename(path)} does not load: {exc!r}")
            return None

    before = listing(d)
    report.residue_before = residue(before)
    report.final_missing_old_present = any(
        n.split(".asyncckpt-old-")[0] not in before for n in before if ".asyncckpt-old-" in n)
    last = acks[-1] if acks else None
    try:
        latest = ac.latest_checkpoint(d)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"latest_checkpoint raised {exc!r}")
        latest = None
    if latest is None and last is not None:
        problems.append(f"latest_checkpoint() is None although {os.path.basename(last[0])} "
                        f"(step {last[1]}) was acknowledged; directory: {before}")
    if latest is not None:
        step = await loads(latest, "latest checkpoint")
        report.latest_step = step
        if step is not None and last is not None and step < last[1]:
            problems.append(f"latest checkpoint {os.path.basename(latest)} holds step {step}, "
                            f"older than the acknowledged step {last[1]}")
    for path, acked in {p: s for p, s in acks}.items():
        # (retention may have removed it since; a number is only ever reused for newer steps)
        if os.path.isdir(path):
            step = await loads(path, "acknowledged checkpoint")
            if step is not None and step < acked:
                problems.append(f"{os.path.basename(path)} holds step {step}, older than its "
                                f"acknowledged step {acked}")
    try:
        state = _directory.read_state_sync(d)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"the state file does not parse: {exc!r}")
        state = None
    if state is not None:
        named = dict.fromkeys([state.model_checkpoint_path, *state.all_model_checkpoint_paths])
        for rel in named:
            await loads(_directory.resolve(d, rel), "checkpoint named by the state file")
    for name in final_checkpoints(before, prefix) + final_checkpoints(before, "plain"):
        await loads(os.path.join(d, name), "directory under a final name")

    # A new manager cleans what the crash left; count what remains.
    first_after = len(problems)
    target = d
    if not clean_in_place:
        target = os.path.join(scratch, "copy")
        shutil.rmtree(target, ignore_errors=True)
        if os.path.isdir(d):
            shutil.copytree(d, target, copy_function=os.link, symlinks=True)
    try:
        async with ac.CheckpointManager(ac.Checkpoint(), target, max_to_keep=child.MAX_TO_KEEP):
            pass
    except Exception as exc:  # noqa: BLE001
        problems.append(f"entering a new CheckpointManager raised {exc!r}")
    after = listing(target)
    if residue(after) or ".asyncckpt-retire" in after:
        problems.append(f"residue left after a new manager entered: {after}")
    kept = final_checkpoints(after, prefix)
    if len(kept) > child.MAX_TO_KEEP:
        problems.append(f"{len(kept)} checkpoints kept, max_to_keep is {child.MAX_TO_KEEP}: "
                        f"{after}")
    if len(final_checkpoints(after, "plain")) > plain:
        problems.append(f"more plain checkpoints than were written: {after}")
    try:
        latest_after = ac.latest_checkpoint(target)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"latest_checkpoint raised after cleanup: {exc!r}")
        latest_after = None
    if latest is not None and (latest_after is None or os.path.basename(latest_after)
                               != os.path.basename(latest)):
        problems.append(f"cleanup changed the latest checkpoint from {latest} to {latest_after}")
    if latest_after is None and last is not None:
        problems.append(f"no latest checkpoint after cleanup although step {last[1]} was "
                        f"acknowledged: {after}")
    elif latest_after is not None:
        step = await loads(latest_after, "latest checkpoint after cleanup")
        if step is not None and last is not None and step < last[1]:
            problems.append(f"after cleanup the latest holds step {step} < acknowledged "
                            f"{last[1]}")
    for name in kept:
        await loads(os.path.join(target, name), "checkpoint kept after cleanup")
    if not clean_in_place:
        shutil.rmtree(target, ignore_errors=True)
    report.problems_after_cleanup = len(problems) - first_after
    return report


# -- the walk over named crash points --------------------------------------------------------

SCENARIOS = {
    # name: (child mode, exchange available, plain checkpoints written)
    "async": ("async", True, 1),
    "sync": ("sync", True, 0),
    "replace": ("replace", True, 0),          # only with -m slow: async covers its cases
    "replace-no-exchange": ("replace", False, 0),
}
DEFAULT_SCENARIOS = ["async", "sync", "replace-no-exchange"]

# Crashes during recovery: a first crash leaves a directory (the template); a restarted job
# (enter a manager: cleanup; restore; save) is then crashed at each of its own crash points.
RECOVERY_TEMPLATES = {
    # ckpt-5 published but the state file not yet replaced: the cleanup must retire the
    # uncommitted ckpt-5 (named in the retire list) and keep ckpt-3; ckpt-6 is a complete
    # temporary directory.
    "async@replace#12": ("async", ("replace", 12)),
    # the exchange fallback between its two renames: ckpt-1 aside as -old-, the new one
    # complete under its temporary name; the cleanup must put the old one back.
    "replace-no-exchange@rename#3": ("replace-no-exchange", ("rename", 3)),
}
SLOW_RECOVERY_TEMPLATES = {
    # the retirement of ckpt-2 torn half-way through its deletion
    "async@remove_tree#3": ("async", ("remove_tree", 3)),
    # the exchanged-out old ckpt-2 torn half-way through its deletion, state not yet written
    "async@remove_tree#1": ("async", ("remove_tree", 1)),
    # two saves in flight, the first one's retire list written, nothing published yet
    "async@rename#4": ("async", ("rename", 4)),
    # ckpt-4 committed, its owner record not yet written, ckpt-1 not yet retired (the
    # retire list names it), ckpt-5 complete in its temporary directory
    "sync@replace#12": ("sync", ("replace", 12)),
}


def _job(base: Path, name: str, mode: str, exchange: bool, **extra) -> dict:
    run = base / name
    run.mkdir()
    return {"kind": "scenario", "mode": mode, "no_exchange": not exchange,
            "dir": str(run / "d"), "oracle": str(run / "oracle"), "log": str(run / "log"),
            "note": str(run / "crash-note"), **extra}


def _from_template(job: dict, template: Path | None) -> dict:
    """Put a copy of the template's directory and oracle where ``job`` will run."""
    if template is not None:
        if (template / "d").exists():
            shutil.copytree(template / "d", job["dir"], symlinks=True)
        shutil.copyfile(template / "oracle", job["oracle"])
    return job


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except FileNotFoundError:
        return ""


async def make_template(servers, base: Path, scenario: str, crash: tuple[str, int]) -> Path:
    mode, exchange, _ = SCENARIOS[scenario]
    job = _job(base, "template", mode, exchange, crash={"fn": crash[0], "k": crash[1]})
    code = await asyncio.to_thread(servers[0].run, job)
    assert code == child.CRASH_EXIT, f"the first crash did not happen ({code}):\n" + _tail(
        job["log"])
    return Path(job["dir"]).parent


async def record_run(servers, base: Path, scenario: str, template: Path | None = None
                     ) -> tuple[dict[str, int], list[dict]]:
    """Run the scenario once without a crash, recording every ``_fs`` call; the directory it
    leaves must pass the checks too. The calls per function, and the events."""
    mode, exchange, plain = SCENARIOS[scenario]
    job = _from_template(_job(base, "count", "resume" if template else mode, exchange,
                              count=str(base / "count.json")), template)
    code = await asyncio.to_thread(servers[0].run, job)
    assert code == 0, f"the uncrashed {scenario} run failed:\n{_tail(job['log'])}"
    report = await check_directory(job["dir"], child.read_acks(job["oracle"]), plain=plain)
    assert not report.problems or (not exchange and _known_no_exchange_gap(report)), \
        report.problems
    data = json.loads((base / "count.json").read_text())
    return data["counts"], data["events"]


def crash_points(counts: dict[str, int], *, exhaustive: bool, seed: int
                 ) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    points = []
    for fn, n in sorted(counts.items()):
        ks = list(range(1, n + 1))
        if not exhaustive and fn not in CRITICAL:
            ks = sorted(rng.sample(ks, min(n, SAMPLED_PER_FUNCTION)))
        points.extend((fn, k) for k in ks)
    return points


@dataclass
class WalkResult:
    counts: dict[str, int]
    points: list[tuple[str, int]]
    crashed: int = 0
    not_reached: list[tuple[str, int]] = field(default_factory=list)
    findings: dict[tuple[str, int], tuple[str, list[str]]] = field(default_factory=dict)
    known_gap: list[str] = field(default_factory=list)   # see _known_no_exchange_gap
    seconds: float = 0.0


async def walk(servers, base: Path, scenario: str, *, exhaustive: bool,
               template: Path | None = None, label: str | None = None) -> WalkResult:
    """Crash the scenario (or, from a template, the restarted job) at every crash point."""
    started = time.perf_counter()
    mode, exchange, plain = SCENARIOS[scenario]
    counts, _ = await record_run(servers, base, scenario, template)
    points = crash_points(counts, exhaustive=exhaustive,
                          seed=zlib.crc32((label or scenario).encode()))
    result = WalkResult(counts, points)
    free: asyncio.Queue[Server] = asyncio.Queue()
    for server in servers:
        free.put_nowait(server)

    async def one(i: int, fn: str, k: int) -> None:
        job = _from_template(_job(base, f"{i:04d}-{fn}-{k}", "resume" if template else mode,
                                  exchange, crash={"fn": fn, "k": k}), template)
        server = await free.get()
        try:
            code = await asyncio.to_thread(server.run, job)
        finally:
            free.put_nowait(server)
        where = _tail(job["note"]).strip() or f"{fn}#{k}"
        if code == 0:
            result.not_reached.append((fn, k))
        elif code != child.CRASH_EXIT:
            result.findings[(fn, k)] = (where, [f"child exited {code}:\n{_tail(job['log'])}"])
            return
        else:
            result.crashed += 1
        report = await check_directory(job["dir"], child.read_acks(job["oracle"]), plain=plain)
        if report.problems and not exchange and _known_no_exchange_gap(report):
            result.known_gap.append(where)
        elif report.problems:
            result.findings[(fn, k)] = (where, report.problems)
        if (fn, k) not in result.findings:
            shutil.rmtree(Path(job["dir"]).parent, ignore_errors=True)

    await asyncio.gather(*(one(i, fn, k) for i, (fn, k) in enumerate(points)))
    result.seconds = time.perf_counter() - started
    print(f"\nwalk {label or scenario}: {len(points)} crash points "
          f"({', '.join(f'{fn} x{n}' for fn, n in sorted(counts.items()))} calls), "
          f"{result.crashed} crashed, {len(result.not_reached)} not reached, "
          f"{len(result.findings)} with findings, {len(result.known_gap)} in the known "
          f"no-exchange gap {result.known_gap}, {result.seconds:.1f} s")
    return result


def _format(findings: dict) -> str:
    return "\n".join(f"crash at {where}:\n    " + "\n    ".join(problems)
                     for where, problems in findings.values())


def _known_no_exchange_gap(report: Report) -> bool:
    """The one known defect (test_no_exchange_fallback_crash_between_renames_hides_the_latest):
    without RENAME_EXCHANGE a replacing save renames the old checkpoint aside before renaming
    the new one in; a crash between the two leaves no directory under the final name, so
    whatever reads the state file before a manager is entered finds nothing. Entering a
    manager repairs it, so every check after the cleanup must still pass."""
    return report.final_missing_old_present and report.problems_after_cleanup == 0


def _assert_walk(result: WalkResult, exchange: bool) -> None:
    assert not result.findings, _format(result.findings)
    assert result.crashed >= len(result.points) - len(result.not_reached) > 0
    assert len(result.not_reached) <= len(result.points) // 20, result.not_reached
    if exchange:
        assert not result.known_gap


@pytest.mark.parametrize("scenario", DEFAULT_SCENARIOS)
async def test_every_named_crash_point_leaves_old_or_new_state(servers, tmp_path, scenario):
    result = await walk(servers, tmp_path, scenario, exhaustive=False)
    _assert_walk(result, SCENARIOS[scenario][1])


@pytest.mark.parametrize("name", list(RECOVERY_TEMPLATES))
async def test_a_crash_during_recovery_from_a_crash(servers, tmp_path, name):
    scenario, first = RECOVERY_TEMPLATES[name]
    template = await make_template(servers, tmp_path, scenario, first)
    result = await walk(servers, tmp_path, scenario, exhaustive=False, template=template,
                        label=name)
    _assert_walk(result, SCENARIOS[scenario][1])


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_every_crash_point_of_every_fs_function(servers, tmp_path, scenario):
    result = await walk(servers, tmp_path, scenario, exhaustive=True)
    _assert_walk(result, SCENARIOS[scenario][1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECOVERY_TEMPLATES) + list(SLOW_RECOVERY_TEMPLATES))
async def test_every_crash_point_during_recovery(servers, tmp_path, name):
    scenario, first = {**RECOVERY_TEMPLATES, **SLOW_RECOVERY_TEMPLATES}[name]
    template = await make_template(servers, tmp_path, scenario, first)
    result = await walk(servers, tmp_path, scenario, exhaustive=True, template=template,
                        label=name)
    _assert_walk(result, SCENARIOS[scenario][1])


async def test_no_exchange_fallback_crash_between_renames_puts_the_old_one_back(servers, tmp_path):
    mode, exchange, _ = SCENARIOS["replace-no-exchange"]
    job = _job(tmp_path, "crash", mode, exchange, crash={"fn": "rename", "k": 3})
    code = await asyncio.to_thread(servers[0].run, job)
    note = _tail(job["note"])
    if code != child.CRASH_EXIT or "rename(ckpt-1.asyncckpt-tmp-" not in note:
        raise RuntimeError(f"not the crash point this test is about: {code} {note!r}")
    acks = child.read_acks(job["oracle"])
    if [os.path.basename(p) for p, _ in acks] != ["ckpt-1"]:
        raise RuntimeError(f"unexpected acknowledgements {acks}")
    d = job["dir"]
    # What a restarted job, or a reader of the state file, finds before entering a manager:
    latest = ac.latest_checkpoint(d)
    assert latest is not None, f"no latest checkpoint: {listing(d)}"
    assert await load_step(latest) >= acks[-1][1]
    ckpt = child.new_checkpoint(0, "walk")
    manager = ac.CheckpointManager(ckpt, d, max_to_keep=child.MAX_TO_KEEP)
    try:
        await manager.restore_or_initialize()
    except ac.CheckpointError as exc:
        raise AssertionError(f"restore_or_initialize() raised {exc!r}") from exc
    assert ckpt.step >= acks[-1][1]


# -- the fsync order, for power loss ------------------------------------------------------------
#
# A killed process loses nothing the kernel already has: the walk and kill -9 cannot see a
# missing fsync. A power loss can lose any write, file or directory entry, that was not made
# durable. So the order of the calls of a whole run is audited instead, under the
# conservative model of POSIX (no filesystem's extra ordering is assumed): a file's data is
# durable after its fsync, a directory's entries after that directory's fsync.

CHECKPOINT_STATE = "checkpoint"


def _parent(path: str) -> str:
    return os.path.dirname(path) or "."


def _is_final(path: str) -> bool:
    name = os.path.basename(path)
    return not any(mark in name for mark in MARKS) and not name.startswith(".") and \
        name != CHECKPOINT_STATE


def audit_power_loss_order(events: list[dict]) -> dict[str, list[str]]:
    """The violations of the durability order, by rule:

    - ``publish``: a checkpoint directory is renamed (or exchanged) to its final name only
      after every file in it was fsynced after its last write, and the directory itself
      after its last entry was created;
    - ``atomic``: a file replaces another (state file, retire list, owner) only after it was
      fsynced;
    - ``state``: the state file is replaced only after every publication in its directory
      was made durable (a durable state file never names a checkpoint that a power loss
      could take back);
    - ``retire-list``: the retire list is durable before the publication it covers;
    - ``delete``: nothing is renamed for deletion or removed while a publication, state
      file replacement or such rename in that directory is not yet durable (else a power
      loss could undo the rename and keep the deletion);
    - ``ack``: a save returns only once its publication and state file are durable;
    - ``dir-created``: a checkpoint directory that the first save created is durable in
      its own parent before that save returns.
    """
    calls: dict[tuple[str, int], tuple[int, dict]] = {}
    fd_path: dict[int, str] = {}
    written: dict[str, int] = {}      # path -> event index of its last write (or creation)
    synced: dict[str, int] = {}       # path -> event index of its last completed fsync
    entry_made: dict[str, int] = {}   # directory -> index of the last entry created in it
    dir_synced: dict[str, int] = {}   # directory -> index of its last completed fsync
    pending: dict[str, list[tuple[str, str]]] = {}  # directory -> (kind, what) not durable
    small: list[str] = []             # write_small calls under way (their fsync has no fd)
    root_created: int | None = None   # when the first save created the directory itself
    makedirs_seen = False
    out: dict[str, list[str]] = {}

    def bad(rule: str, text: str) -> None:
        out.setdefault(rule, []).append(text)

    def pending_in(directory: str, kinds: tuple[str, ...]) -> list[str]:
        return [what for kind, what in pending.get(directory, []) if kind in kinds]

    for i, ev in enumerate(events):
        kind = ev["e"]
        if kind == "ack":
            late = pending_in(_parent(ev["path"]), ("publish", "state"))
            if late:
                bad("ack", f"save of {ev['path']} returned before {late} were durable")
            if root_created is not None and dir_synced.get("..", -1) < root_created:
                bad("dir-created", f"save of {ev['path']} returned, but the directory the "
                                   f"first save created was not fsynced in its parent")
            root_created = None
            continue
        fn, k = ev["fn"], ev["k"]
        if kind == "call":
            calls[(fn, k)] = (i, ev)
            args = ev["args"]
            if fn == "close":
                fd_path.pop(args[0], None)
            elif fn == "write_all":
                if args[0] in fd_path:
                    written[fd_path[args[0]]] = i
            elif fn == "write_small":
                written[args[0]] = i
                entry_made[_parent(args[0])] = i
                small.append(args[0])
            elif fn in ("rename", "exchange", "replace"):
                src, dst = args[0], args[1]
                if os.path.basename(dst) == CHECKPOINT_STATE and fn == "replace":
                    if synced.get(src, -1) < written.get(src, 0):
                        bad("atomic", f"{ev['text']} before {src} was fsynced")
                    late = pending_in(_parent(dst), ("publish",))
                    if late:
                        bad("state", f"{ev['text']} while {late} were not durable")
                elif fn == "replace":
                    if synced.get(src, -1) < written.get(src, 0):
                        bad("atomic", f"{ev['text']} before {src} was fsynced")
                elif ".asyncckpt-deleting-" in dst or ".asyncckpt-old-" in dst:
                    late = pending_in(_parent(dst), ("publish", "state", "delete"))
                    if late and ".asyncckpt-deleting-" in dst:
                        bad("delete", f"{ev['text']} while {late} were not durable")
                elif _is_final(dst) and ".asyncckpt-tmp-" in src:
                    inside = [p for p in written if p.startswith(src + "/")]
                    for p in inside:
                        if not written[p] < synced.get(p, -1) < i:
                            bad("publish", f"{ev['text']} before {p} was fsynced")
                    if inside and not entry_made.get(src, -1) < dir_synced.get(src, -1) < i:
                        bad("publish", f"{ev['text']} before the directory {src} was fsynced")
                    late = pending_in(_parent(dst), ("retire-list",))
                    if late:
                        bad("retire-list", f"{ev['text']} while {late} were not durable")
            elif fn == "remove_tree":
                late = pending_in(_parent(args[0]), ("publish", "state", "delete"))
                if late:
                    bad("delete", f"{ev['text']} while {late} were not durable")
            continue
        # completions
        i_call, call = calls[(fn, k)]
        args = call["args"]
        if fn == "open_new":
            fd_path[ev["ret"]] = args[0]
            written[args[0]] = i
            entry_made[_parent(args[0])] = i
        elif fn in ("mkdir", "makedirs"):
            entry_made[_parent(args[0])] = i
            if fn == "makedirs" and args[0] == "." and not makedirs_seen:
                root_created = i   # the recorded runs start without the directory
            makedirs_seen = makedirs_seen or fn == "makedirs"
        elif fn == "fsync":
            if args[0] in fd_path:
                synced[fd_path[args[0]]] = i
            elif len(small) == 1:
                synced[small[0]] = i
        elif fn == "write_small":
            small.remove(args[0])
        elif fn == "fsync_dir":
            dir_synced[args[0]] = i
            # only changes that completed before this fsync started are covered by it
            pending[args[0]] = [(kd, w) for kd, w in pending.get(args[0], [])
                                if w.split("@")[-1] and int(w.split("@")[-1]) > i_call]
        elif fn in ("rename", "exchange", "replace"):
            if fn == "exchange" and ev["ret"] is False:
                continue
            src, dst = args[0], args[1]
            if os.path.basename(dst) == CHECKPOINT_STATE:
                what = "state"
            elif os.path.basename(dst) == ".asyncckpt-retire":
                what = "retire-list"
            elif ".asyncckpt-deleting-" in dst:
                what = "delete"
            elif _is_final(dst) and ".asyncckpt-tmp-" in src:
                what = "publish"
            else:
                what = "other"
            entry_made[_parent(dst)] = i
            pending.setdefault(_parent(dst), []).append((what, f"{call['text']}@{i}"))
    return out


def _without(events: list[dict], drop) -> list[dict]:
    """``events`` without the calls (and their completions) that ``drop`` picks."""
    gone = {(e["fn"], e["k"]) for e in events if e["e"] == "call" and drop(e)}
    assert gone, "the mutation matched nothing"
    return [e for e in events if e["e"] == "ack" or (e["fn"], e["k"]) not in gone]


async def test_the_fsync_order_audit_catches_missing_fsyncs(servers, tmp_path):
    """The audit is not vacuous: each fsync the protocol needs, taken out, is reported."""
    _, events = await record_run(servers, tmp_path, "async")
    assert "publish" in audit_power_loss_order(_without(
        events, lambda e: e["fn"] == "fsync" and e["k"] == 1))          # the first shard
    assert "publish" in audit_power_loss_order(_without(
        events, lambda e: e["fn"] == "fsync_dir" and ".asyncckpt-tmp-" in e["args"][0]))
    assert "atomic" in audit_power_loss_order(_without(
        events, lambda e: e["fn"] == "fsync" and e["k"] == 7))          # the state file's
    found = audit_power_loss_order(_without(      # the parent's fsync after a publication
        events, lambda e: e["fn"] == "fsync_dir" and e["args"][0] == "."
        and _follows_publish(events, e)))
    assert {"state", "delete"} <= set(found), found
    found = audit_power_loss_order(_without(      # every fsync of the parent
        events, lambda e: e["fn"] == "fsync_dir" and e["args"][0] == "."))
    assert {"retire-list", "state", "delete", "ack"} <= set(found), found


def _follows_publish(events: list[dict], call: dict) -> bool:
    """Is ``call`` the first fsync_dir after a publication?"""
    i = events.index(call)
    for e in reversed(events[:i]):
        if e["e"] == "call" and e["fn"] == "fsync_dir":
            return False
        if e["e"] == "call" and e["fn"] in ("rename", "exchange") and _is_final(e["args"][1]) \
                and ".asyncckpt-tmp-" in e["args"][0]:
            return True
    return False


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_fsync_order_survives_power_loss(servers, tmp_path, scenario):
    _, events = await record_run(servers, tmp_path, scenario)
    violations = audit_power_loss_order(events)
    assert not violations, violations


async def test_first_save_makes_its_new_directory_durable(servers, tmp_path):
    _, events = await record_run(servers, tmp_path, "sync")
    assert not audit_power_loss_order(events).get("dir-created")


# -- kill -9 at random moments -----------------------------------------------------------------

@dataclass
class KillStats:
    kills: int = 0
    mid_save: int = 0          # kills that left residue (a save or cleanup was under way)
    acknowledged: int = 0
    latest_steps: list[int] = field(default_factory=list)


async def kill_chain(server: Server, mode: str, base: Path, kills: int, seed: int,
                     max_delay: float) -> KillStats:
    """Start the training child on one directory, SIGKILL it after a random delay, check the
    directory, start it again on the same directory (it restores and trains on), ..."""
    rng = random.Random(seed)
    run = base / mode
    d, oracle, log, scratch = run / "d", run / "oracle", run / "log", run / "scratch"
    scratch.mkdir(parents=True)
    stats = KillStats()
    for i in range(kills):
        job = {"kind": "train", "mode": mode, "dir": str(d), "oracle": str(oracle),
               "log": str(log), "size": "kill", "seed": seed * 100_003 + i}
        await asyncio.to_thread(server.start, job)
        try:
            await asyncio.sleep(rng.uniform(0.0, max_delay))
        finally:
            server.kill_child()   # also when this test fails or is cancelled
        code = await asyncio.to_thread(server.wait)
        assert code == -signal.SIGKILL, (
            f"{mode} kill {i}: the training child exited {code} before it was killed:\n"
            f"{_tail(str(log))}")
        stats.kills += 1
        acks = child.read_acks(str(oracle))
        report = await check_directory(str(d), acks, clean_in_place=False,
                                       scratch=str(scratch))
        assert not report.problems, (f"{mode} kill {i} (seed {seed}, {len(acks)} saves "
                                     f"acknowledged):\n  " + "\n  ".join(report.problems))
        stats.mid_save += bool(report.residue_before)
        stats.acknowledged = len(acks)
        if report.latest_step is not None:
            stats.latest_steps.append(report.latest_step)
    return stats


async def kill_both(servers, base: Path, kills_per_mode: int, seed: int) -> None:
    started = time.perf_counter()
    tasks = [asyncio.ensure_future(kill_chain(servers[0], "async", base, kills_per_mode,
                                              seed, max_delay=0.5)),
             asyncio.ensure_future(kill_chain(servers[1], "sync", base, kills_per_mode,
                                              seed + 1, max_delay=0.5))]
    try:
        stats = await asyncio.gather(*tasks)
    finally:  # one chain failed: stop the other one too (its child is killed on the way)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    seconds = time.perf_counter() - started
    for mode, s in zip(("async", "sync"), stats):
        print(f"\nkill -9 {mode}: {s.kills} kills, {s.mid_save} left residue (killed mid-save "
              f"or mid-cleanup), {s.acknowledged} saves acknowledged, latest step "
              f"{s.latest_steps[-1] if s.latest_steps else None}; {seconds:.1f} s for both")
        # not vacuous: the chain made progress and kills landed inside saves
        assert s.acknowledged >= kills_per_mode // 4
        assert s.mid_save >= 1
        assert s.latest_steps == sorted(s.latest_steps)


async def test_kill9_at_random_moments(servers, tmp_path):
    await kill_both(servers, tmp_path, kills_per_mode=55, seed=1)


@pytest.mark.slow
async def test_kill9_at_random_moments_long(servers, tmp_path):
    await kill_both(servers, tmp_path, kills_per_mode=1500, seed=7)
