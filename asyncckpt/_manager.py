"""``CheckpointManager``: TensorFlow's manager semantics with a durable, atomic commit.

One save goes: interval check -> snapshot (the only blocking part) -> background write of
the checkpoint directory -> commit, in the order saves were started:

    lock -> check no other manager committed -> publish the directory -> decide retention ->
    write the retire list -> replace the state file -> record ownership -> unlock ->
    retire (rename to a marked name, fsync, delete) -> clear the retire list

so a crash at any instant leaves a state file naming only complete checkpoints, and the last
good checkpoint is never deleted before the new one is durable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from typing import Any, Callable

import anyio

from . import _commit, _directory, _fs, _retention, _writer
from ._checkpoint import Checkpoint, _options
from ._errors import ConcurrentWriterError, SaveError, explain, first_error
from ._handles import SaveHandle, Sequencer
from ._options import CheckpointOptions

__all__ = ["CheckpointManager", "latest_checkpoint", "record_plain_save"]

log = logging.getLogger("asyncckpt")


def _evaluate(value: Any, what: str) -> int:
    if callable(value) and not hasattr(value, "__index__"):
        value = value()
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be readable by int() (an int, a 0-d array, a tensor, "
                        f"or a zero-argument callable), got {value!r}") from exc


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint named by ``<checkpoint_dir>/checkpoint``, like
    ``tf.train.latest_checkpoint``; None if there is none (or it is gone)."""
    directory = os.fspath(checkpoint_dir)
    state = _directory.read_state_sync(directory)
    if state is None or not state.model_checkpoint_path:
        return None
    path = _directory.resolve(directory, state.model_checkpoint_path)
    _recover(path)
    return path if _fs.is_dir(path) else None


def _recover(path: str) -> None:
    """Finish a replacement a crash interrupted (the fallback without RENAME_EXCHANGE leaves
    the complete old checkpoint under an ``-old-`` name for an instant): put it back."""
    try:
        _commit.recover_replaced(path)
    except OSError as exc:
        log.warning("asyncckpt: could not put back the checkpoint replaced at %s (%s)", path, exc)


async def record_plain_save(path: str, *, sync: bool) -> None:
    """Record ``path`` in ``<dirname>/checkpoint`` as ``tf.train.Checkpoint.save`` does:
    that one path, no timestamps."""
    directory = os.path.dirname(path) or "."
    state = _directory.state_for_paths(directory, path, [path], [], 0.0)
    await _directory.write_state(directory, state, sync=sync)


def _view_of(managed: _retention.Managed) -> dict[str, Any]:
    """What the committing rank tells the others about the managed checkpoints (JSON)."""
    return {"paths": list(managed.paths), "timestamps": list(managed.timestamps),
            "last_preserved": managed.last_preserved_timestamp, "latest": managed.latest}


def _managed_from(view: dict[str, Any]) -> _retention.Managed:
    return _retention.Managed(tuple(view["paths"]), tuple(view["timestamps"]),
                              view["last_preserved"], view["latest"])


class CheckpointManager:
    """Keeps a directory of numbered checkpoints, as ``tf.train.CheckpointManager`` does.

    ``save`` and ``restore_or_initialize`` work without entering the manager; ``start_save``
    (background saves) needs ``async with manager:``, which owns the background work.
    """

    def __init__(self, checkpoint: Checkpoint, directory: str | os.PathLike[str],
                 max_to_keep: int | None, keep_checkpoint_every_n_hours: float | None = None,
                 checkpoint_name: str = "ckpt", step_counter: Any = None,
                 checkpoint_interval: int | None = None, init_fn: Callable[[], Any] | None = None,
                 last_checkpoint_step: int | None = None,
                 options: CheckpointOptions | None = None) -> None:
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"checkpoint must be an asyncckpt.Checkpoint, got "
                            f"{type(checkpoint).__qualname__}")
        if max_to_keep is not None and max_to_keep <= 0:
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        if checkpoint_interval is not None and step_counter is None:
            raise ValueError("checkpoint_interval needs a step_counter to count steps with")
        if not checkpoint_name or "/" in checkpoint_name:
            raise ValueError(f"checkpoint_name must be a plain name, got {checkpoint_name!r}")
        self._checkpoint = checkpoint
        self._directory = os.fspath(directory)
        self._max_to_keep = max_to_keep
        self._keep_hours = keep_checkpoint_every_n_hours
        self._name = checkpoint_name
        self._prefix = os.path.join(self._directory, checkpoint_name)
        self._step_counter = step_counter
        self._interval = checkpoint_interval
        self._init_fn = init_fn
        self._last_step = last_checkpoint_step
        self._options = _options(options)
        self._id = secrets.token_hex(16)
        self._commits = 0
        self._cleaned = False
        self._sequencer = Sequencer()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._handles: list[SaveHandle] = []
        # With an I/O rank, only it reads the directory; the others get its view (collective).
        coord = checkpoint._coordinator(self._options)
        reads = coord is None or coord.touches_files
        self._owner_seen = _directory.read_owner(self._directory) if reads else None
        state = _directory.read_state_sync(self._directory) if reads else None
        self._managed, went_back = _retention.recover(
            state, now=time.time(), resolve=lambda p: _directory.resolve(self._directory, p))
        if went_back:
            log.warning("time.time() is behind the last preserved checkpoint timestamp of %s; "
                        "keep_checkpoint_every_n_hours now counts from now", self._directory)
        if coord is not None and coord.io_rank is not None:
            key = coord.next_view_key()
            view = coord.exchange_sync(key, _view_of(self._managed) if reads else None)
            coord.forget_later([key])
            self._managed = _managed_from(view)

    # -- properties (committed state only) -------------------------------------------------
    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint(self) -> Checkpoint:
        return self._checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        return self._interval

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint this manager knows (None if none)."""
        return self._managed.latest

    @property
    def checkpoints(self) -> list[str]:
        """Managed committed checkpoints, oldest first."""
        return list(self._managed.paths)

    # -- lifetime ---------------------------------------------------------------------------
    async def __aenter__(self) -> CheckpointManager:
        if self._task_group is not None:
            raise RuntimeError("this CheckpointManager is already entered")
        await self._clean_once()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        """Wait for every started save; raise the first error nobody has seen yet.

        Cancellation: the in-flight saves still complete (they are shielded), then the
        cancellation propagates.
        """
        group, self._task_group = self._task_group, None
        assert group is not None
        await group.__aexit__(*exc_info)  # the saves themselves are shielded: they complete
        if exc_info[0] is None:
            self._raise_unreported()

    async def wait_until_finished(self) -> None:
        """Wait until every started save has committed; raise the first unseen error.

        Cancellation: only this wait stops; the saves go on.
        """
        for handle in list(self._handles):
            await handle._finished.wait()
        self._raise_unreported()

    def _raise_unreported(self) -> None:
        pending = [h for h in self._handles if h._finished.is_set()]
        self._handles = [h for h in self._handles if not h._finished.is_set()]
        for handle in pending:
            if handle._error is not None and not handle._reported:
                handle._reported = True
                raise handle._error

    async def _clean_once(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        coord = self._checkpoint._coordinator(self._options)
        if coord is not None and coord.rank != coord.committer:
            return  # with several processes only the committing rank changes the directory
        state = await _directory.read_state(self._directory)
        await anyio.to_thread.run_sync(
            lambda: _directory.clean_residue(self._directory, state, sync=self._options.fsync))

    # -- saving -----------------------------------------------------------------------------
    def _skip(self, check_interval: bool) -> bool:
        if self._interval is None:
            return False
        step = _evaluate(self._step_counter, "step_counter")
        if self._last_step is not None:
            if step == self._last_step:
                return True
            if check_interval and step < self._last_step + self._interval:
                return True
        self._last_step = step
        return False

    async def start_save(self, checkpoint_number: Any = None, check_interval: bool = True,
                         options: CheckpointOptions | None = None) -> SaveHandle | None:
        """Snapshot now, write and commit in the background; None if the interval skips it.

        Returns once the snapshot is taken: the caller may then change its arrays.
        Raises an earlier background save's error that nobody has seen yet.

        Cancellation: during the snapshot, the save is abandoned without a trace; once this
        returned, the save belongs to the manager and completes or fails cleanly.
        """
        if self._task_group is None:
            raise RuntimeError("start_save() needs the manager entered: use `async with "
                               "CheckpointManager(...) as manager:` (or call save())")
        self._raise_unreported()
        handle = await self._begin(checkpoint_number, check_interval, options)
        if handle is not None:
            self._handles.append(handle)
            self._task_group.start_soon(self._finish, handle)
        return handle

    async def save(self, checkpoint_number: Any = None, check_interval: bool = True,
                   options: CheckpointOptions | None = None) -> str | None:
        """Save and return the committed path (None if the interval skipped it).

        Durable and committed, with retention applied, when it returns.

        Cancellation: during the snapshot, the save is abandoned without a trace. After it,
        on an entered manager only the wait stops and the save completes in the background
        (its error, if any, surfaces later); on a manager that was not entered the save still
        completes (shielded) and the cancellation is delivered when it has.
        """
        if self._task_group is not None:
            handle = await self.start_save(checkpoint_number, check_interval, options)
            if handle is None:
                return None
            await handle._finished.wait()  # as TensorFlow: retired files gone on return
            return await handle.wait()
        handle = await self._begin(checkpoint_number, check_interval, options)
        if handle is None:
            return None
        handle._reported = True
        await self._finish(handle)
        return await handle.wait()

    async def _begin(self, checkpoint_number: Any, check_interval: bool,
                     options: CheckpointOptions | None) -> SaveHandle | None:
        options = _options(options) if options is not None else self._options
        if self._skip(check_interval):
            return None
        await self._clean_once()
        ckpt = self._checkpoint
        counter = ckpt.save_counter + 1
        number = counter if checkpoint_number is None else _evaluate(checkpoint_number,
                                                                     "checkpoint_number")
        path = f"{self._prefix}-{number}"
        snap = await ckpt._snapshot(counter, options)
        object.__setattr__(ckpt, "_save_counter", counter)
        return SaveHandle(path, snap, options, self._sequencer.ticket())

    async def _finish(self, handle: SaveHandle) -> None:
        """Write, then commit in start order. Shielded: once the snapshot is taken the save
        completes or fails cleanly. Errors go to the handle, never lost."""
        staged = None
        with anyio.CancelScope(shield=True):
            try:
                assert handle._snapshot is not None
                started = handle._snapshot.started
                coord = self._checkpoint._coordinator(handle._options)
                if coord is not None:
                    await self._finish_collective(coord, handle)
                    return
                metrics, staged = await self._checkpoint._write_snapshot(
                    handle._snapshot, handle.path, handle._options, publish=False)
                async with self._sequencer.turn(handle._ticket):
                    marked = await anyio.to_thread.run_sync(self._commit, staged, handle.path,
                                                            handle._options)
                staged = None
                handle.metrics = dataclasses.replace(
                    metrics, total_seconds=_writer.seconds_since(started))
                handle._durable.set()
                await self._remove(handle, marked)
            except Exception as exc:
                cause = first_error(exc)
                handle._set_error(cause if isinstance(cause, SaveError) else SaveError(
                    f"committing {handle.path} failed: {explain(cause)}; nothing was "
                    f"committed and {self.latest_checkpoint} is still the latest checkpoint"))
                handle._error.__cause__ = handle._error.__cause__ or cause  # type: ignore
                if staged is not None:
                    await anyio.to_thread.run_sync(_commit.discard, staged)
            finally:
                if handle._snapshot is not None:
                    self._checkpoint._drop_turn(handle._snapshot)
                    handle._snapshot.release()
                    handle._snapshot = None
                self._sequencer.done(handle._ticket)
                handle._durable.set()
                handle._finished.set()

    async def _finish_collective(self, coord: Any, handle: SaveHandle) -> None:
        """Several processes: one collective save at a time (every rank must meet the others
        in the same order); rank 0 commits and sends every rank its new view."""
        snap = handle._snapshot
        assert snap is not None

        marked: list[str] = []

        async def commit(staged: str) -> dict[str, Any]:
            marked.extend(await anyio.to_thread.run_sync(self._commit, staged, handle.path,
                                                         handle._options))
            return _view_of(self._managed)

        async with self._sequencer.turn(handle._ticket):
            metrics, view = await self._checkpoint._write_collective(
                coord, snap, handle.path, handle._options, commit)
        handle._snapshot = None
        if coord.rank != coord.committer:
            self._managed = _managed_from(view)
        handle.metrics = metrics
        handle._durable.set()
        await self._remove(handle, marked)

    async def _remove(self, handle: SaveHandle, marked: list[str]) -> None:
        """Delete the checkpoints a commit retired (already renamed away), after the save
        is acknowledged: not part of its time to durable. A failure is the save's (late)
        error; the next manager on the directory finishes the deletion."""
        try:
            await anyio.to_thread.run_sync(_directory.remove, marked)
        except OSError as exc:
            raise SaveError(
                f"{handle.path} was committed and is the latest checkpoint, but deleting the "
                f"checkpoints it retired failed: {explain(exc)}; the next CheckpointManager "
                f"on {self._directory} finishes it") from exc

    def _commit(self, staged: str, path: str, options: CheckpointOptions) -> list[str]:
        """The commit (a worker thread, one at a time, in save order). Returns the retired
        checkpoints' new (marked) names: their files are removed by :meth:`_remove`, after
        the save is acknowledged and before the next commit.

        The retire list names the new checkpoint and the retired ones *before* anything
        moves: after a crash, whichever of them the state file does not name is removed by
        the next manager, so disk use stays bounded by the policy.
        """
        sync = options.fsync
        fd = _directory.commit_lock(self._directory)
        try:
            owner = _directory.read_owner(self._directory)
            if owner is not None and owner != self._owner_seen:
                raise ConcurrentWriterError(
                    f"another CheckpointManager committed into {self._directory} since this "
                    f"one last did (owner {owner[0][:8]}, commit {owner[1]}); this save of "
                    f"{path} is not committed. Use one manager per directory.")
            managed = _retention.record_save(self._managed, path, now=time.time())
            swept = _retention.sweep(managed, max_to_keep=self._max_to_keep,
                                     keep_every_n_hours=self._keep_hours)
            doomed = list(swept.delete)
            _directory.write_retire(self._directory,
                                    [os.path.basename(p) for p in [path, *doomed]], sync=sync)
            replaced = _fs.exists(path)
            _commit.publish_sync(staged, path, sync)
            try:
                state = _retention.to_state(
                    swept.managed, lambda p: _directory.relative(self._directory, p))
                _directory.write_state_sync(self._directory, state, sync=sync)
            except BaseException:
                if not replaced:  # roll back: the state file still names the old set
                    _directory.retire(self._directory, [path], sync=sync)
                raise
            self._managed = swept.managed
            self._commits += 1
            self._owner_seen = (self._id, self._commits)
            _directory.write_owner(self._directory, self._owner_seen, sync=sync)
        finally:
            _fs.unlock(fd)
        try:
            marked = _directory.mark_deleted(self._directory, doomed, sync=sync)
            _directory.clear_retire(self._directory)
            return marked
        except OSError as exc:
            raise SaveError(
                f"{path} was committed and is the latest checkpoint, but retiring "
                f"{[os.path.basename(p) for p in doomed]} failed: {exc.strerror or exc} "
                f"[errno {exc.errno}]; the next CheckpointManager on {self._directory} "
                f"finishes it") from exc

    # -- restoring --------------------------------------------------------------------------
    async def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint, or call ``init_fn`` when there is none.

        Returns the restored path, or None after initializing.

        Cancellation: as ``Checkpoint.restore``.
        """
        latest = self._managed.latest
        if latest is not None:
            coord = self._checkpoint._coordinator(self._options)
            if coord is None or coord.touches_files:
                await anyio.to_thread.run_sync(_recover, latest)
            await self._checkpoint.restore(latest, self._options)
            if self._interval is not None:
                self._last_step = _evaluate(self._step_counter, "step_counter")
            return latest
        if self._init_fn is not None:
            self._init_fn()
        return None

    @staticmethod
    async def rebuild_state(directory: str | os.PathLike[str],
                            checkpoint_name: str = "ckpt") -> str | None:
        """Recover from a damaged state file: write a new one naming every complete
        ``<checkpoint_name>-<n>`` directory present, by number (timestamps from their
        modification times). Returns the latest path, or None if there is none.

        Cancellation: the state file is either replaced or left as it was.
        """
        path = os.fspath(directory)
        found = await anyio.to_thread.run_sync(_directory.list_numbered, path, checkpoint_name)
        if not found:
            return None
        paths = [p for _, p in found]
        stamps = [await anyio.to_thread.run_sync(_fs.mtime, p) for p in paths]
        state = _directory.state_for_paths(path, paths[-1], paths, stamps,
                                           min(stamps) - 1 if stamps else 0.0)
        await _directory.write_state(path, state, sync=True)
        return paths[-1]


