"""The commit protocol for one checkpoint directory (docs/format.md, "Publication").

Read top to bottom: shards fsynced (by the writer) -> manifest written and fsynced -> temporary
directory fsynced -> renamed (or atomically exchanged) to its final name -> parent fsynced ->
the replaced old checkpoint removed. A crash at any instant leaves the old or the new
checkpoint under the final name, plus at most a directory whose name marks it temporary.
"""

from __future__ import annotations

import logging
import os
import secrets

import anyio

from . import _fs
from ._format import MANIFEST_NAME, OLD_MARK, TMP_MARK

log = logging.getLogger("asyncckpt")

__all__ = ["discard", "temp_dir_for", "seal", "seal_sync", "publish", "publish_sync", "recover_replaced"]


def temp_dir_for(final: str) -> str:
    return f"{final}{TMP_MARK}{secrets.token_hex(4)}"


def discard(path: str) -> OSError | None:
    """Remove a temporary or replaced directory, best effort: the caller already has the
    outcome that matters (published, or the original error). A failure is returned (and
    logged); the residue's name marks it, and the next manager removes it."""
    try:
        _fs.remove_tree(path)
    except OSError as exc:
        log.warning("asyncckpt: could not remove %s (%s); a CheckpointManager opening this "
                    "directory will remove it", path, exc)
        return exc
    return None


def seal_sync(tmp: str, manifest: bytes, sync: bool) -> None:
    """Write and fsync the manifest, then fsync the temporary directory itself."""
    _fs.create_file(os.path.join(tmp, MANIFEST_NAME), manifest, sync=sync)
    if sync:
        _fs.fsync_dir(tmp)


def publish_sync(tmp: str, final: str, sync: bool) -> None:
    """Make the sealed ``tmp`` appear as ``final`` (replacing one there), durably."""
    parent = os.path.dirname(final) or "."
    if not _fs.exists(final):
        _fs.rename(tmp, final)
        if sync:
            _fs.fsync_dir(parent)
        return
    if _fs.exchange(tmp, final):
        if sync:
            _fs.fsync_dir(parent)
        discard(tmp)  # now holds the replaced checkpoint
        return
    old = f"{final}{OLD_MARK}{secrets.token_hex(4)}"
    _fs.rename(final, old)
    _fs.rename(tmp, final)
    if sync:
        _fs.fsync_dir(parent)
    discard(old)


async def seal(tmp: str, manifest: bytes, *, sync: bool) -> None:
    """Async :func:`seal_sync`. Cancellation: shielded (runs to its end or its error)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(seal_sync, tmp, manifest, sync)


async def publish(tmp: str, final: str, *, sync: bool) -> None:
    """Async :func:`publish_sync`. Cancellation: shielded (runs to its end or its error)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(publish_sync, tmp, final, sync)


def recover_replaced(final: str) -> None:
    """If a crash hit between the two renames of the fallback path, put the old one back."""
    if _fs.exists(final):
        return
    parent, name = os.path.split(final)
    for entry in sorted(_fs.listdir(parent or ".")):
        if entry.startswith(name + OLD_MARK):
            _fs.rename(os.path.join(parent, entry), final)
            return
