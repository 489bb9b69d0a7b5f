"""The synchronous face: the async manager driven from one background event-loop thread.

For plain synchronous training loops (most PyTorch code). Every method is a blocking call
into an anyio blocking portal that runs the entered ``CheckpointManager``; nothing is copied
from the async implementation.

At interpreter exit, an open manager is closed from an ``atexit`` hook: in-flight saves are
*finished* (their snapshots were already taken, so only I/O remains) and committed, never
left half-written; their errors are logged there because nobody is left to raise them to.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Any, Callable

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._checkpoint import Checkpoint
from ._handles import SaveHandle
from ._manager import CheckpointManager
from ._options import CheckpointOptions, SaveMetrics

__all__ = ["SyncCheckpointManager", "SyncSaveHandle"]

log = logging.getLogger("asyncckpt")
_open: weakref.WeakSet[SyncCheckpointManager] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for manager in list(_open):
        try:
            manager.close()
        except Exception:  # nobody is left to raise to at interpreter exit
            log.exception("asyncckpt: a background save failed while closing at exit")


# Run before thread pools refuse new work at shutdown (concurrent.futures registers its own
# hook the same way); plain atexit runs too late for that.
getattr(threading, "_register_atexit", atexit.register)(_close_all_at_exit)


class SyncSaveHandle:
    """Blocking twin of :class:`SaveHandle`."""

    def __init__(self, handle: SaveHandle, portal: BlockingPortal) -> None:
        self._handle = handle
        self._portal = portal

    @property
    def path(self) -> str:
        return self._handle.path

    @property
    def metrics(self) -> SaveMetrics | None:
        return self._handle.metrics

    def done(self) -> bool:
        """True once the save committed or failed. Never blocks."""
        return self._handle.done()

    def wait(self) -> str:
        """Block until committed; return the path or raise the save's error."""
        return self._portal.call(self._handle.wait)

    def __repr__(self) -> str:
        return repr(self._handle)


class SyncCheckpointManager:
    """``CheckpointManager`` for synchronous code; same constructor arguments.

    Use as ``with SyncCheckpointManager(...) as manager:`` or call ``close()``.
    """

    def __init__(self, checkpoint: Checkpoint, directory: str | os.PathLike[str],
                 max_to_keep: int | None, keep_checkpoint_every_n_hours: float | None = None,
                 checkpoint_name: str = "ckpt", step_counter: Any = None,
                 checkpoint_interval: int | None = None, init_fn: Callable[[], Any] | None = None,
                 last_checkpoint_step: int | None = None,
                 options: CheckpointOptions | None = None) -> None:
        self._manager = CheckpointManager(
            checkpoint, directory, max_to_keep, keep_checkpoint_every_n_hours, checkpoint_name,
            step_counter, checkpoint_interval, init_fn, last_checkpoint_step, options)
        self._portal_cm = start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        self._entered = self._portal.wrap_async_context_manager(self._manager)
        try:
            self._entered.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False
        _open.add(self)

    def __enter__(self) -> SyncCheckpointManager:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait for in-flight saves, stop the background thread, raise an unseen error."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        try:
            self._entered.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("this SyncCheckpointManager is closed")
        return self._portal.call(fn, *args)

    def start_save(self, checkpoint_number: Any = None, check_interval: bool = True,
                   options: CheckpointOptions | None = None) -> SyncSaveHandle | None:
        """Snapshot now (blocks for that only); write and commit in the background."""
        handle = self._call(self._manager.start_save, checkpoint_number, check_interval, options)
        return None if handle is None else SyncSaveHandle(handle, self._portal)

    def save(self, checkpoint_number: Any = None, check_interval: bool = True,
             options: CheckpointOptions | None = None) -> str | None:
        """Save and block until committed; the path, or None if the interval skipped it."""
        return self._call(self._manager.save, checkpoint_number, check_interval, options)

    def wait_until_finished(self) -> None:
        self._call(self._manager.wait_until_finished)

    def restore_or_initialize(self) -> str | None:
        return self._call(self._manager.restore_or_initialize)

    @property
    def latest_checkpoint(self) -> str | None:
        return self._manager.latest_checkpoint

    @property
    def checkpoints(self) -> list[str]:
        return self._manager.checkpoints

    @property
    def directory(self) -> str:
        return self._manager.directory

    @property
    def checkpoint(self) -> Checkpoint:
        return self._manager.checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        return self._manager.checkpoint_interval
