"""The exception hierarchy.

Misuse (a wrong type or value passed by the caller) stays ``TypeError`` / ``ValueError``.
Everything that goes wrong outside the caller's control derives from :class:`CheckpointError`
and keeps its cause (``raise ... from exc``).
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "CheckpointError",
    "SaveError",
    "RestoreError",
    "CorruptCheckpointError",
    "ConcurrentWriterError",
    "MismatchError",
    "IncompleteRestoreError",
    "first_error",
    "explain",
]


class CheckpointError(Exception):
    """Base class of every error asyncckpt raises for something other than misuse."""


class SaveError(CheckpointError):
    """A save or write failed; the previously committed checkpoint is untouched."""


class RestoreError(CheckpointError):
    """A restore or load failed for a reason other than damaged files (e.g. a mismatch)."""


class CorruptCheckpointError(RestoreError):
    """A checkpoint or state file is damaged, truncated, malformed or of an unknown version."""


class ConcurrentWriterError(SaveError):
    """Another manager committed into the same directory since this one last looked."""


class MismatchError(RestoreError, ValueError):
    """A checkpoint value does not fit its target (shape, dtype or structure).

    Raised before anything is modified. It is also a ``ValueError``.
    """


class IncompleteRestoreError(RestoreError, AssertionError):
    """``assert_consumed()`` found saved values without a target or targets without a value.

    It is also an ``AssertionError``, as TensorFlow raises.
    """


def first_error(exc: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group from a task group, else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def explain(exc: BaseException) -> str:
    """A cause for an error message: strerror, file and errno for OS errors, else repr."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where} [errno {exc.errno}]"
    return repr(exc)
