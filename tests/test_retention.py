"""CheckpointManager bookkeeping: pure-function tables and TF's CheckpointManagerTest ported.

No file system: a "world" holds the set of checkpoint paths on disk and the state file bytes;
:class:`SimManager` drives the pure functions exactly as TF's ``CheckpointManager`` does
(``__init__`` -> ``recover``; ``save`` -> ``record_save``, record, ``sweep``, delete, record).
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field

import pytest

from asyncckpt._retention import Managed, SweepResult, record_save, recover, sweep, to_state
from asyncckpt._state_file import CheckpointState, decode_state, encode_state

DIR = "/ckpts"


def resolve(path: str) -> str:
    return path if path.startswith("/") else posixpath.join(DIR, path)


def relative_to(path: str) -> str:
    return posixpath.relpath(path, DIR) if path.startswith("/") else path


def P(name: str) -> str:  # noqa: N802 - a manager path in DIR
    return posixpath.join(DIR, name)


@dataclass
class World:
    disk: set[str] = field(default_factory=set)
    state: bytes | None = None
    save_counter: int = 0  # tf.train.Checkpoint.save_counter, shared by managers
    states_written: list[bytes] = field(default_factory=list)

    def exists(self, path: str) -> bool:
        return path in self.disk


class SimManager:
    """TF's CheckpointManager on the pure functions; ``now`` stands in for ``time.time()``."""

    def __init__(self, world: World, *, max_to_keep: int | None, now: float,
                 keep_checkpoint_every_n_hours: float | None = None) -> None:
        self.world, self.max_to_keep = world, max_to_keep
        self.keep_hours = keep_checkpoint_every_n_hours
        state = None if world.state is None else decode_state(world.state, source="checkpoint")
        self.view, self.clock_went_backwards = recover(state, now=now, resolve=resolve)

    @property
    def checkpoints(self) -> list[str]:
        return list(self.view.paths)

    @property
    def latest_checkpoint(self) -> str | None:
        return self.view.latest

    def _record(self, view: Managed) -> None:
        self.world.state = encode_state(to_state(view, relative_to))
        self.world.states_written.append(self.world.state)

    def save(self, *, now: float, checkpoint_number: int | None = None) -> str:
        self.world.save_counter += 1
        number = self.world.save_counter if checkpoint_number is None else checkpoint_number
        path = P(f"ckpt-{number}")
        self.world.disk.add(path)
        view = record_save(self.view, path, now=now)
        self._record(view)  # TF records the new checkpoint before deleting anything
        result = sweep(view, max_to_keep=self.max_to_keep,
                       keep_every_n_hours=self.keep_hours)
        self.world.disk.difference_update(result.delete)
        self.view = result.managed
        self._record(self.view)
        return path


def state_of(world: World) -> CheckpointState:
    assert world.state is not None
    return decode_state(world.state, source="checkpoint")


# -- TF's CheckpointManagerTest, ported ---------------------------------------------------------


def test_deletion():
    world = World()
    manager = SimManager(world, max_to_keep=3, now=100.0)
    first, second, third, fourth = (manager.save(now=100.0 + i) for i in range(4))
    assert world.exists(fourth) and world.exists(third) and world.exists(second)
    assert not world.exists(first)


def test_keep_all():
    world = World()
    manager = SimManager(world, max_to_keep=None, now=100.0)
    first, second, third = (manager.save(now=100.0 + i) for i in range(3))
    assert all(world.exists(p) for p in (first, second, third))
    assert manager.latest_checkpoint == third
    assert manager.checkpoints == [first, second, third]
    manager = SimManager(world, max_to_keep=None, now=110.0)
    fourth = manager.save(now=110.0)
    assert manager.checkpoints == [first, second, third, fourth]
    manager = SimManager(world, max_to_keep=3, now=120.0)
    assert manager.checkpoints == [first, second, third, fourth]  # nothing swept on open
    assert all(world.exists(p) for p in (first, second, third, fourth))
    fifth = manager.save(now=120.0)
    assert manager.checkpoints == [third, fourth, fifth]
    assert all(world.exists(p) for p in (third, fourth, fifth))
    assert not world.exists(second) and not world.exists(first)
    assert state_of(world).last_preserved_timestamp == 99.0  # never moves with max None


def test_save_restore_state():
    world = World()
    first_manager = SimManager(world, max_to_keep=2, now=3.0)
    first_time = 10000.0
    first_name = first_manager.save(now=first_time)
    assert first_name == P("ckpt-1")
    second_time = first_time + 3610.0
    second_name = first_manager.save(now=second_time)
    state = state_of(world)
    assert state.all_model_checkpoint_timestamps == (first_time, second_time)
    assert state.last_preserved_timestamp == 2.0  # the first manager opened at 3.0
    assert first_manager.checkpoints == [first_name, second_name]
    assert first_manager.latest_checkpoint == second_name

    second_manager = SimManager(world, max_to_keep=2, now=second_time,
                                keep_checkpoint_every_n_hours=1.5)
    assert second_manager.checkpoints == [first_name, second_name]
    assert second_manager.latest_checkpoint == second_name
    third_time = second_time + 3600.0 * 0.2
    third_name = second_manager.save(now=third_time)
    assert world.exists(first_name) and world.exists(second_name)  # first is preserved
    assert second_manager.checkpoints == [second_name, third_name]
    assert state_of(world).last_preserved_timestamp == first_time
    fourth_time = third_time + 3600.0 * 0.5
    fourth_name = second_manager.save(now=fourth_time)
    assert world.exists(first_name) and not world.exists(second_name)
    assert second_manager.checkpoints == [third_name, fourth_name]
    fifth_time = fourth_time + 3600.0 * 0.5
    fifth_name = second_manager.save(now=fifth_time)
    assert second_manager.checkpoints == [fourth_name, fifth_name]
    assert state_of(world).last_preserved_timestamp == first_time

    third_manager = SimManager(world, max_to_keep=2, now=fifth_time,
                               keep_checkpoint_every_n_hours=1.5)
    assert third_manager.latest_checkpoint == fifth_name
    sixth_name = third_manager.save(now=fifth_time + 10.0)
    assert sixth_name == P("ckpt-6")
    assert state_of(world).last_preserved_timestamp == fourth_time
    for name in (first_name, fourth_name, fifth_name, sixth_name):
        assert world.exists(name)
    assert not world.exists(second_name) and not world.exists(third_name)
    assert third_manager.checkpoints == [fifth_name, sixth_name]
    # The exact numbers: 16130 = 10000 + 3610 + 720 + 1800, and the file TF writes.
    assert (fourth_time, fifth_time) == (16130.0, 17930.0)
    assert world.state == (
        b'model_checkpoint_path: "ckpt-6"\n'
        b'all_model_checkpoint_paths: "ckpt-5"\n'
        b'all_model_checkpoint_paths: "ckpt-6"\n'
        b"all_model_checkpoint_timestamps: 17930.0\n"
        b"all_model_checkpoint_timestamps: 17940.0\n"
        b"last_preserved_timestamp: 16130.0\n")
    # Before sweeping, TF's first record already names ckpt-6 (and still ckpt-4).
    assert world.states_written[-2] == (
        b'model_checkpoint_path: "ckpt-6"\n'
        b'all_model_checkpoint_paths: "ckpt-4"\n'
        b'all_model_checkpoint_paths: "ckpt-5"\n'
        b'all_model_checkpoint_paths: "ckpt-6"\n'
        b"all_model_checkpoint_timestamps: 16130.0\n"
        b"all_model_checkpoint_timestamps: 17930.0\n"
        b"all_model_checkpoint_timestamps: 17940.0\n"
        b"last_preserved_timestamp: 10000.0\n")


def test_continue_from_unmanaged():
    # tf.train.Checkpoint.save(prefix) twice: files on disk, a state file without timestamps.
    first_path, second_path = P("unusual_prefix-1"), P("unusual_prefix-2")
    world = World(disk={first_path, second_path}, save_counter=2, state=(
        b'model_checkpoint_path: "unusual_prefix-2"\n'
        b'all_model_checkpoint_paths: "unusual_prefix-2"\n'))
    manager = SimManager(world, max_to_keep=2, now=1000.0)
    assert manager.latest_checkpoint == second_path
    assert manager.checkpoints == []
    third_path = manager.save(now=1001.0)
    assert manager.checkpoints == [third_path]
    fourth_path = manager.save(now=1002.0)
    assert manager.checkpoints == [third_path, fourth_path]
    fifth_path = manager.save(now=1003.0)
    assert manager.checkpoints == [fourth_path, fifth_path]
    assert world.exists(first_path) and world.exists(second_path)
    assert not world.exists(third_path)
    assert world.exists(fourth_path) and world.exists(fifth_path)


def test_clock_reset():
    world = World()
    first_manager = SimManager(world, max_to_keep=1, now=10000.0,
                               keep_checkpoint_every_n_hours=1.0)
    first_path = first_manager.save(now=10000.0)
    second_path = first_manager.save(now=13600.0)
    third_path = first_manager.save(now=17200.0)
    assert not world.exists(first_path)
    assert world.exists(second_path) and world.exists(third_path)
    assert first_manager.checkpoints == [third_path]
    assert state_of(world).last_preserved_timestamp == 13600.0
    # The clock goes back in time.
    second_manager = SimManager(world, max_to_keep=1, now=5000.0)
    assert second_manager.clock_went_backwards  # TF logs "behind the last preserved ..."
    assert world.exists(second_path)
    assert second_manager.latest_checkpoint == third_path
    assert second_manager.checkpoints == []  # known, but never deleted
    fourth_path = second_manager.save(now=5010.0)
    assert world.exists(second_path) and world.exists(third_path)
    assert second_manager.latest_checkpoint == fourth_path
    assert second_manager.checkpoints == [fourth_path]
    fifth_path = second_manager.save(now=5020.0)
    assert world.exists(second_path) and world.exists(third_path)
    assert second_manager.checkpoints == [fifth_path]
    state = state_of(world)
    assert state.last_preserved_timestamp == 5000.0
    assert state.all_model_checkpoint_timestamps == (5020.0,)
    assert not first_manager.clock_went_backwards


def test_custom_numbering():
    world = World()
    manager = SimManager(world, max_to_keep=2, now=1.0)
    for i in range(5):
        path = manager.save(now=2.0 + i, checkpoint_number=2 * i)
        assert path.endswith(f"-{2 * i}")
    assert world.save_counter == 5
    last_path = manager.save(now=10.0, checkpoint_number=32)
    assert manager.latest_checkpoint == last_path == P("ckpt-32")
    state = state_of(world)
    assert state.all_model_checkpoint_paths == ("ckpt-8", "ckpt-32")
    assert resolve(state.model_checkpoint_path) == last_path


def test_resaving_a_path_moves_it_to_the_newest_place():
    world = World()
    manager = SimManager(world, max_to_keep=2, now=1.0)
    one, two = manager.save(now=2.0), manager.save(now=3.0)
    again = manager.save(now=4.0, checkpoint_number=1)
    assert again == one and manager.checkpoints == [two, one]
    assert manager.view.timestamps == (3.0, 4.0)
    three = manager.save(now=5.0, checkpoint_number=3)
    assert manager.checkpoints == [one, three] and not world.exists(two)


# -- the functions, table by table -------------------------------------------------------------


def test_recover_without_state_file():
    view, went_back = recover(None, now=500.0, resolve=resolve)
    assert view == Managed((), (), 499.0, None) and not went_back


@pytest.mark.parametrize(("state", "now", "expected", "went_back"), [
    # timestamps after the last preserved time are managed, paths resolved
    (CheckpointState("c", ("a", "/x/b", "c"), (10.0, 20.0, 30.0), 5.0), 100.0,
     Managed((P("a"), "/x/b", P("c")), (10.0, 20.0, 30.0), 5.0, P("c")), False),
    # at or before the last preserved time: unmanaged; latest need not be managed
    (CheckpointState("c", ("a", "b", "c"), (5.0, 5.5, 4.0), 5.0), 100.0,
     Managed((P("b"),), (5.5,), 5.0, P("c")), False),
    # no timestamps (Checkpoint.save, TF1 Saver): every entry gets the last preserved time
    (CheckpointState("b", ("a", "b"), (), 5.0), 100.0, Managed((), (), 5.0, P("b")), False),
    (CheckpointState("b", ("a", "b")), 100.0, Managed((), (), 0.0, P("b")), False),
    # future timestamps are clamped to now
    (CheckpointState("b", ("a", "b"), (50.0, 500.0), 10.0), 100.0,
     Managed((P("a"), P("b")), (50.0, 100.0), 10.0, P("b")), False),
    # the clock went backwards: last preserved becomes now, so nothing stays managed
    (CheckpointState("b", ("a", "b"), (150.0, 160.0), 140.0), 100.0,
     Managed((), (), 100.0, P("b")), True),
    (CheckpointState("b", ("a", "b"), (90.0, 160.0), 100.0), 100.0,  # equal: not backwards
     Managed((), (), 100.0, P("b")), False),
    # a repeated path keeps its first position and its last timestamp (OrderedDict)
    (CheckpointState("a", ("a", "b", "a"), (10.0, 20.0, 30.0), 0.0), 100.0,
     Managed((P("a"), P("b")), (30.0, 20.0), 0.0, P("a")), False),
    # two spellings resolving to one path are one entry
    (CheckpointState("a", ("a", P("a")), (10.0, 20.0), 0.0), 100.0,
     Managed((P("a"),), (20.0,), 0.0, P("a")), False),
    # TF zips: more paths than timestamps ignores the extra paths
    (CheckpointState("c", ("a", "b", "c"), (10.0,), 0.0), 100.0,
     Managed((P("a"),), (10.0,), 0.0, P("c")), False),
    # NaN as Python compares it: never managed; a NaN last preserved time manages nothing
    (CheckpointState("b", ("a", "b"), (math.nan, 10.0), 0.0), 100.0,
     Managed((P("b"),), (10.0,), 0.0, P("b")), False),
    (CheckpointState("b", ("a", "b"), (math.inf, -math.inf), 0.0), 100.0,
     Managed((P("a"),), (100.0,), 0.0, P("b")), False),
])
def test_recover(state, now, expected, went_back):
    view, backwards = recover(state, now=now, resolve=resolve)
    assert view == expected and backwards is went_back


def test_recover_with_nan_last_preserved_manages_nothing():
    view, backwards = recover(CheckpointState("a", ("a",), (1.0,), math.nan), now=10.0,
                              resolve=resolve)
    assert view.paths == () and math.isnan(view.last_preserved_timestamp) and not backwards


def test_record_save():
    view = Managed(("a", "b"), (1.0, 2.0), 0.5, "b")
    assert record_save(view, "c", now=3.0) == Managed(("a", "b", "c"), (1.0, 2.0, 3.0), 0.5, "c")
    assert record_save(view, "a", now=3.0) == Managed(("b", "a"), (2.0, 3.0), 0.5, "a")
    assert record_save(Managed((), (), 0.0, "old"), "n", now=1.0) == (
        Managed(("n",), (1.0,), 0.0, "n"))


H = 3600.0


@pytest.mark.parametrize(("stamps", "last", "max_to_keep", "hours", "expected"), [
    # max_to_keep None keeps everything; keep_every_n_hours is then without effect
    ((0.0, 10 * H, 20 * H), 0.0, None, 1.0,
     SweepResult(Managed(("a", "b", "c"), (0.0, 10 * H, 20 * H), 0.0, "c"), (), ())),
    # at most max_to_keep: nothing to do
    ((1.0, 2.0), 0.0, 2, None, SweepResult(Managed(("a", "b"), (1.0, 2.0), 0.0, "c"), (), ())),
    # oldest first
    ((1.0, 2.0, 3.0), 0.0, 1, None,
     SweepResult(Managed(("c",), (3.0,), 0.0, "c"), ("a", "b"), ())),
    # preserved when at least n hours after the last preserved time (>=), which then moves
    ((1 * H, 1.5 * H, 2 * H), 0.0, 1, 1.0,
     SweepResult(Managed(("c",), (2 * H,), 1 * H, "c"), ("b",), ("a",))),
    ((1 * H, 2 * H, 2.5 * H), 0.0, 1, 1.0,
     SweepResult(Managed(("c",), (2.5 * H,), 2 * H, "c"), (), ("a", "b"))),
    ((0.5 * H, 2 * H, 3 * H), 0.0, 1, 1.0,
     SweepResult(Managed(("c",), (3 * H,), 2 * H, "c"), ("a",), ("b",))),
    # keep_every_n_hours 0 preserves nothing (falsy in TF)
    ((10 * H, 20 * H, 30 * H), 0.0, 1, 0.0,
     SweepResult(Managed(("c",), (30 * H,), 0.0, "c"), ("a", "b"), ())),
    # fractional hours, compared as TF computes it: stamp - hours * 3600 >= last
    ((1000.0 + 0.1 * H, 1000.0 + 0.1 * H + 1), 1000.0, 1, 0.1,
     SweepResult(Managed(("b",), (1000.0 + 0.1 * H + 1,), 1000.0 + 0.1 * H, "c"), (),
                 ("a",))),
])
def test_sweep(stamps, last, max_to_keep, hours, expected):
    view = Managed(("a", "b", "c")[:len(stamps)], stamps, last, "c")
    assert sweep(view, max_to_keep=max_to_keep, keep_every_n_hours=hours) == expected


@pytest.mark.parametrize("bad", [0, -1])
def test_sweep_rejects_a_non_positive_max_to_keep(bad):
    with pytest.raises(ValueError, match="max_to_keep"):
        sweep(Managed((), (), 0.0, None), max_to_keep=bad, keep_every_n_hours=None)


def test_to_state():
    view = Managed((P("a"), "/elsewhere/b", P("sub/c")), (1.0, 2.0, 3.0), 0.5, P("sub/c"))
    assert to_state(view, relative_to) == CheckpointState(
        "sub/c", ("a", "../elsewhere/b", "sub/c"), (1.0, 2.0, 3.0), 0.5)
    assert to_state(view, lambda p: p).model_checkpoint_path == P("sub/c")


@pytest.mark.parametrize("view", [
    Managed((), (), 0.0, None),
    Managed((), (), 0.0, P("a")),  # nothing managed (TF: zip(*{}) fails)
    Managed((P("a"),), (1.0,), 0.0, None),
    Managed((P("a"), P("b")), (1.0, 2.0), 0.0, P("a")),  # latest is not the newest
])
def test_to_state_refuses_what_tf_cannot_record(view):
    with pytest.raises(ValueError):
        to_state(view, relative_to)


def test_managed_checks_its_invariants():
    with pytest.raises(ValueError, match="timestamps"):
        Managed(("a",), (), 0.0, None)
    with pytest.raises(ValueError, match="repeat"):
        Managed(("a", "a"), (1.0, 2.0), 0.0, None)
