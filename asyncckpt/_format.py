"""On-disk format v1: manifest encoding and strict validation (docs/format.md). No I/O."""

from __future__ import annotations

import json
import math
import re
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _tree
from ._errors import CorruptCheckpointError

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "MANIFEST_LIMIT", "MAX_CHUNK_RAW", "MAX_ZSTD_RATIO",
    "TMP_MARK", "OLD_MARK", "DELETING_MARK", "Chunk", "ArraySpec", "Manifest", "shard_name",
    "encode_manifest", "decode_manifest", "max_zstd_stored",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_LIMIT = 256 << 20
MAX_CHUNK_RAW = 1 << 30
# A zstd block regenerates at most 128 KiB and takes at least 4 bytes (3 of header, 1 of RLE
# content), so no zstd frame expands more than 32768-fold: a chunk claiming more is rejected
# before anything is allocated for it (docs/format.md, "Limits").
MAX_ZSTD_RATIO = 32768
TMP_MARK = ".asyncckpt-tmp-"
OLD_MARK = ".asyncckpt-old-"
DELETING_MARK = ".asyncckpt-deleting-"
_MAX_JSON_DEPTH = 512
_MAX_DIGITS = 4300
_MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32  # numpy's own limit
_HEADER_RE = re.compile(
    rb"asyncckpt-manifest (0|[1-9][0-9]{0,8}) (0|[1-9][0-9]{0,9}) ([0-9a-f]{8})\n")
_SHARD_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")
_CRC_RE = re.compile(r"[0-9a-f]{8}\Z")
_LEAF_KINDS = {"none": (), "bool": ("value",), "int": ("value",), "float": ("value",),
               "str": ("value",), "bytes": ("value",), "scalar": ("dtype", "value")}
_HINT = "; the checkpoint is damaged (or was not written by asyncckpt): restore another one"


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
    ranks: tuple[dict[str, dict[str, Any]], ...] | None = None  # per-rank values (several processes)
    replicated: tuple[str, ...] = ()    # key-path globs written once for all ranks


def encode_manifest(save_counter: int, values: dict[str, Any], arrays: list[dict[str, Any]],
                    *, ranks: list[dict[str, Any]] | None = None,
                    replicated: list[str] | None = None) -> bytes:
    doc = {"format": "asyncckpt", "version": FORMAT_VERSION, "save_counter": save_counter,
           "values": values, "arrays": arrays}
    if ranks is not None:
        doc["ranks"] = ranks
        doc["replicated"] = list(replicated or [])
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()
    header = f"asyncckpt-manifest {FORMAT_VERSION} {len(body)} {zlib.crc32(body):08x}\n"
    return header.encode("ascii") + body


def max_zstd_stored(raw_len: int) -> int:
    """The most stored bytes a zstd chunk of ``raw_len`` raw bytes may have (above zstd's
    ``ZSTD_compressBound``; an incompressible chunk is better stored raw anyway)."""
    return raw_len + (raw_len >> 7) + 4096


class _Bad(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"duplicate JSON key {_show(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise _Bad(f"JSON constant {name} is not allowed")


def _show(text: object, limit: int = 80) -> str:
    """``repr`` of an untrusted value, cut short."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def decode_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and fully validate a manifest; any problem raises ``CorruptCheckpointError``."""
    try:
        return _decode(data)
    except CorruptCheckpointError:
        raise
    except _Version as exc:
        raise CorruptCheckpointError(f"{source}: {exc}") from exc
    except (_Bad, ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError) as exc:
        raise CorruptCheckpointError(f"{source}: invalid manifest: {exc}{_HINT}") from exc


class _Version(Exception):
    pass


def _decode(data: bytes) -> Manifest:
    newline = data.find(b"\n", 0, 80)
    match = _HEADER_RE.fullmatch(data[: newline + 1]) if newline >= 0 else None
    if match is None:
        raise _Bad("missing or malformed header line (not an asyncckpt manifest?)")
    version, length, crc = int(match[1]), int(match[2]), int(match[3], 16)
    if version != FORMAT_VERSION:
        raise _Version(f"format version {version} is not supported (this reader knows "
                       f"{FORMAT_VERSION}); upgrade asyncckpt")
    if length > MANIFEST_LIMIT:
        raise _Bad(f"the header declares a body of {length} bytes, more than the limit of "
                   f"{MANIFEST_LIMIT}")
    body = data[newline + 1:]
    if len(body) != length:
        raise _Bad(f"body is {len(body)} bytes, header says {length} (truncated or extended)")
    if zlib.crc32(body) != crc:
        raise _Bad("checksum mismatch (the manifest is damaged)")
    _check_json_shape(body)
    doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                     parse_constant=_reject_constant)
    base = {"format", "version", "save_counter", "values", "arrays"}
    _expect(isinstance(doc, dict) and set(doc) in (base, base | {"ranks", "replicated"}),
            "the top level must have exactly the members format, version, save_counter, "
            "values, arrays (and, written by several processes, ranks and replicated)")
    _expect(doc["format"] == "asyncckpt" and _is_int(doc["version"])
            and doc["version"] == FORMAT_VERSION,
            f"format/version members are {_show(doc['format'])}/{_show(doc['version'])}, "
            f"expected 'asyncckpt'/{FORMAT_VERSION}")
    counter = doc["save_counter"]
    _expect(_is_int(counter) and 0 <= counter < 1 << 63,
            f"save_counter {_show(counter)} is not an integer in [0, 2**63)")
    arrays_json = doc["arrays"]
    _expect(isinstance(arrays_json, list), "arrays must be a list")
    arrays = tuple(_array_spec(a, i) for i, a in enumerate(arrays_json))
    values = doc["values"]
    _expect(isinstance(values, dict), "values must be an object")
    ranks, globs = doc.get("ranks"), doc.get("replicated", [])
    trees = [values]
    if ranks is not None:
        _expect(isinstance(ranks, list) and 2 <= len(ranks) <= 1 << 16 and values == {},
                "ranks must list every rank's values (and values must then be empty)")
        _expect(isinstance(globs, list) and all(isinstance(g, str) for g in globs),
                "replicated must be a list of strings")
        trees = ranks
    total = [0] * len(arrays)
    for tree in trees:
        _expect(isinstance(tree, dict), "values must be an object")
        used = [0] * len(arrays)
        for name, node in tree.items():
            _expect(name != "" and name != "save_counter", f"bad tracked name {_show(name)}")
            _check_node(node, name, arrays, used, 0)
        _expect(all(n <= 1 for n in used), "an array is referenced twice in one tree")
        total = [a + b for a, b in zip(total, used)]
    unused = [i for i, n in enumerate(total) if n == 0]
    _expect(not unused, f"arrays[{unused[0] if unused else 0}] is not referenced by the tree "
                        f"(every array must be referenced exactly once)")
    _expect(ranks is not None or all(n == 1 for n in total),
            "every array must be referenced exactly once")
    _check_ranges(arrays)
    return Manifest(counter, values, arrays,
                    tuple(ranks) if ranks is not None else None, tuple(globs))


# Before json.loads: its C parser recurses once per nesting level, and with a raised
# recursion limit a deeply nested body would overflow the C stack; an integer of millions of
# digits takes quadratic time where Python's int digit limit is switched off.
_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING = re.compile(rb'"[^"]*"')
_LONG_NUMBER = re.compile(rb"(?<![0-9])[0-9]{%d}" % (_MAX_DIGITS + 1))
_SCAN_BLOCK = 4 << 20


def _check_json_shape(body: bytes) -> None:
    """Reject a body nested deeper than 512 levels or holding a number of over 4300 digits,
    in linear time and without recursion. Escape pairs are dropped first, so every quote left
    opens or closes a string; up to the first syntax error this matches what the JSON parser
    sees, and past it the parser never gets."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    check_digits = not 0 < limit <= _MAX_DIGITS and len(body) > _MAX_DIGITS
    if body.count(b"[") + body.count(b"{") <= _MAX_JSON_DEPTH and not check_digits:
        return
    text = _JSON_ESCAPE.sub(b"", body)
    if check_digits and _LONG_NUMBER.search(_JSON_STRING.sub(b'""', text)):
        raise _Bad(f"a number has more than {_MAX_DIGITS} digits")
    # Brackets outside strings, in blocks: +1 for [ {, -1 for ] }; the running sum is the depth.
    chars = np.frombuffer(text, np.uint8)
    depth, in_string = 0, 0
    for start in range(0, chars.size, _SCAN_BLOCK):
        block = chars[start:start + _SCAN_BLOCK]
        quotes = np.flatnonzero(block == 0x22)
        opens = (block == 0x5B) | (block == 0x7B)
        brackets = np.flatnonzero(opens | (block == 0x5D) | (block == 0x7D))
        outside = brackets[((np.searchsorted(quotes, brackets) + in_string) & 1) == 0]
        if outside.size:
            running = np.cumsum(np.where(opens[outside], 1, -1)) + depth
            if int(running.max()) > _MAX_JSON_DEPTH:
                raise _Bad(f"JSON nested deeper than {_MAX_JSON_DEPTH} levels")
            depth = int(running[-1])
        in_string ^= quotes.size & 1


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise _Bad(what)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Key paths are built lazily, as (parent, segment) chains: a long key above many leaves must
# not be copied into every leaf's path.
_Path = Any  # str (a tracked name) or tuple[_Path, str]


def _path_str(path: _Path, limit: int) -> str | None:
    """The key path, or None where it is longer than ``limit`` characters."""
    parts: list[str] = []
    total = 0
    while isinstance(path, tuple):
        path, segment = path
        total += len(segment) + 1
        if total > limit:
            return None
        parts.append(segment)
    if total + len(path) > limit:
        return None
    parts.append(path)
    return "/".join(reversed(parts))


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def _where(path: _Path) -> str:
    """A key path for an error message (its end, where it is very long)."""
    parts: list[str] = []
    while isinstance(path, tuple):
        path, segment = path
        parts.append(segment if len(segment) <= 60 else segment[:57] + "...")
    parts.append(path if len(path) <= 60 else path[:57] + "...")
    text = "values/" + "/".join(reversed(parts))
    return text if len(text) <= 300 else "..." + text[-297:]


def _check_node(node: Any, path: _Path, arrays: tuple[ArraySpec, ...], used: list[int],
                depth: int) -> None:
    # Messages are built only on failure: this runs once per node of a possibly huge tree.
    if depth > _tree.MAX_DEPTH:
        raise _Bad(f"{_where(path)}: the tree is nested deeper than {_tree.MAX_DEPTH} levels")
    if not (isinstance(node, dict) and isinstance(node.get("t"), str)):
        raise _Bad(f"{_where(path)}: node without a type")
    kind = node["t"]
    if kind in ("list", "tuple", "dict"):
        if not (len(node) == 2 and isinstance(node.get("items"), list)):
            raise _Bad(f"{_where(path)}: a {kind} node has exactly the members t and "
                       f"items (a list)")
        if kind != "dict":
            for i, child in enumerate(node["items"]):
                _check_node(child, (path, str(i)), arrays, used, depth + 1)
            return
        keys = set()
        for item in node["items"]:
            if not (isinstance(item, list) and len(item) == 2):
                raise _Bad(f"{_where(path)}: dict items must be [key, node] pairs")
            key, child = item
            if not (isinstance(key, str) or (
                    _is_int(key) and _tree.INT_KEY_MIN <= key <= _tree.INT_KEY_MAX)):
                raise _Bad(f"{_where(path)}: dict key {_show(key)} is not a string or a "
                           f"64-bit integer")
            marker = (type(key), key)
            if marker in keys:
                raise _Bad(f"{_where(path)}: duplicate dict key {_show(key)}")
            keys.add(marker)
            _check_node(child, (path, _tree.escape_segment(key)), arrays, used, depth + 1)
    elif kind == "state":
        value = node.get("value")
        if not (len(node) == 2 and isinstance(value, dict) and value.get("t") == "dict"):
            raise _Bad(f"{_where(path)}: a state node has exactly the members t and value "
                       f"(a dict node)")
        _check_node(value, path, arrays, used, depth + 1)
    elif kind == "array":
        index = node.get("index")
        if not (len(node) == 2 and _is_int(index) and 0 <= index < len(used)):
            raise _Bad(f"{_where(path)}: an array node has exactly the members t and index "
                       f"(0 <= index < {len(used)}), not {_show(node, 120)}")
        _use(index, path, arrays, used)
    elif kind == "dtensor":
        _check_dtensor(node, path, arrays, used)
    elif kind in _LEAF_KINDS:
        if set(node) != {"t", *_LEAF_KINDS[kind]}:
            raise _Bad(f"{_where(path)}: {_article(kind)} {kind} node has exactly the members "
                       f"{', '.join(('t',) + _LEAF_KINDS[kind])}")
        value = node.get("value")
        ok = {"none": True, "bool": isinstance(value, bool), "int": _is_int(value),
              "float": isinstance(value, str), "str": isinstance(value, str),
              "bytes": isinstance(value, str), "scalar": isinstance(value, str)}[kind]
        if not ok:
            raise _Bad(f"{_where(path)}: bad {kind} value {_show(value)}")
        try:
            _tree.decode_scalar(node)  # validates float/base64/dtype
        except (ValueError, TypeError, OverflowError) as exc:
            raise _Bad(f"{_where(path)}: bad {kind} value: {exc}") from exc
    else:
        raise _Bad(f"{_where(path)}: unknown node type {_show(kind)}")


def _use(index: int, path: _Path, arrays: tuple[ArraySpec, ...], used: list[int]) -> None:
    if used[index]:
        raise _Bad(f"{_where(path)}: arrays[{index}] is referenced twice (every array must "
                   f"be referenced exactly once)")
    used[index] = 1
    saved = arrays[index].path
    if _path_str(path, len(saved)) != saved:
        raise _Bad(f"{_where(path)}: arrays[{index}].path is {_show(saved)}, not this "
                   f"key path")


def _check_dtensor(node: dict[str, Any], path: _Path, arrays: tuple[ArraySpec, ...],
                   used: list[int]) -> None:
    """A sharded value: its global shape and this rank's piece (none if another rank holding
    the same piece wrote it), which must lie inside that shape."""
    shape, pieces, mesh = node.get("shape"), node.get("pieces"), node.get("mesh")
    if not (isinstance(mesh, list) and 1 <= len(mesh) <= 1 << 16
            and all(_is_int(r) and 0 <= r < 1 << 31 for r in mesh)):
        raise _Bad(f"{_where(path)}: a dtensor node's mesh is the list of its device mesh's "
                   f"ranks, not {_show(mesh, 120)}")
    if not (set(node) == {"t", "shape", "mesh", "pieces"} and isinstance(shape, list)
            and len(shape) <= _MAX_NDIM and all(_is_int(d) and 0 <= d < 1 << 62 for d in shape)
            and math.prod(shape) < 1 << 62 and isinstance(pieces, list) and len(pieces) <= 1):
        raise _Bad(f"{_where(path)}: a dtensor node has exactly the members t, shape (a list "
                   f"of sizes), mesh and pieces (at most one), not {_show(node, 120)}")
    for piece in pieces:
        if not (isinstance(piece, list) and len(piece) == 2 and _is_int(piece[0])
                and 0 <= piece[0] < len(used) and isinstance(piece[1], list)
                and len(piece[1]) == len(shape) and all(_is_int(o) and o >= 0 for o in piece[1])):
            raise _Bad(f"{_where(path)}: a dtensor piece is [array index, [offset per "
                       f"dimension]], not {_show(piece, 120)}")
        index, offset = piece
        _use(index, path, arrays, used)
        dims = arrays[index].shape
        if len(dims) != len(shape) or any(o + n > d for o, n, d in zip(offset, dims, shape)):
            raise _Bad(f"{_where(path)}: piece arrays[{index}] of shape {list(dims)} at offset "
                       f"{offset} does not fit in the global shape {shape}")


def _array_spec(doc: Any, i: int) -> ArraySpec:
    if not (isinstance(doc, dict) and len(doc) == 4 and "path" in doc and "dtype" in doc
            and "shape" in doc and "chunks" in doc):
        raise _Bad(f"arrays[{i}] must have exactly the members path, dtype, shape, chunks")
    path = doc["path"]
    if not isinstance(path, str):
        raise _Bad(f"arrays[{i}].path is not a string")
    try:
        dtype = _tree.str_to_dtype(doc["dtype"])
    except ValueError as exc:
        raise _Bad(f"arrays[{i}] ({_show(path)}): {exc}") from exc
    shape = doc["shape"]
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
            and all(_is_int(d) and 0 <= d < 1 << 62 for d in shape)):
        raise _Bad(f"arrays[{i}] ({_show(path)}): shape {_show(shape)} is not a list of at "
                   f"most {_MAX_NDIM} integers in [0, 2**62)")
    # numpy refuses a shape whose non-zero extents multiply past its index range, even an
    # empty one
    if math.prod(d for d in shape if d) * dtype.itemsize >= 1 << 62:
        raise _Bad(f"arrays[{i}] ({_show(path)}): shape {_show(shape)} of {dtype} is too "
                   f"large")
    nbytes = math.prod(shape) * dtype.itemsize
    if not isinstance(doc["chunks"], list):
        raise _Bad(f"arrays[{i}] ({_show(path)}): chunks must be a list")
    chunks = tuple(_chunk(c, i, path, j) for j, c in enumerate(doc["chunks"]))
    itemsize = dtype.itemsize
    total = 0
    for j, c in enumerate(chunks):
        if c.raw_len % itemsize:
            raise _Bad(f"arrays[{i}] ({_show(path)}) chunks[{j}]: raw_len {c.raw_len} is not "
                       f"a multiple of the item size {itemsize}")
        if c.filter != "none" and itemsize == 1:
            raise _Bad(f"arrays[{i}] ({_show(path)}) chunks[{j}]: shuffles 1-byte items")
        total += c.raw_len
    if total != nbytes:
        raise _Bad(f"arrays[{i}] ({_show(path)}): chunks hold {total} bytes, shape and dtype "
                   f"need {nbytes}")
    return ArraySpec(path, dtype, tuple(shape), chunks)


_CHUNK_MEMBERS = frozenset({"file", "offset", "stored_len", "raw_len", "codec", "filter", "crc32"})


def _chunk(doc: Any, i: int, path: str, j: int) -> Chunk:
    if not (isinstance(doc, dict) and doc.keys() == _CHUNK_MEMBERS):
        raise _Bad(f"arrays[{i}] ({_show(path)}) chunks[{j}]: a chunk has exactly the members "
                   f"file, offset, stored_len, raw_len, codec, filter, crc32")
    file, crc = doc["file"], doc["crc32"]
    offset, stored_len, raw_len = doc["offset"], doc["stored_len"], doc["raw_len"]
    codec, filt = doc["codec"], doc["filter"]
    problem = None
    if not (isinstance(file, str) and _SHARD_RE.match(file) and file != MANIFEST_NAME):
        problem = (f"chunk file name {_show(file)} is not allowed (a shard is a plain file "
                   f"name in the checkpoint directory)")
    elif not (isinstance(crc, str) and _CRC_RE.match(crc)):
        problem = f"crc32 {_show(crc)} is not 8 lowercase hex digits"
    elif not all(_is_int(n) and 0 <= n < 1 << 62 for n in (offset, stored_len, raw_len)):
        problem = "offset, stored_len and raw_len must be integers in [0, 2**62)"
    elif codec not in ("raw", "zstd"):
        problem = f"codec {_show(codec)} is not raw or zstd"
    elif filt not in ("none", "shuffle"):
        problem = f"filter {_show(filt)} is not none or shuffle"
    elif not 0 < raw_len <= MAX_CHUNK_RAW:
        problem = f"raw_len {raw_len} is not in [1, {MAX_CHUNK_RAW}]"
    elif stored_len == 0:
        problem = "empty chunk (stored_len 0)"
    elif codec == "raw" and stored_len != raw_len:
        problem = f"raw chunk stored_len {stored_len} != raw_len {raw_len}"
    elif codec == "zstd" and raw_len > MAX_ZSTD_RATIO * stored_len:
        problem = (f"a zstd frame of {stored_len} bytes cannot hold {raw_len} bytes "
                   f"(more than {MAX_ZSTD_RATIO}:1)")
    elif codec == "zstd" and stored_len > max_zstd_stored(raw_len):
        problem = (f"a zstd frame of {stored_len} bytes for {raw_len} raw bytes is larger "
                   f"than any zstd encoder writes")
    if problem is not None:
        raise _Bad(f"arrays[{i}] ({_show(path)}) chunks[{j}]: {problem}")
    return Chunk(file, offset, stored_len, raw_len, codec, filt, int(crc, 16))


def _check_ranges(arrays: tuple[ArraySpec, ...]) -> None:
    by_file: dict[str, list[tuple[int, int]]] = {}
    for spec in arrays:
        for c in spec.chunks:
            by_file.setdefault(c.file, []).append((c.offset, c.offset + c.stored_len))
    for file, ranges in by_file.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            _expect(start >= end, f"chunks overlap in {file} at offset {start}")
