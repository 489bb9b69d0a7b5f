"""``Checkpoint``: the tracked values, their staging pool, and save / write / restore / load."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import anyio

from . import _collective, _commit, _dist, _reader, _transport, _tree, _writer
from ._codec import DiskModel
from ._errors import IncompleteRestoreError, RestoreError
from ._options import CheckpointOptions, SaveMetrics
from ._restore import check_pieces, plan_restore
from ._handles import Sequencer
from ._staging import StagingPool
from ._workers import WorkerThreads

__all__ = ["Checkpoint", "LoadStatus", "load"]

_DEFAULT = CheckpointOptions()


class LoadStatus:
    """What a restore matched, as ``tf.train.Checkpoint.restore`` reports it."""

    def __init__(self, missing: list[str], unexpected: list[str], *, path: str | None) -> None:
        self.missing_keys: tuple[str, ...] = tuple(missing)
        self.unexpected_keys: tuple[str, ...] = tuple(unexpected)
        self.path = path

    def assert_consumed(self) -> LoadStatus:
        """Raise ``IncompleteRestoreError`` unless every saved value had a target and every
        target got a value."""
        if self.path is None:
            raise IncompleteRestoreError("no checkpoint was given (restore(None)); nothing was "
                                         "restored")
        if self.missing_keys or self.unexpected_keys:
            raise IncompleteRestoreError(
                f"restore from {self.path} was partial: targets without a saved value "
                f"{list(self.missing_keys)}, saved values without a target "
                f"{list(self.unexpected_keys)}; call expect_partial() if that is intended")
        return self

    def assert_existing_objects_matched(self) -> LoadStatus:
        """Raise unless every restore target got a value (extra saved values are fine)."""
        if self.path is not None and self.missing_keys:
            raise IncompleteRestoreError(
                f"restore from {self.path}: targets without a saved value "
                f"{list(self.missing_keys)}")
        return self

    def expect_partial(self) -> LoadStatus:
        """Declare that a partial restore is intended (nothing is reported about it)."""
        return self


class Checkpoint:
    """Groups the values to checkpoint; each keyword names one tracked value.

    ``ckpt.model`` reads a tracked value, ``ckpt.step = 5`` replaces (or adds) one.
    ``save_counter`` counts ``save`` calls; it is saved and restored with the checkpoint.
    The staging pool and worker threads belong to this object and are reused by every save,
    across event loops.
    """

    def __init__(self, *, replicated: list[str] | tuple[str, ...] | None = None,
                 process_group: Any = None, **values: Any) -> None:
        globs = list(replicated or ())
        object.__setattr__(self, "_replicated_globs", globs)
        object.__setattr__(self, "_is_replicated", _dist.compile_globs(globs))
        object.__setattr__(self, "_process_group", process_group)
        object.__setattr__(self, "_collective_saves", [None, 0, [], 0])
        object.__setattr__(self, "_channels", {})
        object.__setattr__(self, "_collective_order", Sequencer())
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_save_counter", 0)
        object.__setattr__(self, "_pool", StagingPool())
        object.__setattr__(self, "_disk", DiskModel())
        object.__setattr__(self, "_workers", {})
        object.__setattr__(self, "last_save_metrics", None)
        for name, value in values.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"Checkpoint has no tracked value {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in ("save_counter", "last_save_metrics"):
            raise AttributeError(f"{name!r} cannot be set on a Checkpoint (names starting with "
                                 f"'_' and save_counter are reserved)")
        self._values[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self._values[name]
        except KeyError:
            raise AttributeError(f"Checkpoint has no tracked value {name!r}") from None

    @property
    def save_counter(self) -> int:
        """Number of ``save`` calls (restored from a checkpoint by ``restore``)."""
        return self._save_counter

    @property
    def tracked(self) -> dict[str, Any]:
        """A copy of the name -> value mapping."""
        return dict(self._values)

    def _worker_threads(self, options: CheckpointOptions) -> WorkerThreads:
        key = options.low_priority_threads
        if key not in self._workers:
            self._workers[key] = WorkerThreads(low_priority=key)
        return self._workers[key]

    def _coordinator(self, options: CheckpointOptions) -> _dist.Coordinator | None:
        """The ranks this checkpoint spans (None in a single process)."""
        coord = _dist.Coordinator.current(self._process_group, options.coordination_timeout,
                                          self._collective_saves)
        if coord is not None and options.io_rank is not None:
            if options.io_rank >= coord.world:
                raise ValueError(f"experimental_io_device names rank {options.io_rank}, but the "
                                 f"world size is {coord.world}")
            coord.io_rank = options.io_rank
            timeout = options.coordination_timeout
            if timeout not in self._channels:  # collective: first use is on every rank alike
                self._channels[timeout] = _transport.Channel.create(self._process_group, timeout)
            coord.channel = self._channels[timeout]
        return coord

    async def _snapshot(self, save_counter: int, options: CheckpointOptions) -> _writer.Snapshot:
        coord = self._coordinator(options)
        stage = None
        if coord is not None:
            def stage(leaves: list[Any]) -> list[bool]:
                shared[:] = [leaf for leaf in leaves
                             if not leaf.sharded and self._is_replicated(leaf.path)]
                owners = _dist.assign_owners([(leaf.path, leaf.nbytes) for leaf in shared],
                                             coord.world)
                return [owners.get(leaf.path, coord.rank) == coord.rank for leaf in leaves]
        shared: list[Any] = []
        snap = await _writer.take_snapshot(self._values, save_counter, self._pool, options,
                                           stage)
        if shared and options.check_replicated:
            # Still the blocking part (the caller's arrays are unchanged until we return),
            # but the checksums run in a worker thread, not on the event loop.
            try:
                snap.digests = await anyio.to_thread.run_sync(_dist.digests, shared)
            except BaseException:
                snap.release()
                raise
        if coord is not None:  # drawn in call order: collective operations run in it
            snap.turn = self._collective_order.ticket()
        return snap

    def _drop_turn(self, snap: _writer.Snapshot) -> None:
        """A collective snapshot that will not be written gives up its turn."""
        if snap.turn is not None:
            self._collective_order.done(snap.turn)
            snap.turn = None

    async def _write_collective(self, coord: _dist.Coordinator, snap: _writer.Snapshot,
                                path: str, options: CheckpointOptions,
                                commit: _dist.Commit) -> tuple[SaveMetrics, Any]:
        """Write with every rank, commit on the committing rank (see ``_collective``), in
        this checkpoint's collective order. Shielded: one rank cannot abandon a collective
        save halfway."""
        assert snap.turn is not None
        turn, snap.turn = snap.turn, None
        with anyio.CancelScope(shield=True):
            try:
                async with self._collective_order.turn(turn):
                    stored, extra = await _collective.write_collective(
                        coord, snap, path, options, self._worker_threads(options), self._disk,
                        self._is_replicated, self._replicated_globs, commit)
            finally:
                self._collective_order.done(turn)
        metrics = SaveMetrics(raw_bytes=snap.raw_bytes, stored_bytes=stored,
                              snapshot_seconds=snap.snapshot_seconds,
                              total_seconds=_writer.seconds_since(snap.started),
                              page_locked=snap.page_locked,
                              device_staged=snap.device_staged)
        object.__setattr__(self, "last_save_metrics", metrics)
        return metrics, extra

    async def _write_snapshot(self, snap: _writer.Snapshot, path: str,
                              options: CheckpointOptions, *, publish: bool = True
                              ) -> tuple[SaveMetrics, str]:
        metrics, where = await _writer.write_snapshot(
            snap, path, options, self._worker_threads(options), self._disk, publish=publish)
        object.__setattr__(self, "last_save_metrics", metrics)
        return metrics, where

    async def write(self, file_path: str | os.PathLike[str],
                    options: CheckpointOptions | None = None) -> str:
        """Write a checkpoint exactly at ``file_path`` (replacing one there); durable on return.

        Does not change ``save_counter`` nor any state file.

        Cancellation: during the snapshot, nothing happens; during the write, the write stops
        and its temporary directory is removed (the previous checkpoint at ``file_path``, if
        any, stays); once publication started it completes.
        """
        options = _options(options)
        path = os.fspath(file_path)
        snap = await self._snapshot(self._save_counter, options)
        await self._write_any(snap, path, options)
        return path

    async def _write_any(self, snap: _writer.Snapshot, path: str,
                         options: CheckpointOptions) -> None:
        coord = self._coordinator(options)
        if coord is None:
            await self._write_snapshot(snap, path, options)
            return

        async def publish(tmp: str) -> None:
            await _commit.publish(tmp, path, sync=options.fsync)
        await self._write_collective(coord, snap, path, options, publish)

    async def save(self, file_prefix: str | os.PathLike[str],
                   options: CheckpointOptions | None = None) -> str:
        """Save to ``<file_prefix>-<n>`` with ``n = save_counter + 1``; durable on return.

        ``save_counter`` is incremented once the checkpoint is published, and the checkpoint
        is recorded in ``<dirname(file_prefix)>/checkpoint`` as TensorFlow does.

        Cancellation: as for :meth:`write`; ``save_counter`` is then unchanged.
        """
        options = _options(options)
        number = self._save_counter + 1
        path = f"{os.fspath(file_prefix)}-{number}"
        snap = await self._snapshot(number, options)
        await self._write_any(snap, path, options)
        object.__setattr__(self, "_save_counter", number)
        from ._manager import record_plain_save  # the state file lives with the manager
        coord = self._coordinator(options)
        if coord is None or coord.rank == coord.committer:
            with anyio.CancelScope(shield=True):
                await record_plain_save(path, sync=options.fsync)
        return path

    async def restore(self, save_path: str | os.PathLike[str] | None,
                      options: CheckpointOptions | None = None) -> LoadStatus:
        """Restore tracked values in place from ``save_path`` (``None``: do nothing).

        Arrays are filled in place (same objects), immutable leaves are replaced in their
        containers, ``load_state_dict`` objects receive their dict, ``save_counter`` is set.
        Shape, dtype and structure mismatches raise ``MismatchError`` before anything changes.

        Cancellation: stops reading; arrays may hold a mix of old and restored data, and no
        immutable leaf or ``save_counter`` has changed.
        """
        options = _options(options)
        if save_path is None:
            return LoadStatus([], [], path=None)
        path = os.fspath(save_path)
        coord = self._coordinator(options)
        if coord is not None and coord.io_rank is not None:
            manifest, plan = await self._restore_through_io_rank(coord, path, options)
        else:
            manifest = _for_this_process(await _reader.read_manifest(path), coord)
            plan = plan_restore(manifest, self._values)
            await _reader.read_arrays(path, plan.specs, plan.destinations,
                                      threads=options.io_threads)
        for step in plan.after_read:
            step()
        for name, finish in plan.finishers.items():
            self._values[name] = finish()
        object.__setattr__(self, "_save_counter", manifest.save_counter)
        return LoadStatus(plan.missing, plan.unexpected, path=path)


    async def _restore_through_io_rank(self, coord: _dist.Coordinator, path: str,
                                       options: CheckpointOptions) -> tuple[Any, Any]:
        """Only the I/O rank reads files; it sends the others what they plan to restore.
        Runs in this checkpoint's collective order (never beside a background save)."""
        turn = self._collective_order.ticket()
        try:
            async with self._collective_order.turn(turn):
                return await self._restore_streamed(coord, path, options)
        finally:
            self._collective_order.done(turn)

    async def _restore_streamed(self, coord: _dist.Coordinator, path: str,
                                options: CheckpointOptions) -> tuple[Any, Any]:
        key, manifest = await _collective.shared_manifest(coord, path)
        manifest = _for_this_process(manifest, coord)
        try:
            plan = plan_restore(manifest, self._values)
        except BaseException:
            await _collective.read_arrays_collective(coord, key, path, manifest, None, [], [],
                                                     options.io_threads)
            raise
        await _collective.read_arrays_collective(coord, key, path, manifest, plan.requests(),
                                                 plan.specs, plan.destinations,
                                                 options.io_threads)
        return manifest, plan


def _for_this_process(manifest: Any, coord: _dist.Coordinator | None) -> Any:
    """A manifest written by several processes, as this process restores it: its own
    rank's values on the same world size, otherwise only the replicated values."""
    if manifest.ranks is None:
        return manifest
    same_world = coord is not None and coord.world == len(manifest.ranks)
    values = _dist.view(manifest, coord.rank if same_world else None)  # type: ignore[union-attr]
    return dataclasses.replace(manifest, values=values)


def _options(options: CheckpointOptions | None) -> CheckpointOptions:
    if options is None:
        return _DEFAULT
    if not isinstance(options, CheckpointOptions):
        raise TypeError(f"options must be a CheckpointOptions, got {type(options).__qualname__}")
    return options


async def load(path: str | os.PathLike[str],
               options: CheckpointOptions | None = None) -> dict[str, Any]:
    """Read a checkpoint into a fresh tree: ``{name: value, ..., "save_counter": n}``.

    Arrays come back as numpy arrays (bfloat16 and float8 as ml_dtypes arrays), scalars as
    their own types, containers with their key types; ``state_dict`` objects as their dicts.

    Cancellation: the read is abandoned; nothing was changed.
    """
    options = _options(options)
    directory = os.fspath(path)
    manifest = await _reader.read_manifest(directory)
    specs = list(manifest.arrays)
    try:
        arrays = [_empty(spec) for spec in specs]
    except MemoryError as exc:
        need = sum(spec.nbytes for spec in specs)
        raise RestoreError(f"loading {directory} needs {need} bytes of memory for its arrays, "
                           f"more than this process can allocate; restore into existing "
                           f"arrays with Checkpoint.restore, or free memory") from exc
    await _reader.read_arrays(directory, specs, arrays, threads=options.io_threads)
    pieces = _tree.dtensor_pieces(list(manifest.ranks or [manifest.values]))

    def whole(path: str, node: dict[str, Any]) -> Any:  # a sharded value, put together
        found = next(iter(pieces.get(path, {}).values()), [])  # the first mesh's
        parts = [(specs[i], offset, arrays[i]) for i, offset in found]
        shape = tuple(node["shape"])
        check_pieces(path, shape, [(spec, offset) for spec, offset, _ in parts])
        out = _empty_like(shape, parts[0][0] if parts else None)
        for spec, offset, data in parts:
            out[tuple(slice(o, o + n) for o, n in zip(offset, spec.shape))] = data
        return out

    def value(node: dict[str, Any], name: str) -> Any:
        return _tree.node_to_value(node, arrays.__getitem__, whole, name)
    if manifest.ranks is None:
        tree: dict[str, Any] = {name: value(node, name) for name, node in manifest.values.items()}
    else:  # several processes: shared values once, then each rank's own under "rank/<r>"
        tree = {name: value(node, name) for name, node in _dist.view(manifest, None).items()}
        for rank in range(len(manifest.ranks)):
            tree[f"rank/{rank}"] = {name: value(node, name)
                                    for name, node in _dist.local_view(manifest, rank).items()}
    tree["save_counter"] = manifest.save_counter
    return tree


def _empty_like(shape: tuple[int, ...], spec: Any) -> Any:
    import numpy as np
    return np.empty(shape, spec.dtype if spec is not None else np.float32)


def _empty(spec: Any) -> Any:
    import numpy as np
    return np.empty(spec.shape, spec.dtype)
