"""Command-line tools: ``verify``, ``ls`` and ``inspect``. Files are untrusted throughout.

Each tool returns text lines and an exit status, so the CLI stays a thin shell over them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _directory, _fs
from ._codec import ChunkDamaged, Decoder
from ._errors import CheckpointError
from ._format import DELETING_MARK, MANIFEST_NAME, OLD_MARK, TMP_MARK, Manifest
from ._reader import _Shards, read_arrays, read_manifest

__all__ = ["verify", "list_checkpoints", "inspect"]


def _is_checkpoint(path: str) -> bool:
    return _fs.is_dir(path) and _fs.exists(os.path.join(path, MANIFEST_NAME))


def _verify_chunks(path: str, manifest: Manifest) -> tuple[int, int]:
    """Read and decode every chunk (into scratch memory); returns (raw, stored) bytes."""
    specs = list(manifest.arrays)
    shards = _Shards(path, specs)
    decoder = Decoder()
    raw = stored = 0
    try:
        for spec in specs:
            for chunk in spec.chunks:
                data = memoryview(_fs.pread(shards.fds[chunk.file], chunk.stored_len,
                                            chunk.offset))
                out = np.empty(chunk.raw_len, dtype=np.uint8)
                try:
                    decoder.decode(data, chunk, spec.dtype.itemsize, out)
                except ChunkDamaged as exc:
                    raise CheckpointError(f"{spec.path}: chunk {chunk.file}:{chunk.offset} "
                                          f"is damaged ({exc})") from exc
                raw += chunk.raw_len
                stored += chunk.stored_len
    finally:
        shards.close()
    return raw, stored


async def _verify_one(path: str) -> tuple[bool, str]:
    try:
        manifest = await read_manifest(path)
        raw, stored = _verify_chunks(path, manifest)
    except (CheckpointError, OSError, EOFError) as exc:
        return False, f"DAMAGED {path}: {exc}"
    return True, (f"ok      {path}: {len(manifest.arrays)} arrays, {raw} bytes raw, "
                  f"{stored} stored")


async def verify(path: str) -> tuple[int, list[str]]:
    """Check a checkpoint, or a whole managed directory (state file + every checkpoint)."""
    lines: list[str] = []
    if _is_checkpoint(path):
        ok, line = await _verify_one(path)
        return (0 if ok else 1), [line]
    if not _fs.is_dir(path):
        return 2, [f"{path} is neither a checkpoint nor a directory"]
    bad = 0
    named: set[str] = set()
    try:
        state = _directory.read_state_sync(path)
    except CheckpointError as exc:
        state, bad = None, bad + 1
        lines.append(f"DAMAGED {os.path.join(path, 'checkpoint')}: {exc}")
    if state is not None:
        for rel in (state.model_checkpoint_path, *state.all_model_checkpoint_paths):
            full = os.path.normpath(_directory.resolve(path, rel))
            named.add(full)
            if not _is_checkpoint(full):
                bad += 1
                lines.append(f"MISSING {full}: named by the state file")
        lines.append(f"ok      {os.path.join(path, 'checkpoint')}: latest "
                     f"{state.model_checkpoint_path!r}, {len(state.all_model_checkpoint_paths)}"
                     f" managed")
    for entry in sorted(_fs.listdir(path)):
        full = os.path.join(path, entry)
        if any(mark in entry for mark in (TMP_MARK, DELETING_MARK, OLD_MARK)):
            lines.append(f"residue {full}: left by an interrupted save (a manager removes it)")
        elif _is_checkpoint(full):
            ok, line = await _verify_one(full)
            bad += not ok
            lines.append(line)
    return (1 if bad else 0), lines


@dataclass
class _Row:
    name: str
    step: str
    when: float
    stored: int
    raw: int


async def _step_of(path: str, manifest: Manifest) -> str:
    """The tracked ``step`` value if it is a number, else ``#<save_counter>``."""
    node = manifest.values.get("step")
    try:
        if node is not None and node.get("t") in ("int", "scalar"):
            from ._tree import decode_scalar
            return str(int(decode_scalar(node)))
        if node is not None and node.get("t") == "array":
            spec = manifest.arrays[node["index"]]
            if spec.shape == () and spec.dtype.kind in "iuf":
                value = np.empty((), spec.dtype)
                await read_arrays(path, [spec], [value], threads=1)
                return str(int(value))
    except (TypeError, ValueError, CheckpointError, OSError):
        pass
    return f"#{manifest.save_counter}"


async def list_checkpoints(directory: str) -> tuple[int, list[str]]:
    """One line per complete checkpoint: name, step, time, size, compression ratio."""
    if not _fs.is_dir(directory):
        return 2, [f"{directory} is not a directory"]
    rows: list[_Row] = []
    for entry in sorted(_fs.listdir(directory)):
        full = os.path.join(directory, entry)
        if not _is_checkpoint(full):
            continue
        try:
            manifest = await read_manifest(full)
        except CheckpointError as exc:
            rows.append(_Row(entry, f"DAMAGED: {exc}", _fs.mtime(full), 0, 0))
            continue
        raw = sum(c.raw_len for a in manifest.arrays for c in a.chunks)
        stored = sum(c.stored_len for a in manifest.arrays for c in a.chunks)
        rows.append(_Row(entry, await _step_of(full, manifest), _fs.mtime(full), stored, raw))
    latest = None
    try:
        state = _directory.read_state_sync(directory)
        latest = state.model_checkpoint_path if state else None
    except CheckpointError:
        pass
    lines = [f"{'name':<24} {'step':>10} {'time':<19} {'stored':>10} {'ratio':>6}"]
    for row in sorted(rows, key=lambda r: (r.when, _natural(r.name))):
        ratio = f"{row.stored / row.raw:.3f}" if row.raw else "-"
        mark = "  <- latest" if latest and os.path.normpath(latest) == row.name else ""
        lines.append(f"{row.name:<24} {row.step:>10} "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row.when))} "
                     f"{_size(row.stored):>10} {ratio:>6}{mark}")
    return 0, lines


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, -1)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _describe(node: dict[str, Any], manifest: Manifest, indent: str, lines: list[str]) -> None:
    kind = node["t"]
    if kind in ("dict", "list", "tuple", "state"):
        items = (node["value"]["items"] if kind == "state" else node["items"])
        if kind == "list" or kind == "tuple":
            items = list(enumerate(items))
        for key, child in items:
            label = repr(key) if not isinstance(key, str) else key
            if child["t"] in ("dict", "list", "tuple", "state"):
                lines.append(f"{indent}{label}: {child['t']}")
                _describe(child, manifest, indent + "  ", lines)
            else:
                lines.append(f"{indent}{label}: {_leaf(child, manifest)}")
    else:
        lines.append(f"{indent}{_leaf(node, manifest)}")


def _leaf(node: dict[str, Any], manifest: Manifest) -> str:
    if node["t"] == "array":
        spec = manifest.arrays[node["index"]]
        stored = sum(c.stored_len for c in spec.chunks)
        return (f"array {spec.dtype} {list(spec.shape)} {_size(spec.nbytes)} "
                f"({len(spec.chunks)} chunks, {_size(stored)} stored)")
    from ._tree import decode_scalar
    value = repr(decode_scalar(node))
    return f"{node['t']} {value[:60] + '...' if len(value) > 60 else value}"


async def inspect(path: str) -> tuple[int, list[str]]:
    """The checkpoint's tree: key, type, dtype, shape, sizes."""
    try:
        manifest = await read_manifest(path)
    except CheckpointError as exc:
        return 1, [f"DAMAGED {path}: {exc}"]
    raw = sum(a.nbytes for a in manifest.arrays)
    lines = [f"{path}: format 1, save_counter {manifest.save_counter}, "
             f"{len(manifest.arrays)} arrays, {_size(raw)}"]
    for name, node in manifest.values.items():
        if node["t"] in ("dict", "list", "tuple", "state"):
            lines.append(f"{name}: {node['t']}")
            _describe(node, manifest, "  ", lines)
        else:
            lines.append(f"{name}: {_leaf(node, manifest)}")
    return 0, lines
