"""Matching a checkpoint's tree against restore targets, then restoring in place.

Planning walks the saved tree and the caller's values together and checks everything
(structure, shapes, dtypes, writability) before a single byte is changed. Execution then fills
arrays in place and writes immutable leaves back into their containers (tuples are rebuilt,
``load_state_dict`` objects get their new dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import _jax, _torch, _tree
from ._errors import MismatchError
from ._format import ArraySpec, Manifest

__all__ = ["Plan", "plan_restore"]

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
    result: Any
    if isinstance(target, np.ndarray) or _torch.is_tensor(target) or _jax.is_array(target):
        shape = tuple(target.shape)
        dtype = (_torch.numpy_dtype(target.dtype) if _torch.is_tensor(target)
                 else np.dtype(target.dtype))
        if shape != spec.shape or dtype != spec.dtype:
            raise MismatchError(
                f"{path}: the checkpoint has shape {spec.shape} dtype {spec.dtype}, the "
                f"restore target has shape {shape} dtype {dtype}")
        result = target
        if _jax.is_array(target):  # immutable: a new array on the target's devices
            dest = np.empty(spec.shape, spec.dtype)
            plan.specs.append(spec)
            plan.destinations.append(dest)
            return lambda: _jax.put_like(dest, target)
        if isinstance(target, np.ndarray):
            if not target.flags.writeable:
                raise MismatchError(f"{path}: the restore target array is read-only")
            dest = target
        elif target.device.type == "cpu":
            dest = _torch.host_view(target, path)
        else:
            dest = np.empty(spec.shape, spec.dtype)
            plan.after_read.append(lambda: _torch.copy_to_device(target, dest))
    elif ctx.torch:
        if not _torch.can_hold(spec.dtype):
            raise MismatchError(f"{path}: the checkpoint has dtype {spec.dtype}, which a torch "
                                f"tensor cannot hold; restore it into a numpy array instead")
        result, dest = _torch.fresh_tensor(spec.shape, spec.dtype)
    else:
        result = dest = np.empty(spec.shape, spec.dtype)
    plan.specs.append(spec)
    plan.destinations.append(dest)
    return lambda: result
