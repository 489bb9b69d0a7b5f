"""``tf.train.CheckpointManager``'s bookkeeping as immutable data and pure functions.

No I/O and no clock: the caller reads the state file, passes ``now``, and carries out the
deletions. The rules are TensorFlow's (``checkpoint_management.py``), in plain words:

**The view.** A manager knows an ordered list of *managed* checkpoints (oldest first, each
with the time it was saved), the time of the last checkpoint *preserved* by
``keep_checkpoint_every_n_hours``, and the *latest* checkpoint. Only managed checkpoints are
ever deleted. ``latest`` need not be managed.

**Opening a directory** (:func:`recover`, TF's ``__init__``). Without a state file: nothing is
managed, there is no latest, and the last preserved time is ``now - 1`` (TF sets the clock back
a second so that a manager re-created at once behaves the same). With one: ``latest`` is its
``model_checkpoint_path``; the last preserved time is its ``last_preserved_timestamp``, or
``now`` if that lies in the future (the clock went backwards: the caller warns). A state file
without timestamps gives every entry the last preserved time. Each timestamp is clamped to
``now``, and only entries *strictly newer* than the last preserved time become managed; the
others are left alone for good (never deleted, and gone from the state file after the next
save). So a file written by ``Checkpoint.save`` or TF1's ``Saver`` (no timestamps) yields
nothing managed, and after a clock reset nothing older than the reset is ever deleted.
A path listed twice keeps its first position and its last timestamp (``OrderedDict``).

**Saving** (:func:`record_save`, TF's write-done callback). The saved path is removed from the
list if present and appended as the newest, stamped ``now`` (the time the write *finished*);
it becomes ``latest``. Re-saving over a path makes it managed again, even a preserved one.

**Retention** (:func:`sweep`, TF's ``_sweep``, run after every save). With ``max_to_keep``
None nothing happens (``keep_every_n_hours`` is then without effect and the last preserved
time never moves). Otherwise, oldest first, while more than ``max_to_keep`` are managed, the
oldest leaves the list: if ``keep_every_n_hours`` is set and its timestamp is at least that
many hours after the last preserved time, it is *preserved* (kept on disk, forgotten, and its
timestamp becomes the last preserved time); otherwise it is *deleted*.

**Recording** (:func:`to_state`, TF's ``_record_state``). The state file names ``latest``,
the managed paths and their timestamps, and the last preserved time. TF writes it once before
the sweep and once after; deletions happen in between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._state_file import CheckpointState

__all__ = ["Managed", "SweepResult", "recover", "record_save", "sweep", "to_state"]


@dataclass(frozen=True)
class Managed:
    """A manager's view of its directory. ``paths`` and ``timestamps`` are oldest first.

    ``paths`` are as the manager names checkpoints (already resolved against the directory);
    they are unique and match ``timestamps`` one for one (``ValueError`` otherwise).
    """

    paths: tuple[str, ...]
    timestamps: tuple[float, ...]
    last_preserved_timestamp: float
    latest: str | None

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.timestamps):
            raise ValueError(f"{len(self.paths)} managed paths but "
                             f"{len(self.timestamps)} timestamps")
        if len(set(self.paths)) != len(self.paths):
            raise ValueError(f"managed paths repeat: {self.paths!r}")


@dataclass(frozen=True)
class SweepResult:
    """The outcome of :func:`sweep`."""

    managed: Managed
    """The view after retention."""
    delete: tuple[str, ...]
    """Checkpoints to delete now, oldest first."""
    preserve: tuple[str, ...]
    """Checkpoints kept on disk for good and no longer managed, oldest first."""


def _view(pairs: dict[str, float], last_preserved: float, latest: str | None) -> Managed:
    return Managed(tuple(pairs), tuple(pairs.values()), last_preserved, latest)


def recover(state: CheckpointState | None, *, now: float,
            resolve: Callable[[str], str]) -> tuple[Managed, bool]:
    """The view of a manager opening a directory whose state file holds ``state``.

    ``state`` is None where there is no state file. ``now`` is the current ``time.time()``;
    ``resolve`` turns a path as written in the state file into the manager's path (TF joins
    relative paths to the directory). Returns the view and whether the clock went backwards
    (``now`` is before the recorded ``last_preserved_timestamp``), for the caller to warn.
    """
    if state is None:
        return Managed((), (), now - 1.0, None), False
    latest = resolve(state.model_checkpoint_path) if state.model_checkpoint_path else None
    last_preserved = state.last_preserved_timestamp
    went_backwards = now < last_preserved
    if went_backwards:
        last_preserved = now
    paths = state.all_model_checkpoint_paths
    stamps = state.all_model_checkpoint_timestamps or (last_preserved,) * len(paths)
    managed: dict[str, float] = {}
    for path, stamp in zip(paths, stamps, strict=False):  # TF zips: extras are ignored
        stamp = min(stamp, now)
        if stamp > last_preserved:
            managed[resolve(path)] = stamp  # a repeated path keeps its first position
    return _view(managed, last_preserved, latest), went_backwards


def record_save(m: Managed, path: str, *, now: float) -> Managed:
    """The view after ``path`` was written at ``now``: newest managed, and latest."""
    managed = dict(zip(m.paths, m.timestamps, strict=True))
    managed.pop(path, None)
    managed[path] = now
    return _view(managed, m.last_preserved_timestamp, path)


def sweep(m: Managed, *, max_to_keep: int | None,
          keep_every_n_hours: float | None) -> SweepResult:
    """Apply retention after a save: what stays managed, is deleted, or is preserved.

    ``max_to_keep`` must be None (keep everything) or positive (TF raises ``ValueError`` in
    the constructor otherwise; so does this). ``keep_every_n_hours`` None or 0 preserves
    nothing.
    """
    if max_to_keep is not None and max_to_keep <= 0:
        raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep}")
    if not max_to_keep:
        return SweepResult(m, (), ())
    managed = dict(zip(m.paths, m.timestamps, strict=True))
    last_preserved = m.last_preserved_timestamp
    delete: list[str] = []
    preserve: list[str] = []
    while len(managed) > max_to_keep:
        path = next(iter(managed))
        stamp = managed.pop(path)
        if keep_every_n_hours and stamp - keep_every_n_hours * 3600.0 >= last_preserved:
            last_preserved = stamp
            preserve.append(path)
        else:
            delete.append(path)
    return SweepResult(_view(managed, last_preserved, m.latest), tuple(delete), tuple(preserve))


def to_state(m: Managed, relative_to: Callable[[str], str]) -> CheckpointState:
    """The state file content TF's ``_record_state`` writes for this view.

    ``relative_to`` turns a manager path into the path to write (TF, with
    ``save_relative_paths=True``, writes paths relative to the directory). TF can only
    record a view with managed checkpoints whose newest is ``latest`` (the case after every
    save); anything else raises ``ValueError``, as it does in TF.
    """
    if m.latest is None or not m.paths:
        raise ValueError("nothing to record: no latest or no managed checkpoint")
    latest = relative_to(m.latest)
    paths = tuple(relative_to(p) for p in m.paths)
    if paths[-1] != latest:
        raise ValueError(f"the latest checkpoint {m.latest!r} is not the newest managed one "
                         f"({m.paths[-1]!r})")
    return CheckpointState(model_checkpoint_path=latest, all_model_checkpoint_paths=paths,
                           all_model_checkpoint_timestamps=m.timestamps,
                           last_preserved_timestamp=m.last_preserved_timestamp)
