"""Tree flattening: tracked values <-> manifest nodes plus a flat list of arrays.

See docs/format.md ("Nodes", "Key paths") for the encoding. No I/O here.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import _jax, _torch

__all__ = [
    "ArrayLeaf", "flatten", "escape_segment", "join_path", "dtype_to_str", "str_to_dtype",
    "decode_scalar", "has_state_dict", "node_to_value", "dtensor_pieces", "MAX_DEPTH",
    "INT_KEY_MIN",
    "INT_KEY_MAX", "check_code_points",
]

# How deep containers may nest (docs/format.md, "Limits"). A ``state`` node counts as a level
# of its own, as it does in the manifest. The reader enforces the same bound, so everything
# that can be saved can be restored, and the manifest's JSON stays well under 512 levels.
MAX_DEPTH = 100
# Integer dict keys must fit in 64 bits (their hashes then cannot be made to collide at will).
INT_KEY_MIN = -(1 << 63)
INT_KEY_MAX = (1 << 63) - 1

_INT_RE = re.compile(r"-?[0-9]+\Z")
_NUMPY_DTYPE_RE = re.compile(
    r"[<>|=]?(?:b1|[iu][1248]|f(?:2|4|8|12|16)|c(?:8|16|24|32)"
    r"|[mM]8(?:\[(?:[1-9][0-9]{0,9})?[a-zA-Z]{1,3}\])?|[SUV][1-9][0-9]{0,7})\Z"
)
_ML_DTYPE_NAMES = frozenset({
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn",
    "float6_e2m3fn", "float6_e3m2fn", "int2", "int4", "uint2", "uint4",
})


@dataclass(frozen=True)
class ArrayLeaf:
    """An array to be saved: its key path and the caller's data (not yet copied).

    ``array`` is a host view of the data; for a CUDA tensor or a jax array it is None and
    ``device`` holds the tensor or array (the snapshot copies it to the host).
    """

    path: str
    array: np.ndarray | None
    dtype: np.dtype
    shape: tuple[int, ...]
    device: Any = None
    sharded: bool = False   # one rank's piece of a DTensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, path: str, array: np.ndarray) -> ArrayLeaf:
        return cls(path, array, array.dtype, array.shape)


_ESCAPED: dict[str, str] = {}  # every save escapes the same keys again


def escape_segment(key: str | int) -> str:
    """One key-path segment (docs/format.md, "Key paths")."""
    if isinstance(key, int):
        return str(key)
    seg = _ESCAPED.get(key)
    if seg is None:
        seg = key.replace("~", "~0").replace("/", "~1")
        seg = "~2" + seg if _INT_RE.match(seg) else seg
        if len(_ESCAPED) >= 1 << 16:
            _ESCAPED.clear()
        _ESCAPED[key] = seg
    return seg


def join_path(prefix: str, key: str | int) -> str:
    return f"{prefix}/{escape_segment(key)}" if prefix else escape_segment(key)


def has_state_dict(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_to_str(dtype: np.dtype, path: str) -> str:
    """The manifest name of an array's dtype; ``TypeError`` for dtypes v1 cannot store."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = _dtype_name(dtype, path)
    return name


def _dtype_name(dtype: np.dtype, path: str) -> str:
    if dtype.type.__module__.startswith("ml_dtypes"):
        if dtype.name in _ML_DTYPE_NAMES:
            return dtype.name
    elif not dtype.hasobject and dtype.names is None and dtype.subdtype is None:
        text = dtype.str
        if _NUMPY_DTYPE_RE.match(text):
            return text
    raise TypeError(
        f"{path}: arrays of dtype {dtype} cannot be saved (object and structured dtypes are "
        f"not supported); convert it to a plain numeric, bool, string or bytes dtype"
    )


def str_to_dtype(text: object) -> np.dtype:
    """Parse a manifest dtype; raises ``ValueError`` for anything not allowed."""
    if not isinstance(text, str):
        raise ValueError(f"dtype must be a string, got {text!r}")
    if text in _ML_DTYPE_NAMES:
        try:
            import ml_dtypes
        except ImportError as exc:
            raise ValueError(
                f"dtype {text} needs the ml_dtypes package: pip install ml_dtypes"
            ) from exc
        dtype = getattr(ml_dtypes, text, None)
        if dtype is None:
            raise ValueError(f"dtype {text} is not known to the installed ml_dtypes "
                             f"{getattr(ml_dtypes, '__version__', '')}: upgrade ml_dtypes")
        return np.dtype(dtype)
    if not _NUMPY_DTYPE_RE.match(text):
        raise ValueError(f"unknown dtype {text[:40]!r}")
    try:
        return np.dtype(text)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"unknown dtype {text!r} ({exc})") from exc


def flatten(name: str, value: Any, arrays: list[ArrayLeaf] | None = None
            ) -> tuple[dict[str, Any], list[ArrayLeaf]]:
    """Encode one tracked value as a manifest node; arrays are collected (appended to
    ``arrays``, which node indices count into), not copied."""
    arrays = [] if arrays is None else arrays
    node = _encode(value, name, arrays, 0, set())
    return node, arrays


def _encode(value: Any, path: str, arrays: list[ArrayLeaf], depth: int,
            active: set[int]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: containers nest deeper than {MAX_DEPTH} levels; a "
                         f"checkpoint cannot hold such a tree")
    if isinstance(value, np.ndarray):
        dtype_to_str(value.dtype, path)
        arrays.append(ArrayLeaf.of(path, value))
        return {"t": "array", "index": len(arrays) - 1}
    if type(value) in _torch.plain_tensor_types():  # the common case, before slower checks
        return _encode_tensor(value, path, arrays)
    if _jax.is_array(value):
        dtype = np.dtype(value.dtype)
        dtype_to_str(dtype, path)
        _jax.start_host_copy(value)
        arrays.append(ArrayLeaf(path, None, dtype, tuple(value.shape), device=value))
        return {"t": "array", "index": len(arrays) - 1}
    if _torch.is_dtensor(value):  # a Tensor subclass: before plain tensors
        shape, offset, writes, mesh = _torch.dtensor_layout(value, path)
        pieces = []
        if writes:
            piece = _encode(value.to_local(), path, arrays, depth, active)
            arrays[-1] = dataclasses.replace(arrays[-1], sharded=True)
            pieces.append([piece["index"], list(offset)])
        return {"t": "dtensor", "shape": list(shape), "mesh": mesh, "pieces": pieces}
    if _torch.is_tensor(value):
        return _encode_tensor(value, path, arrays)
    if isinstance(value, np.generic):
        if isinstance(value, np.object_):
            raise TypeError(f"{path}: numpy object scalars cannot be saved")
        return {"t": "scalar", "dtype": dtype_to_str(value.dtype, path),
                "value": base64.b64encode(value.tobytes()).decode("ascii")}
    if value is None:
        return {"t": "none"}
    if isinstance(value, bool):
        return {"t": "bool", "value": value}
    if isinstance(value, int):
        return {"t": "int", "value": int(value)}
    if isinstance(value, float):
        return {"t": "float", "value": float(value).hex()}
    if isinstance(value, str):
        return {"t": "str", "value": value}
    if isinstance(value, bytes):
        return {"t": "bytes", "value": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (dict, list, tuple)) or has_state_dict(value):
        if id(value) in active:
            raise ValueError(f"{path}: the tree contains a reference cycle")
        active.add(id(value))
        try:
            return _encode_container(value, path, arrays, depth, active)
        finally:
            active.discard(id(value))
    raise TypeError(
        f"{path}: cannot save a value of type {type(value).__qualname__}; leaves must be numpy "
        f"arrays or scalars, int, float, bool, str, bytes or None, in dict/list/tuple "
        f"containers, or objects with state_dict()/load_state_dict()"
    )


def _encode_tensor(value: Any, path: str, arrays: list[ArrayLeaf]) -> dict[str, Any]:
    if value.is_cpu:
        host = _torch.host_view(value, path)
        dtype_to_str(host.dtype, path)
        arrays.append(ArrayLeaf.of(path, host))
    else:
        dtype = _torch.numpy_dtype(value.dtype)
        dtype_to_str(dtype, path)
        arrays.append(ArrayLeaf(path, None, dtype, tuple(value.shape), device=value))
    return {"t": "array", "index": len(arrays) - 1}


def _encode_container(value: Any, path: str, arrays: list[ArrayLeaf], depth: int,
                      active: set[int]) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: containers nest deeper than {MAX_DEPTH} levels; a "
                         f"checkpoint cannot hold such a tree")
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(
                    f"{path}: dict key {key!r} has type {type(key).__qualname__}; only str and "
                    f"int keys can be saved"
                )
            if isinstance(key, int) and not INT_KEY_MIN <= key <= INT_KEY_MAX:
                raise ValueError(f"{path}: dict key {key} does not fit in 64 bits; int keys "
                                 f"must lie in [-2**63, 2**63)")
            items.append([key if isinstance(key, str) else int(key),
                          _encode(item, join_path(path, key), arrays, depth + 1, active)])
        return {"t": "dict", "items": items}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {"t": kind, "items": [_encode(item, join_path(path, i), arrays, depth + 1, active)
                                     for i, item in enumerate(value)]}
    state = value.state_dict()
    if not isinstance(state, dict):
        raise TypeError(f"{path}: state_dict() returned {type(state).__qualname__}, not a dict")
    return {"t": "state", "value": _encode_container(state, path, arrays, depth + 1, active)}


def decode_scalar(node: dict[str, Any]) -> Any:
    """The Python value of a leaf node other than ``array`` (nodes are already validated)."""
    kind = node["t"]
    if kind == "none":
        return None
    if kind in ("bool", "int", "str"):
        return node["value"]
    if kind == "float":
        text = node["value"]
        value = float.fromhex(text)
        if value.hex() != text:  # only float.hex()'s own spelling, e.g. no "1.5" or "infinity"
            raise ValueError(f"float {text[:40]!r} is not written as float.hex() writes it")
        return value
    if kind == "bytes":
        return base64.b64decode(node["value"], validate=True)
    if kind == "scalar":
        dtype = str_to_dtype(node["dtype"])
        raw = base64.b64decode(node["value"], validate=True)
        if len(raw) != dtype.itemsize:
            raise ValueError(f"scalar of dtype {node['dtype']} has {len(raw)} bytes")
        array = np.frombuffer(raw, dtype=dtype)
        check_code_points(array)
        return array[0]
    raise ValueError(f"unknown node type {kind!r}")


def check_code_points(array: np.ndarray) -> None:
    """Reject a ``U`` array holding a code point above U+10FFFF (numpy cannot read it back)."""
    if array.dtype.kind == "U" and array.size:
        codes = array.view(array.dtype.byteorder.replace("|", "=") + "u4")
        if int(codes.max()) > 0x10FFFF:
            raise ValueError("a string holds a code point above U+10FFFF")


def node_to_value(node: dict[str, Any], array_at: Callable[[int], np.ndarray],
                  whole: Callable[[str, dict[str, Any]], Any] | None = None, path: str = ""
                  ) -> Any:
    """Rebuild a fresh value from a validated node (``state`` nodes become their dicts;
    ``whole(path, node)`` assembles a DTensor from its pieces)."""
    kind = node["t"]
    if kind == "dict":
        return {key: node_to_value(child, array_at, whole, join_path(path, key))
                for key, child in node["items"]}
    if kind in ("list", "tuple"):
        items = [node_to_value(child, array_at, whole, join_path(path, i))
                 for i, child in enumerate(node["items"])]
        return items if kind == "list" else tuple(items)
    if kind == "state":
        return node_to_value(node["value"], array_at, whole, path)
    if kind == "array":
        return array_at(node["index"])
    if kind == "dtensor":
        if whole is None:
            raise ValueError(f"{path}: a sharded (DTensor) value needs its pieces to load")
        return whole(path, node)
    return decode_scalar(node)


Piece = tuple[int, tuple[int, ...]]   # array index, global offset


def dtensor_pieces(trees: list[dict[str, Any]]
                   ) -> dict[str, dict[tuple[int, ...], list[Piece]]]:
    """Every written piece of every sharded (DTensor) value, by key path and then by device
    mesh (global ranks), over all ranks' trees. Values on different meshes under one key
    path (pipeline stages, or data-parallel replicas of a tensor-parallel value) are kept
    apart; a piece listed twice is listed once."""
    found: dict[str, dict[tuple[int, ...], dict[tuple[int, ...], int]]] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        kind = node["t"]
        if kind == "dict":
            for key, child in node["items"]:
                walk(child, join_path(path, key))
        elif kind in ("list", "tuple"):
            for i, child in enumerate(node["items"]):
                walk(child, join_path(path, i))
        elif kind == "state":
            walk(node["value"], path)
        elif kind == "dtensor":
            pieces = found.setdefault(path, {}).setdefault(tuple(node["mesh"]), {})
            for index, offset in node["pieces"]:
                pieces.setdefault(tuple(offset), index)
    for tree in trees:
        for name, node in tree.items():
            walk(node, name)
    return {path: {mesh: [(index, offset) for offset, index in pieces.items()]
                   for mesh, pieces in sorted(meshes.items())}
            for path, meshes in found.items()}
