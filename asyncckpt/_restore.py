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

from . import _tree
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


def _plan(node: dict[str, Any], target: Any, path: str, plan: Plan) -> Finish:
    kind = node["t"]
    if kind == "state":
        if _tree.has_state_dict(target):
            inner = _plan(node["value"], target.state_dict(), path, plan)
            return lambda: (target.load_state_dict(inner()), target)[1]
        return _plan(node["value"], target, path, plan)
    if kind == "dict":
        if _tree.has_state_dict(target):
            inner = _plan(node, target.state_dict(), path, plan)
            return lambda: (target.load_state_dict(inner()), target)[1]
        if not isinstance(target, dict):
            raise _mismatch(path, "dict", target)
        return _plan_dict(node, target, path, plan)
    if kind in ("list", "tuple"):
        if not isinstance(target, (list, tuple)):
            raise _mismatch(path, kind, target)
        return _plan_sequence(node, target, path, plan)
    if _kind(target) != "leaf":
        raise _mismatch(path, "leaf value", target)
    if kind == "array":
        return _plan_array(node, target, path, plan)
    if isinstance(target, np.ndarray):
        raise _mismatch(path, f"{kind} value", target)
    value = _tree.decode_scalar(node)
    return lambda: value


def _plan_dict(node: dict[str, Any], target: dict[Any, Any], path: str, plan: Plan) -> Finish:
    children: list[tuple[Any, Finish]] = []
    seen = set()
    for key, child in node["items"]:
        seen.add((type(key), key))
        child_path = _tree.join_path(path, key)
        if key in target and type(_find_key(target, key)) is type(key):
            children.append((key, _plan(child, target[key], child_path, plan)))
        else:
            plan.unexpected.append(child_path)
    plan.missing.extend(_tree.join_path(path, k) for k in target
                        if (type(k), k) not in seen)

    def finish() -> dict[Any, Any]:
        for key, fn in children:
            target[key] = fn()
        return target
    return finish


def _find_key(target: dict[Any, Any], key: Any) -> Any:
    for k in target:
        if k == key and type(k) is type(key):
            return k
    return None


def _plan_sequence(node: dict[str, Any], target: list[Any] | tuple[Any, ...], path: str,
                   plan: Plan) -> Finish:
    items = node["items"]
    n = min(len(items), len(target))
    children = [_plan(items[i], target[i], _tree.join_path(path, i), plan) for i in range(n)]
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


def _plan_array(node: dict[str, Any], target: Any, path: str, plan: Plan) -> Finish:
    spec = plan.manifest.arrays[node["index"]]
    if isinstance(target, np.ndarray):
        if target.shape != spec.shape or target.dtype != spec.dtype:
            raise MismatchError(
                f"{path}: the checkpoint has shape {spec.shape} dtype {spec.dtype}, the "
                f"restore target has shape {target.shape} dtype {target.dtype}")
        if not target.flags.writeable:
            raise MismatchError(f"{path}: the restore target array is read-only")
        dest = target
    else:
        dest = np.empty(spec.shape, spec.dtype)
    plan.specs.append(spec)
    plan.destinations.append(dest)
    return lambda: dest
