"""The filesystem seam: the only module that opens, writes, syncs, renames or removes files.

Every other module goes through these functions (looked up on this module at call time), so
tests can wrap them to inject faults and crashes by event ("the 3rd fsync fails with EIO").
Blocking functions are plain; the few ``async`` ones use aiofiles for small whole-file I/O.
Bulk shard I/O is done by plain functions called from worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
import sys

import aiofiles
import anyio

__all__ = [
    "open_new", "open_read", "write_all", "create_file", "start_writeback", "fsync", "close", "fsync_dir",
    "mkdir", "rename", "exchange", "replace", "remove_tree", "unlink", "listdir",
    "exists", "is_dir", "pread_into", "pread", "file_size", "read_small", "write_small",
    "atomic_write", "read_small_sync", "lock", "unlock", "mtime",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYNC_FILE_RANGE_WRITE = 2


def open_new(path: str) -> int:
    """Create a new file for writing (fails if it exists); returns the fd."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def open_read(path: str) -> int:
    """Open an existing regular file for reading without following a final symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write all of ``data`` at the fd's position."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def create_file(path: str, data: bytes, *, sync: bool) -> None:
    """Create ``path`` (must not exist) holding ``data``, fsynced when ``sync``."""
    fd = open_new(path)
    try:
        write_all(fd, data)
        if sync:
            fsync(fd)
    finally:
        close(fd)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range back now (Linux ``sync_file_range``).

    Only a hint that makes the final fsync shorter; it never replaces the fsync.
    """
    if sys.platform.startswith("linux"):
        _libc.sync_file_range(ctypes.c_int(fd), ctypes.c_int64(offset),
                              ctypes.c_int64(nbytes), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


def fsync(fd: int) -> None:
    os.fsync(fd)


def close(fd: int) -> None:
    os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory, making the entries created or renamed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir(path: str) -> None:
    os.mkdir(path)


def rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the OS or filesystem does not support it.
    """
    if not sys.platform.startswith("linux") or not hasattr(_libc, "renameat2"):
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                         ctypes.c_uint(_RENAME_EXCHANGE))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def replace(src: str, dst: str) -> None:
    os.replace(src, dst)


def remove_tree(path: str) -> None:
    """Remove a directory tree (a missing path is fine)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def unlink(path: str) -> None:
    os.unlink(path)


def listdir(path: str) -> list[str]:
    return os.listdir(path)


def exists(path: str) -> bool:
    return os.path.lexists(path)


def is_dir(path: str) -> bool:
    """True for a real directory (a symlink to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``; a short file raises EIO-style ``EOFError``."""
    view = memoryview(buf).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise EOFError(f"unexpected end of file at offset {offset}")
        view = view[n:]
        offset += n


def pread(fd: int, nbytes: int, offset: int) -> bytearray:
    out = bytearray(nbytes)
    pread_into(fd, memoryview(out), offset)
    return out


async def read_small(path: str, limit: int) -> bytes:
    """Read a whole small file (manifest, state file); more than ``limit`` bytes is an error.

    Cancellation: the read is abandoned (nothing is changed on disk).
    """
    fd = await anyio.to_thread.run_sync(open_read, path)
    async with aiofiles.open(fd, "rb", closefd=True) as f:
        data = await f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


async def write_small(path: str, data: bytes, *, sync: bool = True) -> None:
    """Create ``path`` (must not exist) with ``data`` and fsync it.

    Cancellation: shielded, so the file is either fully written and closed or the error is
    raised; the caller removes its temporary directory on failure.
    """
    with anyio.CancelScope(shield=True):
        async with aiofiles.open(path, "xb") as f:
            await f.write(data)
            await f.flush()
            if sync:
                await anyio.to_thread.run_sync(fsync, f.fileno())


async def atomic_write(path: str, data: bytes, *, tmp_suffix: str, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically: temporary file, fsync, rename, dir fsync.

    Cancellation: shielded; the file is either replaced or the error is raised (the temporary
    file is then removed).
    """
    tmp = path + tmp_suffix
    with anyio.CancelScope(shield=True):
        try:
            await write_small(tmp, data, sync=sync)
            await anyio.to_thread.run_sync(replace, tmp, path)
        except BaseException:
            try:
                await anyio.to_thread.run_sync(unlink, tmp)
            except OSError:
                pass
            raise
        if sync:
            await anyio.to_thread.run_sync(fsync_dir, os.path.dirname(path) or ".")


def read_small_sync(path: str, limit: int) -> bytes:
    """Blocking twin of :func:`read_small`, for the few places that must read synchronously
    (a manager's constructor)."""
    fd = open_read(path)
    chunks, total = [], 0
    try:
        while total <= limit:
            data = os.read(fd, limit + 1 - total)
            if not data:
                break
            chunks.append(data)
            total += len(data)
    finally:
        os.close(fd)
    out = b"".join(chunks)
    if len(out) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return out


def lock(path: str) -> int:
    """Open (creating) ``path`` and take an exclusive ``flock`` on it; blocks until held."""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlock(fd: int) -> None:
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def mtime(path: str) -> float:
    return os.lstat(path).st_mtime
