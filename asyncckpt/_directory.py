"""A managed checkpoint directory: state file, bookkeeping files, residue cleanup.

Files of the manager's own, next to the checkpoints (TensorFlow ignores them):

- ``checkpoint``: TensorFlow's CheckpointState (see docs/format.md).
- ``.asyncckpt-lock``: empty; ``flock``-ed only for the few milliseconds of a commit.
- ``.asyncckpt-owner``: ``<manager id> <commit count>`` of the last manager commit, to detect a
  second manager committing into the same directory.
- ``.asyncckpt-retire``: the names a commit is about to retire, written before the state file
  stops naming them, so a crash between the two still lets the next manager finish the job.
"""

from __future__ import annotations

import os
import re
import secrets

import anyio

from . import _fs
from ._errors import CorruptCheckpointError
from ._format import DELETING_MARK, MANIFEST_NAME, OLD_MARK, TMP_MARK
from ._state_file import CheckpointState, decode_state, encode_state, is_safe_relative

__all__ = [
    "STATE_NAME", "read_state_sync", "read_state", "write_state", "write_state_sync",
    "state_for_paths",
    "read_owner", "write_owner", "write_retire", "clear_retire", "retire", "mark_deleted",
    "remove", "clean_residue",
    "commit_lock", "list_numbered",
]

STATE_NAME = "checkpoint"
LOCK_NAME = ".asyncckpt-lock"
OWNER_NAME = ".asyncckpt-owner"
RETIRE_NAME = ".asyncckpt-retire"
_STATE_LIMIT = 16 << 20
_OWNER_RE = re.compile(r"([0-9a-f]{32}) ([0-9]{1,19})\n?\Z")


def _check_paths(state: CheckpointState, source: str) -> CheckpointState:
    for path in (state.model_checkpoint_path, *state.all_model_checkpoint_paths):
        if path and not os.path.isabs(path) and not is_safe_relative(path):
            raise CorruptCheckpointError(
                f"{source} names {path!r}, which leaves the directory; remove the state file "
                f"or rebuild it with CheckpointManager.rebuild_state()")
    return state


def read_state_sync(directory: str) -> CheckpointState | None:
    """The directory's state file, or None where there is none. Damage raises."""
    source = os.path.join(directory, STATE_NAME)
    try:
        data = _fs.read_small_sync(source, _STATE_LIMIT)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"cannot read the state file {source}: {exc}; remove it "
                                     f"or rebuild it with CheckpointManager.rebuild_state()"
                                     ) from exc
    return _check_paths(decode_state(data, source=source), source)


async def read_state(directory: str) -> CheckpointState | None:
    """Async twin of :func:`read_state_sync`. Cancellation: nothing is changed."""
    return await anyio.to_thread.run_sync(read_state_sync, directory)


def resolve(directory: str, path: str) -> str:
    """A state-file path as the manager names it (relative paths joined to the directory)."""
    return path if os.path.isabs(path) else os.path.join(directory, path)


def relative(directory: str, path: str) -> str:
    """How TensorFlow records ``path`` with ``save_relative_paths=True``."""
    return os.path.relpath(path, directory) if os.path.isabs(path) == os.path.isabs(
        directory) else path


async def write_state(directory: str, state: CheckpointState, *, sync: bool) -> None:
    """Replace the state file atomically. Cancellation: shielded."""
    await _fs.atomic_write(os.path.join(directory, STATE_NAME), encode_state(state),
                           tmp_suffix=f"{TMP_MARK}{secrets.token_hex(4)}", sync=sync)


def write_state_sync(directory: str, state: CheckpointState, *, sync: bool) -> None:
    """Blocking twin of :func:`write_state`, for the commit's worker thread."""
    _write_sync(os.path.join(directory, STATE_NAME), encode_state(state), sync)


def state_for_paths(directory: str, latest: str, paths: list[str], timestamps: list[float],
                    last_preserved: float) -> CheckpointState:
    return CheckpointState(
        model_checkpoint_path=relative(directory, latest),
        all_model_checkpoint_paths=tuple(relative(directory, p) for p in paths),
        all_model_checkpoint_timestamps=tuple(timestamps),
        last_preserved_timestamp=last_preserved)


def read_owner(directory: str) -> tuple[str, int] | None:
    """The last committing manager's (id, commit count), None if no manager committed."""
    try:
        text = _fs.read_small_sync(os.path.join(directory, OWNER_NAME), 256).decode("ascii")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return ("corrupt", -1)
    match = _OWNER_RE.match(text)
    return (match[1], int(match[2])) if match else ("corrupt", -1)


def write_owner(directory: str, owner: tuple[str, int], *, sync: bool) -> None:
    """Replace the owner record atomically. Its rename is not made durable with a directory
    fsync: the record only tells managers running now apart, and after a power loss none is
    running; an older record is then read as it is."""
    _write_sync(os.path.join(directory, OWNER_NAME), f"{owner[0]} {owner[1]}\n".encode(), sync,
                durable_rename=False)


def write_retire(directory: str, names: list[str], *, sync: bool) -> None:
    """Add ``names`` to the retire list (names left by an unfinished retirement stay)."""
    path = os.path.join(directory, RETIRE_NAME)
    try:
        old = _fs.read_small_sync(path, 1 << 20).decode("utf-8", "replace").splitlines()
    except (FileNotFoundError, ValueError):
        old = []
    merged = list(dict.fromkeys([*old, *names]))
    _write_sync(path, "".join(n + "\n" for n in merged).encode(), sync)


def clear_retire(directory: str) -> None:
    try:
        _fs.unlink(os.path.join(directory, RETIRE_NAME))
    except FileNotFoundError:
        pass


def _write_sync(path: str, data: bytes, sync: bool, *, durable_rename: bool = True) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename, directory fsync)."""
    tmp = f"{path}{TMP_MARK}{secrets.token_hex(4)}"
    try:
        _fs.create_file(tmp, data, sync=sync)
        _fs.replace(tmp, path)
    except BaseException:
        try:
            _fs.unlink(tmp)
        except OSError:
            pass
        raise
    if sync and durable_rename:
        _fs.fsync_dir(os.path.dirname(path) or ".")


def retire(directory: str, paths: list[str], *, sync: bool) -> None:
    """Rename each path to a marked-for-deletion name, make that durable, then delete."""
    remove(mark_deleted(directory, paths, sync=sync))


def mark_deleted(directory: str, paths: list[str], *, sync: bool) -> list[str]:
    """Rename each path to a marked-for-deletion name and make that durable: from then on it
    is gone under its own name, and a crash leaves only a name the next manager removes.
    Returns the marked paths, for :func:`remove`."""
    doomed = []
    for path in paths:
        if _fs.is_dir(path):
            marked = f"{path}{DELETING_MARK}{secrets.token_hex(4)}"
            _fs.rename(path, marked)
            doomed.append(marked)
    if doomed and sync:
        _fs.fsync_dir(directory)
    return doomed


def remove(marked: list[str]) -> None:
    """Delete directories :func:`mark_deleted` renamed."""
    for path in marked:
        _fs.remove_tree(path)


def clean_residue(directory: str, state: CheckpointState | None, *, sync: bool) -> None:
    """Finish what a crash interrupted: retirements, temporary and marked directories.

    Only asyncckpt's own names are touched: ``*.asyncckpt-tmp-*``, ``*.asyncckpt-deleting-*``,
    ``*.asyncckpt-old-*`` (put back if its checkpoint is missing), and the names listed in
    ``.asyncckpt-retire`` that the state file no longer names.
    """
    if not _fs.is_dir(directory):
        return
    entries = _fs.listdir(directory)
    for entry in entries:
        path = os.path.join(directory, entry)
        if OLD_MARK in entry:
            final = path.split(OLD_MARK)[0]
            if not _fs.exists(final):
                _fs.rename(path, final)
                continue
        if TMP_MARK in entry or DELETING_MARK in entry or OLD_MARK in entry:
            if _fs.is_dir(path):
                _fs.remove_tree(path)
            else:
                _fs.unlink(path)
    try:
        listed = _fs.read_small_sync(os.path.join(directory, RETIRE_NAME), 1 << 20)
    except FileNotFoundError:
        return
    named = set()
    if state is not None:
        named = {os.path.normpath(resolve(directory, p)) for p in
                 (state.model_checkpoint_path, *state.all_model_checkpoint_paths)}
    doomed = []
    for name in listed.decode("utf-8", "replace").splitlines():
        path = os.path.join(directory, name)
        if is_safe_relative(name) and "/" not in name and os.path.normpath(path) not in named:
            doomed.append(path)
    retire(directory, doomed, sync=sync)
    clear_retire(directory)


def commit_lock(directory: str) -> int:
    return _fs.lock(os.path.join(directory, LOCK_NAME))


def list_numbered(directory: str, checkpoint_name: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``<name>-<n>`` present (those with a manifest), by number."""
    found = []
    pattern = re.compile(re.escape(checkpoint_name) + r"-([0-9]{1,18})\Z")
    for entry in _fs.listdir(directory):
        match = pattern.match(entry)
        if match and _fs.exists(os.path.join(directory, entry, MANIFEST_NAME)):
            found.append((int(match[1]), os.path.join(directory, entry)))
    return sorted(found)
