"""Matching a checkpoint's tree against restore targets, then restoring in place.

Planning walks the saved tree and the caller's values together and checks everything
(structure, shapes, dtypes, writability) before a single byte is changed. Execution then fills
arrays in place and writes immutable leaves back into their containers (tuples are rebuilt,
``load_state_dict`` objects get their new dict).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import _jax, _torch, _tree
from ._errors import CorruptCheckpointError, MismatchError
from ._format import ArraySpec, Manifest

__all__ = ["Plan", "plan_restore", "check_pieces"]

Finish = Callable[[], Any]


@dataclass
class Plan:
    """What a restore will do: arrays to fill and the closures that put values back."""

    manifest: Manifest
    specs: list[ArraySpec] = field(default_factory=list)
    destinations: list[np.ndarray] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    finishers: dict[str, Finish] = field(default_factory=dict)  # tracked name -> new value
    after_read: list[Callable[[], None]] = field(default_factory=list)  # e.g. host -> GPU
    # a spec reading only some chunks of an array -> (array index, first chunk, count)
    parts: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    _pieces: dict[str, dict[tuple[int, ...], list[_tree.Piece]]] | None = None

    def pieces(self, path: str, mesh: tuple[int, ...] | None) -> list[_tree.Piece]:
        """The saved pieces of the sharded value at ``path``: those saved on ``mesh`` (the
        target's device mesh) if there are any, otherwise those of the first mesh."""
        if self._pieces is None:
            m = self.manifest
            self._pieces = _tree.dtensor_pieces(list(m.ranks) if m.ranks else [m.values])
        groups = self._pieces.get(path, {})
        if mesh in groups:
            return groups[mesh]
        return next(iter(groups.values()), [])

    def requests(self) -> list[list[int]]:
        """``[array index, first chunk, chunk count]`` per spec, in order (what a rank asks
        the I/O rank for)."""
        index = {id(spec): i for i, spec in enumerate(self.manifest.arrays)}
        return [list(self.parts.get(id(s)) or (index[id(s)], 0, len(s.chunks)))
                for s in self.specs]


def plan_restore(manifest: Manifest, targets: dict[str, Any]) -> Plan:
    plan = Plan(manifest)
    for name, node in manifest.values.items():
        if name in targets:
            plan.finishers[name] = _plan(node, targets[name], name, plan)
        else:
            plan.unexpected.append(name)
    plan.missing.extend(name for name in targets if name not in manifest.values)
    return plan


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, (list, tuple)):
        return "sequence"
    if _tree.has_state_dict(value):
        return "state"
    return "leaf"


def _mismatch(path: str, saved: str, target: Any) -> MismatchError:
    return MismatchError(f"{path}: the checkpoint has a {saved}, the restore target is a "
                         f"{type(target).__qualname__}; make the target's structure match")


@dataclass(frozen=True)
class _Ctx:
    """Inside a ``load_state_dict`` object: saved entries the target lacks are added (an
    optimizer before its first step has no state yet); inside a torch object they are
    created as tensors."""

    fill: bool = False
    torch: bool = False


def _plan(node: dict[str, Any], target: Any, path: str, plan: Plan, ctx: _Ctx = _Ctx()
          ) -> Finish:
    kind = node["t"]
    if kind in ("state", "dict") and _tree.has_state_dict(target):
        inner_ctx = _Ctx(fill=True, torch=ctx.torch or _torch.is_torch_object(target))
        inner = _plan(node["value"] if kind == "state" else node, target.state_dict(), path,
                      plan, inner_ctx)
        return lambda: (target.load_state_dict(inner()), target)[1]
    if kind == "state":
        return _plan(node["value"], target, path, plan, ctx)
    if kind == "dict":
        if not isinstance(target, dict):
            raise _mismatch(path, "dict", target)
        return _plan_dict(node, target, path, plan, ctx)
    if kind in ("list", "tuple"):
        if not isinstance(target, (list, tuple)):
            raise _mismatch(path, kind, target)
        return _plan_sequence(node, target, path, plan, ctx)
    if _kind(target) != "leaf":
        raise _mismatch(path, "leaf value", target)
    if kind == "dtensor":
        return _plan_sharded(node, target, path, plan, ctx)
    if kind == "array":
        return _plan_array(node, target, path, plan, ctx)
    if isinstance(target, np.ndarray) or _torch.is_tensor(target) or _jax.is_array(target):
        raise _mismatch(path, f"{kind} value", target)
    value = _tree.decode_scalar(node)
    return lambda: value


def _fresh(node: dict[str, Any], path: str, plan: Plan, ctx: _Ctx) -> Finish:
    """A new value for a saved entry the target does not have."""
    kind = node["t"]
    if kind == "state":
        return _fresh(node["value"], path, plan, ctx)
    if kind == "dict":
        items = [(key, _fresh(child, _tree.join_path(path, key), plan, ctx))
                 for key, child in node["items"]]
        return lambda: {key: fn() for key, fn in items}
    if kind in ("list", "tuple"):
        parts = [_fresh(child, _tree.join_path(path, i), plan, ctx)
                 for i, child in enumerate(node["items"])]
        return (lambda: [fn() for fn in parts]) if kind == "list" else (
            lambda: tuple(fn() for fn in parts))
    if kind == "array":
        return _plan_array(node, None, path, plan, ctx)
    if kind == "dtensor":
        return _plan_sharded(node, None, path, plan, ctx)
    value = _tree.decode_scalar(node)
    return lambda: value


def _plan_dict(node: dict[str, Any], target: dict[Any, Any], path: str, plan: Plan,
               ctx: _Ctx) -> Finish:
    children: list[tuple[Any, Finish]] = []
    seen = set()
    present = {(type(k), k) for k in target}  # 1 and "1" (and True) are different keys
    for key, child in node["items"]:
        seen.add((type(key), key))
        child_path = _tree.join_path(path, key)
        if (type(key), key) in present:
            children.append((key, _plan(child, target[key], child_path, plan, ctx)))
        elif ctx.fill:
            children.append((key, _fresh(child, child_path, plan, ctx)))
        else:
            plan.unexpected.append(child_path)
    plan.missing.extend(_tree.join_path(path, k) for k in target
                        if (type(k), k) not in seen)

    def finish() -> dict[Any, Any]:
        for key, fn in children:
            target[key] = fn()
        return target
    return finish


def _plan_sequence(node: dict[str, Any], target: list[Any] | tuple[Any, ...], path: str,
                   plan: Plan, ctx: _Ctx) -> Finish:
    items = node["items"]
    n = min(len(items), len(target))
    children = [_plan(items[i], target[i], _tree.join_path(path, i), plan, ctx)
                for i in range(n)]
    plan.unexpected.extend(_tree.join_path(path, i) for i in range(n, len(items)))
    plan.missing.extend(_tree.join_path(path, i) for i in range(n, len(target)))
    if isinstance(target, list):
        def finish_list() -> list[Any]:
            for i, fn in enumerate(children):
                target[i] = fn()
            return target
        return finish_list

    def finish_tuple() -> tuple[Any, ...]:
        values = [fn() for fn in children] + list(target[n:])
        if hasattr(target, "_make"):
            return target._make(values)  # type: ignore[union-attr]
        return type(target)(values)
    return finish_tuple


def _plan_array(node: dict[str, Any], target: Any, path: str, plan: Plan, ctx: _Ctx) -> Finish:
    spec = plan.manifest.arrays[node["index"]]
    if _torch.is_dtensor(target):  # a whole saved array into a DTensor: one piece of it
        return _plan_pieces(spec.shape, [(node["index"], (0,) * len(spec.shape))], target,
                            path, plan, ctx)
    finish, dest = _destination(target, spec.shape, spec.dtype, path, plan, ctx)
    plan.specs.append(spec)
    plan.destinations.append(dest)
    return finish


def _destination(target: Any, shape: tuple[int, ...], dtype: np.dtype, path: str, plan: Plan,
                 ctx: _Ctx) -> tuple[Finish, np.ndarray]:
    """What gives the value a restore leaves (the target itself, or a new one; run after
    the read) and the host array its bytes are read into (a GPU target is filled from it
    after the read)."""
    if not (isinstance(target, np.ndarray) or _torch.is_tensor(target)
            or _jax.is_array(target)):  # none, or a scalar: replaced by a new array
        if not ctx.torch:
            dest = np.empty(shape, dtype)
            return lambda: dest, dest
        if not _torch.can_hold(dtype):
            raise MismatchError(f"{path}: the checkpoint has dtype {dtype}, which a torch "
                                f"tensor cannot hold; restore it into a numpy array instead")
        fresh, dest = _torch.fresh_tensor(shape, dtype)
        return lambda: fresh, dest
    got = tuple(target.shape)
    got_dtype = (_torch.numpy_dtype(target.dtype) if _torch.is_tensor(target)
                 else np.dtype(target.dtype))
    if got != shape or got_dtype != dtype:
        raise MismatchError(
            f"{path}: the checkpoint has shape {shape} dtype {dtype}, the "
            f"restore target has shape {got} dtype {got_dtype}")
    if _jax.is_array(target):  # immutable: a new array on the target's devices
        dest = np.empty(shape, dtype)
        return lambda: _jax.put_like(dest, target), dest
    if isinstance(target, np.ndarray):
        if not target.flags.writeable:
            raise MismatchError(f"{path}: the restore target array is read-only")
        return lambda: target, target
    if target.device.type == "cpu":
        return lambda: target, _torch.host_view(target, path)
    dest = np.empty(shape, dtype)
    plan.after_read.append(lambda: _torch.copy_to_device(target, dest))
    return lambda: target, dest


def _plan_sharded(node: dict[str, Any], target: Any, path: str, plan: Plan, ctx: _Ctx
                  ) -> Finish:
    """A sharded (DTensor) value: read the part of every saved piece that overlaps what the
    target holds (its own local shard for a DTensor, the whole value otherwise), reading
    only the chunks that part lies in, whatever the world size was at saving."""
    mesh = tuple(_torch.mesh_ranks(target)) if _torch.is_dtensor(target) else None
    return _plan_pieces(tuple(node["shape"]), plan.pieces(path, mesh), target, path, plan, ctx)


def _plan_pieces(shape: tuple[int, ...], found: list[_tree.Piece], target: Any, path: str,
                 plan: Plan, ctx: _Ctx) -> Finish:
    indices = [i for i, _ in found]
    pieces = [(plan.manifest.arrays[i], offset) for i, offset in found]
    check_pieces(path, shape, pieces)
    dtype = pieces[0][0].dtype if pieces else np.dtype(np.float32)
    box_offset: tuple[int, ...] = (0,) * len(shape)
    mark = len(plan.after_read)
    if target is not None and _torch.is_dtensor(target):
        got = (tuple(target.shape), _torch.numpy_dtype(target.dtype))
        if got != (shape, dtype):
            raise MismatchError(f"{path}: the checkpoint has shape {shape} dtype {dtype}, the "
                                f"restore target has shape {got[0]} dtype {got[1]}")
        local, box_offset = _torch.dtensor_local(target)
        _, dest = _destination(local, tuple(local.shape), dtype, path, plan, ctx)
        finish: Finish = lambda: target  # noqa: E731
    else:
        finish, dest = _destination(target, shape, dtype, path, plan, ctx)
    copies = [c for i, (spec, offset) in zip(indices, pieces)
              if (c := _plan_piece(i, spec, offset, box_offset, dest, plan)) is not None]
    plan.after_read[mark:mark] = copies  # before any copy of ``dest`` to a device
    return finish


def _plan_piece(index: int, spec: ArraySpec, offset: tuple[int, ...],
                box_offset: tuple[int, ...], dest: np.ndarray, plan: Plan
                ) -> Callable[[], None] | None:
    lo = [max(b, o) for b, o in zip(box_offset, offset)]
    hi = [min(b + n, o + m) for b, n, o, m in zip(box_offset, dest.shape, offset, spec.shape)]
    if any(a >= b for a, b in zip(lo, hi)):
        return None  # no overlap (or nothing in it)
    if tuple(offset) == tuple(box_offset) and tuple(spec.shape) == dest.shape:
        plan.specs.append(spec)  # the same sharding: read straight into place, no copy
        plan.destinations.append(dest)
        return None
    in_piece = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
    in_dest = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, box_offset))
    size = spec.dtype.itemsize
    first = int(np.ravel_multi_index([s.start for s in in_piece], spec.shape)) * size
    last = (int(np.ravel_multi_index([s.stop - 1 for s in in_piece], spec.shape)) + 1) * size
    start, chosen, begin = 0, [], None
    for i, chunk in enumerate(spec.chunks):
        if start < last and start + chunk.raw_len > first:
            begin = start if begin is None else begin
            chosen.append(i)
        start += chunk.raw_len
    if not chosen:
        return None
    whole = np.empty(math.prod(spec.shape), spec.dtype)  # pages never read stay unallocated
    count = sum(spec.chunks[i].raw_len for i in chosen) // size
    part = dataclasses.replace(spec, shape=(count,),
                               chunks=tuple(spec.chunks[i] for i in chosen))
    plan.specs.append(part)
    plan.destinations.append(whole[begin // size:begin // size + count])
    plan.parts[id(part)] = (index, chosen[0], len(chosen))

    def copy() -> None:
        dest[in_dest] = whole.reshape(spec.shape)[in_piece]
    return copy


def _overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether two boxes (sorted by their low corner) overlap: a sweep along the first
    dimension, comparing each box only with those still open there (a few for any real
    sharding). Past 10 million comparisons the input is taken to be hostile."""
    if not boxes or not boxes[0][0]:
        return len(boxes) > 1  # 0-d: more than one piece of a scalar
    open_boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    budget = 10_000_000
    for lo, hi in boxes:
        open_boxes = [box for box in open_boxes if box[1][0] > lo[0]]
        budget -= len(open_boxes)
        if budget < 0:
            return True
        if any(all(max(a, c) < min(b, d) for a, b, c, d in zip(lo, hi, lo2, hi2))
               for lo2, hi2 in open_boxes):
            return True
        open_boxes.append((lo, hi))
    return False


def check_pieces(path: str, shape: tuple[int, ...],
                 pieces: list[tuple[ArraySpec, tuple[int, ...]]]) -> None:
    """The saved pieces of a sharded value must tile its shape exactly, in one dtype."""
    problem = None
    if len({spec.dtype for spec, _ in pieces}) > 1:
        problem = "its pieces have different dtypes"
    elif sum(math.prod(spec.shape) for spec, _ in pieces) != math.prod(shape):
        problem = "its pieces do not add up to the whole"
    elif _overlap(sorted((tuple(o), tuple(a + n for a, n in zip(o, spec.shape)))
                         for spec, o in pieces if math.prod(spec.shape))):
        problem = "two of its pieces overlap"
    if problem:
        raise CorruptCheckpointError(f"{path}: the sharded value of shape {list(shape)} "
                                     f"cannot be rebuilt: {problem}; restore another checkpoint")
