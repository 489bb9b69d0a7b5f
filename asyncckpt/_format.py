"""On-disk format v1: manifest encoding and strict validation (docs/format.md). No I/O."""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _tree
from ._errors import CorruptCheckpointError

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "MANIFEST_LIMIT", "TMP_MARK", "OLD_MARK", "DELETING_MARK",
    "Chunk", "ArraySpec", "Manifest", "shard_name", "encode_manifest", "decode_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_LIMIT = 256 << 20
MAX_CHUNK_RAW = 1 << 30
TMP_MARK = ".asyncckpt-tmp-"
OLD_MARK = ".asyncckpt-old-"
DELETING_MARK = ".asyncckpt-deleting-"
_MAX_DEPTH = 512
_HEADER_RE = re.compile(rb"asyncckpt-manifest ([0-9]+) ([0-9]{1,10}) ([0-9a-f]{8})\n")
_SHARD_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")
_CRC_RE = re.compile(r"[0-9a-f]{8}\Z")
_LEAF_KINDS = {"none": (), "bool": ("value",), "int": ("value",), "float": ("value",),
               "str": ("value",), "bytes": ("value",), "scalar": ("dtype", "value")}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


@dataclass(frozen=True)
class Chunk:
    file: str
    offset: int
    stored_len: int
    raw_len: int
    codec: str      # "raw" | "zstd"
    filter: str     # "none" | "shuffle"
    crc32: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "stored_len": self.stored_len,
                "raw_len": self.raw_len, "codec": self.codec, "filter": self.filter,
                "crc32": f"{self.crc32:08x}"}


@dataclass(frozen=True)
class ArraySpec:
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Manifest:
    save_counter: int
    values: dict[str, dict[str, Any]]   # tracked name -> node (docs/format.md)
    arrays: tuple[ArraySpec, ...]


def encode_manifest(save_counter: int, values: dict[str, Any], arrays: list[dict[str, Any]]) -> bytes:
    body = json.dumps({"format": "asyncckpt", "version": FORMAT_VERSION,
                       "save_counter": save_counter, "values": values, "arrays": arrays},
                      ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    header = f"asyncckpt-manifest {FORMAT_VERSION} {len(body)} {zlib.crc32(body):08x}\n"
    return header.encode("ascii") + body


class _Bad(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise _Bad(f"JSON constant {name} is not allowed")


def decode_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and fully validate a manifest; any problem raises ``CorruptCheckpointError``."""
    try:
        return _decode(data)
    except CorruptCheckpointError:
        raise
    except (_Bad, ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError) as exc:
        raise CorruptCheckpointError(f"{source}: invalid manifest: {exc}") from exc


def _decode(data: bytes) -> Manifest:
    newline = data.find(b"\n", 0, 80)
    match = _HEADER_RE.fullmatch(data[: newline + 1]) if newline >= 0 else None
    if match is None:
        raise _Bad("missing or malformed header line (not an asyncckpt manifest?)")
    version, length, crc = int(match[1]), int(match[2]), int(match[3], 16)
    if version != FORMAT_VERSION:
        raise _Bad(f"format version {version} is not supported (this reader knows "
                   f"{FORMAT_VERSION}); upgrade asyncckpt")
    body = data[newline + 1:]
    if length > MANIFEST_LIMIT or len(body) != length:
        raise _Bad(f"body is {len(body)} bytes, header says {length} (truncated or extended)")
    if zlib.crc32(body) != crc:
        raise _Bad("checksum mismatch (the manifest is damaged)")
    doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                     parse_constant=_reject_constant)
    _expect(isinstance(doc, dict) and set(doc) == {"format", "version", "save_counter",
                                                  "values", "arrays"}, "unexpected top-level members")
    _expect(doc["format"] == "asyncckpt" and doc["version"] == FORMAT_VERSION, "format/version")
    counter = doc["save_counter"]
    _expect(_is_int(counter) and 0 <= counter < 1 << 63, "save_counter")
    arrays_json = doc["arrays"]
    _expect(isinstance(arrays_json, list), "arrays must be a list")
    arrays = tuple(_array_spec(a, i) for i, a in enumerate(arrays_json))
    values = doc["values"]
    _expect(isinstance(values, dict), "values must be an object")
    used = [0] * len(arrays)
    for name, node in values.items():
        _expect(name != "" and name != "save_counter", f"bad tracked name {name!r}")
        _check_node(node, used, 0)
    _expect(all(n == 1 for n in used), "every array must be referenced exactly once")
    _check_ranges(arrays)
    return Manifest(counter, values, arrays)


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise _Bad(what)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_node(node: Any, used: list[int], depth: int) -> None:
    _expect(depth <= _MAX_DEPTH, "tree nested too deeply")
    _expect(isinstance(node, dict) and isinstance(node.get("t"), str), "node without type")
    kind = node["t"]
    if kind in ("list", "tuple", "dict"):
        _expect(set(node) == {"t", "items"} and isinstance(node["items"], list), f"{kind} node")
        keys = set()
        for item in node["items"]:
            if kind == "dict":
                _expect(isinstance(item, list) and len(item) == 2, "dict item")
                key, item = item
                _expect(isinstance(key, str) or _is_int(key), "dict key type")
                _expect((type(key), key) not in keys, f"duplicate dict key {key!r}")
                keys.add((type(key), key))
            _check_node(item, used, depth + 1)
    elif kind == "state":
        _expect(set(node) == {"t", "value"} and isinstance(node["value"], dict)
                and node["value"].get("t") == "dict", "state node")
        _check_node(node["value"], used, depth + 1)
    elif kind == "array":
        _expect(set(node) == {"t", "index"}, "array node")
        index = node["index"]
        _expect(_is_int(index) and 0 <= index < len(used), "array index out of range")
        used[index] += 1
    elif kind in _LEAF_KINDS:
        _expect(set(node) == {"t", *_LEAF_KINDS[kind]}, f"{kind} node members")
        value = node.get("value")
        ok = {"none": True, "bool": isinstance(value, bool), "int": _is_int(value),
              "float": isinstance(value, str), "str": isinstance(value, str),
              "bytes": isinstance(value, str), "scalar": isinstance(value, str)}[kind]
        _expect(ok, f"{kind} node value")
        _tree.decode_scalar(node)  # validates float/base64/dtype
    else:
        raise _Bad(f"unknown node type {kind!r}")


def _array_spec(doc: Any, i: int) -> ArraySpec:
    _expect(isinstance(doc, dict) and set(doc) == {"path", "dtype", "shape", "chunks"},
            f"arrays[{i}] members")
    path = doc["path"]
    _expect(isinstance(path, str), f"arrays[{i}].path")
    dtype = _tree.str_to_dtype(doc["dtype"])
    shape = doc["shape"]
    _expect(isinstance(shape, list) and len(shape) <= 64
            and all(_is_int(d) and 0 <= d < 1 << 62 for d in shape), f"{path}: shape")
    nbytes = math.prod(shape) * dtype.itemsize
    _expect(nbytes < 1 << 62, f"{path}: array too large")
    _expect(isinstance(doc["chunks"], list), f"{path}: chunks")
    chunks = tuple(_chunk(c, path) for c in doc["chunks"])
    for c in chunks:
        _expect(c.raw_len % dtype.itemsize == 0, f"{path}: chunk raw_len not a multiple of "
                                                 f"the item size")
        _expect(c.filter == "none" or dtype.itemsize > 1, f"{path}: shuffle on 1-byte items")
    _expect(sum(c.raw_len for c in chunks) == nbytes,
            f"{path}: chunks hold {sum(c.raw_len for c in chunks)} bytes, shape and dtype "
            f"need {nbytes}")
    return ArraySpec(path, dtype, tuple(shape), chunks)


def _chunk(doc: Any, path: str) -> Chunk:
    _expect(isinstance(doc, dict) and set(doc) == {"file", "offset", "stored_len", "raw_len",
                                                   "codec", "filter", "crc32"}, f"{path}: chunk")
    file, crc = doc["file"], doc["crc32"]
    _expect(isinstance(file, str) and bool(_SHARD_RE.match(file)) and file != MANIFEST_NAME,
            f"{path}: chunk file name {file!r} is not allowed")
    _expect(isinstance(crc, str) and bool(_CRC_RE.match(crc)), f"{path}: crc32")
    nums = [doc[k] for k in ("offset", "stored_len", "raw_len")]
    _expect(all(_is_int(n) and 0 <= n < 1 << 62 for n in nums), f"{path}: chunk sizes")
    chunk = Chunk(file, nums[0], nums[1], nums[2], doc["codec"], doc["filter"], int(crc, 16))
    _expect(0 < chunk.raw_len <= MAX_CHUNK_RAW, f"{path}: chunk raw_len")
    _expect(chunk.codec in ("raw", "zstd"), f"{path}: codec {chunk.codec!r}")
    _expect(chunk.filter in ("none", "shuffle"), f"{path}: filter {chunk.filter!r}")
    _expect(chunk.codec == "zstd" or chunk.stored_len == chunk.raw_len,
            f"{path}: raw chunk stored_len != raw_len")
    _expect(chunk.stored_len > 0, f"{path}: empty chunk")
    return chunk


def _check_ranges(arrays: tuple[ArraySpec, ...]) -> None:
    by_file: dict[str, list[tuple[int, int]]] = {}
    for spec in arrays:
        for c in spec.chunks:
            by_file.setdefault(c.file, []).append((c.offset, c.offset + c.stored_len))
    for file, ranges in by_file.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            _expect(start >= end, f"chunks overlap in {file}")
