"""TensorFlow's CheckpointManager bookkeeping as data plus pure functions. No I/O, no clock.

The manager's view is an ordered list of managed checkpoints with their timestamps (oldest
first), the timestamp of the last checkpoint preserved by ``keep_checkpoint_every_n_hours``,
and the latest checkpoint. The rules, exactly as ``tf.train.CheckpointManager``:

- **Recovery** (a manager opening a directory): with no state file the last preserved time is
  ``now - 1``. Otherwise a last preserved time later than ``now`` means the clock went back:
  it becomes ``now`` (and the caller warns). Entries without timestamps get the last preserved
  time. Each timestamp is clamped to ``now``; only entries newer than the last preserved time
  are managed; the others are left alone forever (never deleted, dropped from the state file at
  the next save). The latest checkpoint is the state file's, managed or not.
- **Save**: the path is removed if present and appended as the newest, stamped ``now``.
- **Sweep**: with ``max_to_keep`` None nothing happens. Otherwise, oldest first, while more than
  ``max_to_keep`` are managed: one whose timestamp is at least ``keep_checkpoint_every_n_hours``
  after the last preserved time is preserved (forgotten, kept forever, and becomes the last
  preserved time); any other is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ._state_file import CheckpointState

__all__ = ["Managed", "SweepResult", "recover", "record_save", "sweep", "to_state"]


@dataclass(frozen=True)
class Managed:
    paths: tuple[str, ...]
    timestamps: tuple[float, ...]
    last_preserved_timestamp: float
    latest: str | None


@dataclass(frozen=True)
class SweepResult:
    managed: Managed
    delete: tuple[str, ...]
    preserve: tuple[str, ...]


def recover(state: CheckpointState | None, *, now: float,
            resolve: Callable[[str], str]) -> tuple[Managed, bool]:
    """The view of a manager opening a directory; the flag says the clock went backwards."""
    if state is None:
        return Managed((), (), now - 1.0, None), False
    latest = resolve(state.model_checkpoint_path) if state.model_checkpoint_path else None
    last_preserved = state.last_preserved_timestamp
    went_back = now < last_preserved
    if went_back:
        last_preserved = now
    stamps = state.all_model_checkpoint_timestamps or (
        (last_preserved,) * len(state.all_model_checkpoint_paths))
    kept: dict[str, float] = {}
    for path, stamp in zip(state.all_model_checkpoint_paths, stamps):
        stamp = min(stamp, now)
        if stamp > last_preserved:
            full = resolve(path)
            kept.pop(full, None)
            kept[full] = stamp
    return Managed(tuple(kept), tuple(kept.values()), last_preserved, latest), went_back


def record_save(m: Managed, path: str, *, now: float) -> Managed:
    """A save of ``path`` at ``now``: it becomes the newest managed and the latest."""
    pairs = [(p, t) for p, t in zip(m.paths, m.timestamps) if p != path] + [(path, now)]
    return Managed(tuple(p for p, _ in pairs), tuple(t for _, t in pairs),
                   m.last_preserved_timestamp, path)


def sweep(m: Managed, *, max_to_keep: int | None,
          keep_every_n_hours: float | None) -> SweepResult:
    """Apply retention: what stays managed, what to delete, what to preserve forever."""
    if not max_to_keep:
        return SweepResult(m, (), ())
    pairs = list(zip(m.paths, m.timestamps))
    last_preserved = m.last_preserved_timestamp
    delete: list[str] = []
    preserve: list[str] = []
    while len(pairs) > max_to_keep:
        path, stamp = pairs.pop(0)
        if keep_every_n_hours and stamp - keep_every_n_hours * 3600.0 >= last_preserved:
            last_preserved = stamp
            preserve.append(path)
        else:
            delete.append(path)
    kept = Managed(tuple(p for p, _ in pairs), tuple(t for _, t in pairs), last_preserved,
                   m.latest)
    return SweepResult(kept, tuple(delete), tuple(preserve))


def to_state(m: Managed, relative_to: Callable[[str], str]) -> CheckpointState:
    """The state file content for this view (paths made relative by ``relative_to``)."""
    return CheckpointState(
        model_checkpoint_path=relative_to(m.latest) if m.latest else "",
        all_model_checkpoint_paths=tuple(relative_to(p) for p in m.paths),
        all_model_checkpoint_timestamps=tuple(m.timestamps),
        last_preserved_timestamp=m.last_preserved_timestamp)
