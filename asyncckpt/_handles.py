"""Handles of background saves, and the sequencer that commits them in start order."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import anyio

from ._options import CheckpointOptions, SaveMetrics

if TYPE_CHECKING:
    from ._writer import Snapshot

__all__ = ["SaveHandle", "Sequencer"]


class SaveHandle:
    """A save that was started in the background (``CheckpointManager.start_save``).

    ``path`` is known at once; ``metrics`` once it finished successfully.
    """

    def __init__(self, path: str, snapshot: Snapshot, options: CheckpointOptions,
                 ticket: int) -> None:
        self.path = path
        self.metrics: SaveMetrics | None = None
        self._snapshot: Snapshot | None = snapshot
        self._options = options
        self._ticket = ticket
        self._finished = anyio.Event()
        self._durable = anyio.Event()   # committed (or failed); retired files may remain
        self._error: BaseException | None = None
        self._reported = False

    def __repr__(self) -> str:
        state = "failed" if self._error else "committed" if self.done() else "writing"
        return f"<SaveHandle {self.path} {state}>"

    def done(self) -> bool:
        """True once the save committed or failed. Never blocks."""
        return self._durable.is_set()

    async def wait(self) -> str:
        """Wait until the save is durable and committed, with retention applied (checkpoints
        it retires are gone under their names; their files are deleted in the background,
        before the next commit); return its path.

        Raises the save's error (a ``SaveError`` keeping its cause). An error deleting the
        retired files after this returned is raised by the manager's next save, wait or close.

        Cancellation: only this wait stops; the save goes on in the background.
        """
        await self._durable.wait()
        if self._error is not None or self._finished.is_set():
            self._reported = True
        if self._error is not None:
            raise self._error
        return self.path

    def _set_error(self, error: BaseException) -> None:
        self._error = error


class Sequencer:
    """Tickets in start order; ``turn(t)`` waits until every earlier ticket is done."""

    def __init__(self) -> None:
        self._issued = 0
        self._next = 0            # smallest ticket not yet done
        self._done: set[int] = set()
        self._waiters: list[anyio.Event] = []

    def ticket(self) -> int:
        self._issued += 1
        return self._issued - 1

    @asynccontextmanager
    async def turn(self, ticket: int) -> AsyncIterator[None]:
        while self._next < ticket:
            event = anyio.Event()
            self._waiters.append(event)
            await event.wait()
        yield

    def done(self, ticket: int) -> None:
        self._done.add(ticket)
        while self._next in self._done:
            self._done.remove(self._next)
            self._next += 1
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()
