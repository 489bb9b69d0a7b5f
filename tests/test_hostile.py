"""Hostile and damaged input: every file of a checkpoint is untrusted.

``load`` and ``restore`` must reject damage with ``CorruptCheckpointError`` (a restore may also
raise ``MismatchError`` where a manifest changed shapes or dtypes consistently), never with
another exception, a crash, a hang, a huge allocation or a file access outside the
checkpoint directory.

The malicious inputs are real checkpoints rewritten: the manifest's header line
(``asyncckpt-manifest 1 <len> <crc32>``) is recomputed so that the check under test is the one
reached, and chunk checksums are recomputed where the test is about what lies behind them.

The fuzz tests mutate real checkpoints. Where nothing was recomputed, a mutation must be
caught or change nothing. Where a checksum was recomputed the result may be a valid but
different checkpoint (a flipped '<' in a dtype reads '>'); then whatever load or restore
returns must equal an independent decoding of the mutated files (``reference_load``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
import zlib
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import asyncckpt as ac

GiB = 1 << 30


class Stateful:
    """A ``state_dict`` object (as a torch module or optimizer is)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


# ---------------------------------------------------------------------------------------------
# Building and rewriting checkpoints


def seal(body: bytes, *, version: int | str = 1, length: int | None = None,
         crc: int | None = None) -> bytes:
    """A manifest file: header line (length and crc recomputed unless given) + body."""
    length = len(body) if length is None else length
    crc = zlib.crc32(body) if crc is None else crc
    return f"asyncckpt-manifest {version} {length} {crc:08x}\n".encode() + body


def manifest_path(path: str) -> str:
    return os.path.join(path, "manifest.json")


def read_body(path: str) -> bytes:
    with open(manifest_path(path), "rb") as f:
        return f.read().split(b"\n", 1)[1]


def write_body(path: str, body: bytes, **header: Any) -> None:
    with open(manifest_path(path), "wb") as f:
        f.write(seal(body, **header))


def read_doc(path: str) -> dict:
    return json.loads(read_body(path))


def write_doc(path: str, doc: Any) -> None:
    write_body(path, json.dumps(doc).encode())


def rewrite(path: str, mutate: Callable[[dict], Any]) -> None:
    doc = read_doc(path)
    mutate(doc)
    write_doc(path, doc)


def chunk_bytes(path: str, chunk: dict) -> bytes:
    with open(os.path.join(path, chunk["file"]), "rb") as f:
        f.seek(chunk["offset"])
        return f.read(chunk["stored_len"])


def put_chunk(path: str, chunk: dict, stored: bytes, **changes: Any) -> None:
    """Append ``stored`` to the chunk's shard and point the chunk at it (crc recomputed)."""
    shard = os.path.join(path, chunk["file"])
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(stored)
    chunk.update(offset=offset, stored_len=len(stored), crc32=f"{zlib.crc32(stored):08x}")
    chunk.update(changes)


def find_array(doc: dict, path: str) -> dict:
    return next(a for a in doc["arrays"] if a["path"] == path)


def mixed_state() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        "model": {
            "w": np.arange(3000, dtype=np.float32).reshape(30, 100),
            "zeros": np.zeros(2500, np.float64),
            "noise": rng.integers(0, 256, 5000, dtype=np.uint8),
            "i16": np.arange(-1000, 1000, dtype=np.int16),
            "bf16": np.linspace(-2, 2, 700).astype(ml_dtypes.bfloat16),
            "c64": (np.arange(300) * (1 + 2j)).astype(np.complex64),
            "big_endian": np.arange(600, dtype=">i4"),
            "mask": np.arange(500) % 3 == 0,
            "text": np.array(["ab", "c", "déf"] * 10),
            "raw": np.array([b"x", b"yz\x00"] * 20, dtype="S4"),
            "when": np.arange(50).astype("M8[ns]"),
            "half": np.ones(1000, np.float16),
            "scalar0d": np.array(2.5),
            "empty": np.zeros((0, 3), np.float32),
        },
        "opt": Stateful({"state": {0: {"exp_avg": np.full(1200, 0.25, np.float32)},
                                   1: {"exp_avg": np.zeros(3, np.float32)}},
                         "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999)}]}),
        "step": 12,
        "meta": {"name": "run-7", "blob": b"\x00\xff", "f32": np.float32(1.5),
                 "i64": np.int64(-2), "none": None, "flag": True, "pair": (1, "a"),
                 "nan": float("nan"), 3: "int key", "3": "str key"},
    }


OPTIONS = {
    # every compressible chunk stored as zstd (byte-shuffled where the items are wider)
    "zstd": ac.CheckpointOptions(adaptive_compression=False, chunk_bytes=4096),
    "zstd_plain": ac.CheckpointOptions(adaptive_compression=False, byte_shuffle=False,
                                       chunk_bytes=8192),
    "raw": ac.CheckpointOptions(compression="none", chunk_bytes=4096),
    "adaptive": ac.CheckpointOptions(chunk_bytes=4096),
}


def write_checkpoint(path: str, state: dict, options: ac.CheckpointOptions) -> str:
    return asyncio.run(ac.Checkpoint(**state).write(path, options=options))


@pytest.fixture
def saved(tmp_path) -> str:
    """A small checkpoint with zstd (shuffled and plain) and raw chunks of many dtypes."""
    return write_checkpoint(str(tmp_path / "ckpt"), mixed_state(), OPTIONS["zstd"])


def restore_target(state: dict) -> ac.Checkpoint:
    """A restore target shaped like ``state``: arrays zeroed, other leaves replaced."""
    def blank(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return np.zeros_like(value)
        if isinstance(value, Stateful):
            return Stateful(blank(value.state))
        if isinstance(value, dict):
            return {k: blank(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(blank(v) for v in value)
        return "blank"
    return ac.Checkpoint(**{name: blank(value) for name, value in state.items()})


def assert_corrupt(path: str, match: str | None = None) -> None:
    """Both ``load`` and ``restore`` reject the checkpoint as corrupt."""
    async def both() -> None:
        with pytest.raises(ac.CorruptCheckpointError, match=match):
            await ac.load(path)
        with pytest.raises(ac.CorruptCheckpointError, match=match):
            await restore_target(mixed_state()).restore(path)
    asyncio.run(both())


def load(path: str) -> dict:
    return asyncio.run(ac.load(path))


# ---------------------------------------------------------------------------------------------
# The manifest as a whole


def test_the_fixture_round_trips(saved):
    tree = load(saved)
    assert same(tree, plain(mixed_state()) | {"save_counter": 0})
    codecs = {(c["codec"], c["filter"]) for a in read_doc(saved)["arrays"] for c in a["chunks"]}
    assert codecs == {("zstd", "shuffle"), ("zstd", "none"), ("raw", "none")}


@pytest.mark.parametrize("body", [
    b"", b"not json", b"{", b"[]", b"null", b"1", b'"asyncckpt"', b"\xff\xfe{}",
    b"\xef\xbb\xbf{}", b"{}", b'{"format": "asyncckpt"}', b"NaN", b"{} {}",
], ids=repr)
def test_bodies_that_are_not_a_manifest(saved, body):
    write_body(saved, body)
    assert_corrupt(saved, "invalid manifest")


@pytest.mark.parametrize("data", [
    b"", b"\n", b"asyncckpt-manifest 1\n{}", b"asyncckpt-manifest 1 2 00000000 \n{}",
    b"asyncckpt-manifest 01 2 00000000\n{}", b"asyncckpt-manifest 1 02 00000000\n{}",
    b"asyncckpt-manifest 1 2 0000000G\n{}", b"asyncckpt-manifest 1 2 0000000A\n{}",
    b"asyncckpt-manifest 1 99999999999 00000000\n{}", b"ASYNCCKPT-MANIFEST 1 2 00000000\n{}",
    b"asyncckpt-manifest -1 2 00000000\n{}", b"x" * 100,
], ids=repr)
def test_malformed_header_lines(saved, data):
    with open(manifest_path(saved), "wb") as f:
        f.write(data)
    assert_corrupt(saved, "manifest")


def test_checksum_length_and_trailing_bytes(saved):
    body = read_body(saved)
    write_body(saved, body, crc=zlib.crc32(body) ^ 1)
    assert_corrupt(saved, "checksum mismatch")
    write_body(saved, body, length=len(body) + 1)
    assert_corrupt(saved, "truncated or extended")
    with open(manifest_path(saved), "wb") as f:
        f.write(seal(body) + b"\n")
    assert_corrupt(saved, "truncated or extended")


def test_header_declaring_more_than_256_mib(saved):
    write_body(saved, read_body(saved), length=(256 << 20) + 1)
    assert_corrupt(saved, "more than the limit")


def test_manifest_file_larger_than_the_limit(saved):
    body = read_body(saved)
    write_body(saved, body)
    os.truncate(manifest_path(saved), (256 << 20) + 4096)  # sparse: cheap to make
    tracemalloc.start()
    try:
        assert_corrupt(saved, "more than a manifest can be")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # rejected from its size, not read


@pytest.mark.parametrize("version", ["2", "0", "999999999"])
def test_unknown_header_versions(saved, version):
    write_body(saved, read_body(saved), version=version)
    assert_corrupt(saved, f"format version {version} is not supported.*upgrade asyncckpt")


@pytest.mark.parametrize("version", [2, 0, "1", True, 1.0, None, [1]], ids=repr)
def test_unknown_body_versions(saved, version):
    rewrite(saved, lambda d: d.update(version=version))
    assert_corrupt(saved, "format/version")


@pytest.mark.parametrize("fmt", ["AsyncCkpt", "", None, 1])
def test_unknown_format_names(saved, fmt):
    rewrite(saved, lambda d: d.update(format=fmt))
    assert_corrupt(saved, "format/version")


def test_extra_and_missing_top_level_members(saved):
    rewrite(saved, lambda d: d.update(extra=1))
    assert_corrupt(saved, "top level")
    rewrite(saved, lambda d: (d.pop("extra"), d.pop("save_counter")))
    assert_corrupt(saved, "top level")


@pytest.mark.parametrize("counter", [-1, 1 << 63, 1.5, "3", True, None])
def test_bad_save_counters(saved, counter):
    rewrite(saved, lambda d: d.update(save_counter=counter))
    assert_corrupt(saved, "save_counter")


@pytest.mark.parametrize("where", ["top", "chunk", "node"])
def test_duplicate_json_keys(saved, where):
    body = read_body(saved).decode()
    if where == "top":
        body = body[:-1] + ',"save_counter":0}'
    elif where == "chunk":
        body = body.replace('"codec":', '"codec":"raw","codec":', 1)
    else:
        body = body.replace('"t":"int"', '"t":"int","t":"int"', 1)
    write_body(saved, body.encode())
    assert_corrupt(saved, "duplicate JSON key")


def test_duplicate_dict_node_keys(saved):
    def dup(doc: dict) -> None:
        items = doc["values"]["meta"]["items"]
        items.append(items[0])
    rewrite(saved, dup)
    assert_corrupt(saved, "duplicate dict key 'name'")


def test_int_and_str_keys_with_the_same_digits_are_distinct(saved):
    meta = load(saved)["meta"]
    assert meta[3] == "int key" and meta["3"] == "str key"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constants(saved, constant):
    body = read_body(saved).replace(b'"save_counter":0', b'"save_counter":' + constant.encode())
    write_body(saved, body)
    assert_corrupt(saved, "constant")


def _nest(body: bytes, depth: int) -> bytes:
    """Add a member ``"x"`` holding ``depth`` nested lists to the body's top-level object."""
    return body[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [513, 100_000])
def test_deeply_nested_json(saved, depth):
    write_body(saved, _nest(read_body(saved), depth))
    assert_corrupt(saved, "nested deeper than 512")


def test_deeply_nested_json_with_a_raised_recursion_limit_does_not_crash(saved):
    """json's C parser recurses per level: with the limit raised it used to overflow the
    C stack (a segfault) before the recursion limit was reached."""
    write_body(saved, _nest(read_body(saved), 400_000))
    code = textwrap.dedent(f"""
        import asyncio, sys
        import asyncckpt as ac
        sys.setrecursionlimit(10**7)
        try:
            asyncio.run(ac.load({saved!r}))
        except ac.CorruptCheckpointError as exc:
            print("rejected:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nested deeper than 512" in result.stdout


def test_brackets_and_quotes_inside_strings_are_not_nesting(saved):
    """The nesting check before json.loads must not count brackets inside strings, including
    after escaped quotes and backslashes."""
    tricky = '\\"' + "[" * 5000 + '\\\\' + "{" * 5000 + '"]]' + "\\u005b" * 600
    def add(doc: dict) -> None:
        doc["values"]["meta"]["items"].append(["tricky", {"t": "str", "value": tricky}])
    rewrite(saved, add)
    assert load(saved)["meta"]["tricky"] == tricky
    assert '\\"[[[' in read_body(saved).decode()


def test_huge_integers_are_rejected_even_with_the_digit_limit_off(saved):
    body = read_body(saved).replace(b'"save_counter":0', b'"save_counter":' + b"7" * 200_000)
    write_body(saved, body)
    assert_corrupt(saved, "4300 digits")
    code = textwrap.dedent(f"""
        import asyncio, sys, time
        import asyncckpt as ac
        sys.set_int_max_str_digits(0)
        t = time.perf_counter()
        try:
            asyncio.run(ac.load({saved!r}))
        except ac.CorruptCheckpointError as exc:
            print("rejected:", exc, time.perf_counter() - t)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert "more than 4300 digits" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The tree


def _nested(kind: str, depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value} if kind == "dict" else [value] if kind == "list" else Stateful(
            {"k": value})
    return value


@pytest.mark.parametrize("kind", ["dict", "list", "state"])
async def test_the_deepest_tree_that_can_be_saved_restores(tmp_path, kind):
    depth = {"dict": 100, "list": 100, "state": 50}[kind]   # a state object is two levels
    ckpt = ac.Checkpoint(x=_nested(kind, depth))
    path = await ckpt.write(tmp_path / "c")
    assert (await ac.load(path))["x"] is not None
    await ac.Checkpoint(x=_nested(kind, depth)).restore(path)
    with pytest.raises(ValueError, match="deeper than 100 levels"):
        await ac.Checkpoint(x=_nested(kind, depth + 1)).write(tmp_path / "d")


def test_tree_nested_too_deeply(saved):
    node: dict = {"t": "none"}
    for _ in range(101):
        node = {"t": "list", "items": [node]}
    rewrite(saved, lambda d: d["values"].update(deep=node))
    assert_corrupt(saved, "nested deeper than 100 levels")


@pytest.mark.parametrize("node, message", [
    ({"t": "pickle", "value": "gASVAAAA"}, "unknown node type"),
    ({"t": "list"}, "list node"),
    ({"t": "list", "items": {}}, "list node"),
    ({"t": "dict", "items": [["k"]]}, "pairs"),
    ({"t": "dict", "items": [[1.5, {"t": "none"}]]}, "dict key"),
    ({"t": "dict", "items": [[True, {"t": "none"}]]}, "dict key"),
    ({"t": "dict", "items": [[1 << 64, {"t": "none"}]]}, "64-bit"),
    ({"t": "dict", "items": [[None, {"t": "none"}]]}, "dict key"),
    ({"t": "state", "value": {"t": "list", "items": []}}, "state node"),
    ({"t": "int", "value": 1.0}, "int value"),
    ({"t": "int", "value": True}, "int value"),
    ({"t": "bool", "value": 1}, "bool value"),
    ({"t": "float", "value": 1.5}, "float value"),
    ({"t": "float", "value": "1.5"}, "float.hex"),
    ({"t": "float", "value": "infinity"}, "float.hex"),
    ({"t": "float", "value": "0x1p+99999999"}, "float"),
    ({"t": "float", "value": "spam"}, "float"),
    ({"t": "bytes", "value": "not base64!"}, "bytes"),
    ({"t": "bytes", "value": "QQ"}, "bytes"),
    ({"t": "str", "value": None}, "str value"),
    ({"t": "none", "value": None}, "none node"),
    ({"t": "scalar", "dtype": "<f4", "value": "AAAA"}, "3 bytes"),
    ({"t": "scalar", "dtype": "O", "value": "AAAAAAAAAAA="}, "dtype"),
    ({"t": "scalar", "dtype": "<U1", "value": base64.b64encode(b"\x00\x00\x11\x00").decode()},
     "code point"),
    ({"t": "array", "index": 0.0}, "array node"),
    ({"t": "array", "index": -1}, "array node"),
    ({"t": "array", "index": 10**6}, "array node"),
    ({"t": "array", "index": True}, "array node"),
    ("none", "node without a type"),
    ({"t": 5}, "node without a type"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_nodes(saved, node, message):
    rewrite(saved, lambda d: d["values"]["meta"]["items"].append(["bad", node]))
    assert_corrupt(saved, message)


def test_bad_tracked_names(saved):
    rewrite(saved, lambda d: d["values"].update(save_counter={"t": "none"}))
    assert_corrupt(saved, "tracked name")


def test_array_referenced_twice_or_never(saved):
    def twice(doc: dict) -> None:
        doc["values"]["again"] = doc["values"]["model"]["items"][0][1]
    rewrite(saved, twice)
    assert_corrupt(saved, "referenced twice")

    def never(doc: dict) -> None:
        del doc["values"]["again"]
        del doc["values"]["model"]["items"][0]
    rewrite(saved, never)
    assert_corrupt(saved, "not referenced")


def test_array_path_must_be_its_key_path(saved):
    rewrite(saved, lambda d: d["arrays"][0].update(path="model/elsewhere"))
    assert_corrupt(saved, "not this key path")


def test_a_long_key_above_many_leaves_is_not_copied_into_every_path(saved):
    """Key paths are built lazily: 20,000 leaves under a 2 MB key validate quickly."""
    node = {"t": "list", "items": [{"t": "none"}] * 20_000}
    rewrite(saved, lambda d: d["values"].update(
        wide={"t": "dict", "items": [["k" * 2_000_000, node]]}))
    assert len(load(saved)["wide"]["k" * 2_000_000]) == 20_000


def test_colliding_int_keys_are_rejected(saved):
    """Ints equal mod 2**61-1 hash alike: 20,000 of them made dict-key checks quadratic."""
    items = [[k * ((1 << 61) - 1), {"t": "none"}] for k in range(20_000)]
    rewrite(saved, lambda d: d["values"].update(keys={"t": "dict", "items": items}))
    assert_corrupt(saved, "64-bit")


# ---------------------------------------------------------------------------------------------
# Arrays


@pytest.mark.parametrize("shape, message", [
    ([-1, 100], "shape"), ([30, -100], "shape"), ([1 << 62, 1], "shape"),
    ([1 << 64], "shape"), ([30.0, 100], "shape"), (["30", 100], "shape"),
    ([True, 3000], "shape"), ("3000", "shape"), ([1] * 65 + [3000], "shape"),
    ([0, 1 << 61, 8], "too large"), ([1 << 40, 0, 1 << 40], "too large"),
    ([3000, 2], "chunks hold"), ([], "chunks hold"), ([0], "chunks hold"),
])
def test_bad_shapes(saved, shape, message):
    rewrite(saved, lambda d: find_array(d, "model/w").update(shape=shape))
    assert_corrupt(saved, message)


@pytest.mark.parametrize("dtype", [
    "O", "<f3", "<f4,<f4", "(2,)<f4", "float128", "|V0", "<U0", "<M8[0ns]", "<M8[xyz]",
    "<M8[99999999999s]", "bfloat17", "", 5, None, ["<f4"], "<f4 ", "f4\n",
])
def test_unknown_dtypes(saved, dtype):
    rewrite(saved, lambda d: find_array(d, "model/w").update(dtype=dtype))
    assert_corrupt(saved, "dtype")


def test_same_size_dtype_and_shape_changes_are_a_mismatch_for_restore(saved):
    rewrite(saved, lambda d: find_array(d, "model/w").update(dtype="<i4", shape=[100, 30]))
    tree = load(saved)
    assert tree["model"]["w"].dtype == np.int32 and tree["model"]["w"].shape == (100, 30)
    with pytest.raises(ac.MismatchError):
        asyncio.run(restore_target(mixed_state()).restore(saved))


@pytest.mark.parametrize("dtype", ["<U1", "|S4", "|V4"])
async def test_restore_into_a_fresh_torch_state_of_a_dtype_torch_lacks(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = await ac.Checkpoint(opt=opt).write(tmp_path / "c")
    rewrite(path, lambda d: next(a for a in d["arrays"] if a["shape"] == [2, 3]).update(
        dtype=dtype))
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())  # no state yet: new tensors
    with pytest.raises((ac.MismatchError, ac.CorruptCheckpointError)):
        await ac.Checkpoint(opt=fresh).restore(path)


async def test_restore_into_a_fresh_torch_state_of_a_big_endian_dtype(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = await ac.Checkpoint(opt=opt).write(tmp_path / "c")
    rewrite(path, lambda d: d["arrays"][0].update(dtype=">f4"))
    expected = (await ac.load(path))["opt"]
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    try:
        await ac.Checkpoint(opt=fresh).restore(path)
    except ac.MismatchError:
        return  # refusing is fine too
    restored = fresh.state_dict()["state"][0]
    key = next(k for k, v in expected["state"][0].items() if isinstance(v, np.ndarray)
               and v.dtype == np.dtype(">f4"))
    assert np.array_equal(restored[key].numpy(), expected["state"][0][key])


@pytest.mark.parametrize("members", [
    {"path": "model/w", "dtype": "<f4", "shape": [30, 100]},
    {"path": "model/w", "dtype": "<f4", "shape": [30, 100], "chunks": [], "extra": 1},
])
def test_bad_array_members(saved, members):
    def change(doc: dict) -> None:
        spec = find_array(doc, "model/w")
        chunks = spec["chunks"]
        spec.clear()
        spec.update(members)
        if "chunks" in members:
            spec["chunks"] = chunks
    rewrite(saved, change)
    assert_corrupt(saved, "members")


# ---------------------------------------------------------------------------------------------
# Chunks: names, ranges, sizes


@pytest.mark.parametrize("name", [
    "/etc/passwd", "../shard-00000.bin", "..", ".", "", "a/b", "sub/../shard-00000.bin",
    ".hidden", "manifest.json", "x" * 300, "shard\x00.bin", "shard-00000.bin\n", "-", 5, None,
    "C:\\shard", "~", "\u0130shard",
], ids=repr)
def test_shard_names_outside_the_directory_are_not_allowed(saved, name):
    rewrite(saved, lambda d: d["arrays"][0]["chunks"][0].update(file=name))
    assert_corrupt(saved, "not allowed")


_opened: list[str] | None = None  # paths opened while recording (an audit hook's view)


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _opened.append(os.fsdecode(args[0]))


_hooked = False


def opened_during(run: Callable[[], Any]) -> list[str]:
    """Every path ``open``ed (by any means) while ``run()`` runs."""
    global _opened, _hooked
    if not _hooked:  # audit hooks cannot be removed: one, idle outside this function
        sys.addaudithook(_audit)
        _hooked = True
    _opened = []
    try:
        run()
        return _opened
    finally:
        _opened = None


@pytest.mark.parametrize("name", ["../outside.bin", "/tmp/outside.bin", "..", "shard-00000.bin"])
def test_no_file_outside_the_checkpoint_is_opened(saved, name):
    outside = os.path.join(os.path.dirname(saved), "outside.bin")
    shutil.copy(os.path.join(saved, "shard-00000.bin"), outside)
    rewrite(saved, lambda d: d["arrays"][0]["chunks"][0].update(file=name))

    def run() -> None:
        if name == "shard-00000.bin":
            load(saved)
        else:
            assert_corrupt(saved, "not allowed")
    paths = opened_during(run)
    inside = os.path.realpath(saved) + os.sep
    assert paths and all(os.path.realpath(p).startswith(inside) for p in paths), paths


def test_no_pickle_anywhere():
    import asyncckpt
    package = os.path.dirname(asyncckpt.__file__)
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            text = open(os.path.join(package, name), encoding="utf-8").read()
            for word in ("pickle", "marshal", "shelve", "torch.load"):
                assert word not in text, f"{name} uses {word}"


def _place_shard(saved: str, make: Callable[[str], Any]) -> None:
    """Replace the shard with whatever ``make(path)`` creates there."""
    shard = os.path.join(saved, "shard-00000.bin")
    os.rename(shard, shard + ".orig")
    make(shard)


def test_symlinked_shard_is_never_followed(saved, tmp_path):
    outside = tmp_path / "outside.bin"
    shutil.copy(os.path.join(saved, "shard-00000.bin"), outside)  # even with the right bytes
    _place_shard(saved, lambda p: os.symlink(outside, p))
    assert_corrupt(saved, "not a regular file")
    shard = os.path.join(saved, "shard-00000.bin")
    os.unlink(shard)
    os.symlink(shard + ".orig", shard)  # pointing inside the checkpoint, too
    assert_corrupt(saved, "not a regular file")


def test_symlinked_manifest_is_never_followed(saved, tmp_path):
    outside = tmp_path / "manifest.json"
    shutil.move(manifest_path(saved), outside)
    os.symlink(outside, manifest_path(saved))
    assert_corrupt(saved, "manifest.json")


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "missing"])
def test_shard_that_is_not_a_regular_file(saved, kind):
    sockets = []

    def make(path: str) -> None:
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            os.mkdir(path)
        elif kind == "socket":
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path)
            sockets.append(sock)
    _place_shard(saved, make)
    try:
        assert_corrupt(saved, "missing or not a regular file")
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_manifest_that_is_not_a_regular_file(saved, kind):
    os.unlink(manifest_path(saved))
    (os.mkfifo if kind == "fifo" else os.mkdir)(manifest_path(saved))
    assert_corrupt(saved, "manifest.json")


@pytest.mark.parametrize("changes, message", [
    ({"offset": -1}, "offset"), ({"offset": 1 << 64}, "offset"), ({"offset": 1.0}, "offset"),
    ({"offset": "0"}, "offset"), ({"stored_len": 0}, "empty chunk"),
    ({"raw_len": 0}, "raw_len"), ({"raw_len": -4}, "raw_len"), ({"raw_len": 2 * GiB}, "raw_len"),
    ({"raw_len": 4094}, "multiple of the item size"), ({"codec": "lz4"}, "codec"),
    ({"codec": None}, "codec"), ({"filter": "delta"}, "filter"), ({"filter": ["none"]}, "filter"),
    ({"crc32": "1C291CA3"}, "crc32"), ({"crc32": 12345}, "crc32"), ({"crc32": "123"}, "crc32"),
])
def test_bad_chunk_members(saved, changes, message):
    rewrite(saved, lambda d: find_array(d, "model/w")["chunks"][0].update(changes))
    assert_corrupt(saved, message)


def test_missing_and_extra_chunk_members(saved):
    rewrite(saved, lambda d: find_array(d, "model/w")["chunks"][0].pop("crc32"))
    assert_corrupt(saved, "exactly the members")
    rewrite(saved, lambda d: find_array(d, "model/w")["chunks"][0].update(
        crc32="00000000", note="x"))
    assert_corrupt(saved, "exactly the members")


def test_raw_chunk_stored_and_raw_length_must_agree(saved):
    def change(doc: dict) -> None:
        chunk = find_array(doc, "model/noise")["chunks"][0]
        assert chunk["codec"] == "raw"
        chunk["stored_len"] -= 1
    rewrite(saved, change)
    assert_corrupt(saved, "raw chunk stored_len")


def test_offsets_past_the_end_of_the_shard(saved):
    size = os.path.getsize(os.path.join(saved, "shard-00000.bin"))
    rewrite(saved, lambda d: find_array(d, "model/w")["chunks"][-1].update(offset=size))
    assert_corrupt(saved, "truncated")


def test_overlapping_chunks(saved):
    def overlap(doc: dict) -> None:
        a, b = find_array(doc, "model/noise")["chunks"][:2]
        b["offset"] = a["offset"] + a["stored_len"] - 1
    rewrite(saved, overlap)
    assert_corrupt(saved, "overlap")


def test_chunk_ranges_are_checked_before_load_allocates(saved):
    """1 TiB of chunks whose ranges lie past the shard: rejected before ``np.empty``."""
    def huge(doc: dict) -> None:
        spec = find_array(doc, "model/zeros")
        first = spec["chunks"][0]
        spec["shape"] = [(1 << 40) // 8]
        spec["chunks"] = [dict(first, offset=10**9 + i * 40_000, stored_len=40_000,
                               raw_len=GiB) for i in range(1024)]
    rewrite(saved, huge)
    tracemalloc.start()
    try:
        assert_corrupt(saved, "truncated")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


# ---------------------------------------------------------------------------------------------
# zstd frames


def _zstd_chunk(doc: dict, path: str = "model/zeros") -> tuple[dict, dict]:
    spec = find_array(doc, path)
    chunk = next(c for c in spec["chunks"] if c["codec"] == "zstd")
    return spec, chunk


def _raw_of(saved: str, chunk: dict) -> bytes:
    return zstandard.ZstdDecompressor().decompress(chunk_bytes(saved, chunk))


def _with_frame(saved: str, frame: Callable[[bytes, bytes], bytes],
                path: str = "model/zeros") -> None:
    """Replace a zstd chunk's stored bytes by ``frame(stored, raw)``, crc recomputed."""
    doc = read_doc(saved)
    _, chunk = _zstd_chunk(doc, path)
    stored = chunk_bytes(saved, chunk)
    put_chunk(saved, chunk, frame(stored, _raw_of(saved, chunk)))
    write_doc(saved, doc)


def test_frame_declaring_another_content_size(saved):
    _with_frame(saved, lambda s, raw: zstandard.ZstdCompressor().compress(raw[:-8]))
    assert_corrupt(saved, "declares")


def test_frame_without_a_content_size(saved):
    _with_frame(saved, lambda s, raw: zstandard.ZstdCompressor(
        write_content_size=False).compress(raw))
    assert_corrupt(saved, "declares")


def test_frame_with_a_checksum_is_fine_and_a_wrong_checksum_is_not(saved):
    frame = {}
    def make(s: bytes, raw: bytes) -> bytes:
        frame["ok"] = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
        return frame["ok"]
    _with_frame(saved, make)
    assert same(load(saved), plain(mixed_state()) | {"save_counter": 0})
    _with_frame(saved, lambda s, raw: s[:-1] + bytes([s[-1] ^ 1]))
    assert_corrupt(saved, "zstd")


@pytest.mark.parametrize("extra", [
    b"\x00", b"garbage!", zstandard.ZstdCompressor().compress(b""),
    zstandard.ZstdCompressor().compress(b"more"),
    (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip",
], ids=["byte", "garbage", "empty frame", "second frame", "skippable frame"])
def test_data_after_the_frame(saved, extra):
    _with_frame(saved, lambda s, raw: s + extra)
    assert_corrupt(saved, "unused data")


def test_skippable_frame_before_the_frame(saved):
    def make(s: bytes, raw: bytes) -> bytes:
        return (0x184D2A50).to_bytes(4, "little") + len(raw).to_bytes(4, "little") + raw + s
    _with_frame(saved, make)
    assert_corrupt(saved, "not a zstd frame")


@pytest.mark.parametrize("header, message", [
    # FHD 0xC0: 8-byte content size, no single segment, no checksum, no dictionary;
    # window descriptor 0x90: 2**(10 + 18) bytes
    (b"\x28\xb5\x2f\xfd\xc0\x90", "window"),
    # FHD 0xC1: 8-byte content size, no single segment, a 1-byte dictionary id;
    # window descriptor 0x50: 1 MiB
    (b"\x28\xb5\x2f\xfd\xc1\x50\x07", "needs dictionary 7"),
], ids=["window over 128 MiB", "needs a dictionary"])
def test_frame_header_rewritten(saved, header, message):
    """A valid frame, its header rewritten to declare a 256 MiB window or dictionary 7."""
    def make(s: bytes, raw: bytes) -> bytes:
        real = zstandard.ZstdCompressor().compress(raw)
        blocks = real[zstandard.frame_header_size(real):]
        return header + len(raw).to_bytes(8, "little") + blocks
    _with_frame(saved, make)
    assert_corrupt(saved, message)


@pytest.mark.parametrize("damage", ["flip", "truncate", "random"])
def test_damaged_frames_behind_a_good_checksum(saved, damage):
    rng = np.random.default_rng(1)
    def make(s: bytes, raw: bytes) -> bytes:
        if damage == "flip":
            return s[:6] + bytes([s[6] ^ 0x40]) + s[7:]
        if damage == "truncate":
            return s[:-3]
        return s[:6] + rng.integers(0, 256, len(s) - 6, dtype=np.uint8).tobytes()
    _with_frame(saved, make, path="model/w")
    assert_corrupt(saved, "damaged")


def test_decompression_bomb_is_rejected_before_allocating(saved):
    """A 20-byte chunk claiming 1 GiB, 64 times: no zstd frame expands more than 32768-fold,
    so the manifest is rejected before ``load`` allocates 64 GiB."""
    def bomb(doc: dict) -> None:
        spec, chunk = _zstd_chunk(doc)
        spec["shape"] = [64 * GiB // 8]
        spec["chunks"] = [dict(chunk, offset=chunk["offset"], stored_len=20, raw_len=GiB)] + [
            dict(chunk, offset=10**6 + 20 * i, stored_len=20, raw_len=GiB) for i in range(63)]
    rewrite(saved, bomb)
    tracemalloc.start()
    try:
        assert_corrupt(saved, "cannot hold")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_frame_claiming_more_than_its_header_is_rejected_before_decoding(saved):
    """Within the 32768:1 bound, a frame that declares another content size is rejected from
    its header, before any output buffer is allocated for it."""
    frame = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    assert len(frame) < 4096
    doc = read_doc(saved)
    _, chunk = _zstd_chunk(doc)
    put_chunk(saved, chunk, frame)
    write_doc(saved, doc)
    tracemalloc.start()
    try:
        assert_corrupt(saved, "declares")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


async def test_a_real_highly_compressed_chunk_is_within_the_bound(tmp_path):
    """64 MiB of zeros in one chunk compresses close to 32768:1; it must still load."""
    state = {"z": np.zeros(64 << 20, np.uint8)}
    path = await ac.Checkpoint(**state).write(
        tmp_path / "c", options=ac.CheckpointOptions(chunk_bytes=64 << 20,
                                                     adaptive_compression=False,
                                                     compression_level=19))
    chunk = json.loads(open(manifest_path(path), "rb").read().split(b"\n", 1)[1])[
        "arrays"][0]["chunks"][0]
    assert chunk["codec"] == "zstd" and chunk["raw_len"] / chunk["stored_len"] > 30_000
    assert not (await ac.load(path))["z"].any()


def test_zstd_stored_length_far_above_the_raw_length(saved):
    def big(doc: dict) -> None:
        spec, chunk = _zstd_chunk(doc)
        chunk["stored_len"] = chunk["raw_len"] * 2 + 8192
    rewrite(saved, big)
    assert_corrupt(saved, "larger than any zstd encoder writes")


def test_unicode_array_with_invalid_code_points(saved):
    """numpy cannot even index such an array (SystemError): it is damage."""
    doc = read_doc(saved)
    spec = find_array(doc, "model/text")
    chunk = spec["chunks"][0]
    raw = bytearray(_raw_of(saved, chunk) if chunk["codec"] == "zstd" else
                    chunk_bytes(saved, chunk))
    raw[0:4] = (0x110000).to_bytes(4, "little")
    put_chunk(saved, chunk, bytes(raw), codec="raw", filter="none")
    write_doc(saved, doc)
    assert_corrupt(saved, "code point")


# ---------------------------------------------------------------------------------------------
# Fuzzing: mutated manifests and shards, from real checkpoints


def plain(value: Any) -> Any:
    """A tracked value as ``load`` returns it (state objects as their dicts)."""
    if isinstance(value, Stateful):
        return plain(value.state_dict())
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def same(a: Any, b: Any) -> bool:
    """Deep equality with exact types, dtypes, key types, and bit-exact floats/arrays."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        keys_a = {(type(k), k) for k in a}
        return keys_a == {(type(k), k) for k in b} and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return a.hex() == b.hex()
    return a == b


def reference_load(files: dict[str, bytes]) -> dict:
    """An independent decoding of a checkpoint the library accepted (no validation here)."""
    doc = json.loads(files["manifest.json"].split(b"\n", 1)[1])
    arrays = []
    for spec in doc["arrays"]:
        name = spec["dtype"]
        dtype = np.dtype(getattr(ml_dtypes, name) if hasattr(ml_dtypes, name) else name)
        raw = b""
        for c in spec["chunks"]:
            data = files[c["file"]][c["offset"]:c["offset"] + c["stored_len"]]
            if c["codec"] == "zstd":
                data = zstandard.ZstdDecompressor().decompress(data)
            if c["filter"] == "shuffle":
                n = len(data) // dtype.itemsize
                data = np.frombuffer(data, np.uint8).reshape(dtype.itemsize, n).T.tobytes()
            raw += data
        arrays.append(np.frombuffer(raw, dtype).reshape(spec["shape"]).copy())

    def value(node: dict) -> Any:
        kind = node["t"]
        if kind == "dict":
            return {k: value(v) for k, v in node["items"]}
        if kind in ("list", "tuple"):
            items = [value(v) for v in node["items"]]
            return items if kind == "list" else tuple(items)
        if kind == "state":
            return value(node["value"])
        if kind == "array":
            return arrays[node["index"]]
        if kind == "float":
            return float.fromhex(node["value"])
        if kind == "bytes":
            return base64.b64decode(node["value"])
        if kind == "scalar":
            name = node["dtype"]
            dtype = np.dtype(getattr(ml_dtypes, name) if hasattr(ml_dtypes, name) else name)
            return np.frombuffer(base64.b64decode(node["value"]), dtype)[0]
        return node.get("value")

    tree = {name: value(node) for name, node in doc["values"].items()}
    tree["save_counter"] = doc["save_counter"]
    return tree


class Base:
    """A real checkpoint held in memory: its files and what they decode to."""

    def __init__(self, files: dict[str, bytes], state: dict) -> None:
        self.files = files
        self.state = state
        self.tree = plain(state) | {"save_counter": 0}


@pytest.fixture(scope="module")
def bases() -> list[Base]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in OPTIONS.items():
            state = mixed_state()
            path = write_checkpoint(os.path.join(tmp, name), state, options)
            files = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
            base = Base(files, state)
            assert same(reference_load(files), base.tree)
            out.append(base)
    return out


EQUAL, CONSISTENT = "equal", "consistent"


def check(base: Base, files: dict[str, bytes], oracle: str, work: str) -> None:
    """Write ``files`` as a checkpoint, then load and restore it: each must raise
    CorruptCheckpointError (restore: or MismatchError, where ``oracle`` is CONSISTENT), or
    succeed with the original data (EQUAL: nothing was recomputed, so any change must be
    caught) or with exactly what the files decode to (CONSISTENT: checksums recomputed)."""
    path = os.path.join(work, "ckpt")
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    target = restore_target(base.state)

    async def run() -> tuple[Any, Any]:
        try:
            loaded = await ac.load(path)
        except ac.CorruptCheckpointError as exc:
            loaded = exc
        try:
            restored = await target.restore(path)
        except ac.CorruptCheckpointError as exc:
            restored = exc
        except ac.MismatchError as exc:
            if oracle == EQUAL:
                raise
            restored = exc
        return loaded, restored

    loaded, restored = asyncio.run(run())
    for what, outcome in (("load", loaded), ("restore", restored)):
        event(f"{what}: " + (outcome_kind(outcome) if isinstance(outcome, Exception) else "ok"))
    complete = not isinstance(restored, Exception) and not (restored.missing_keys
                                                            or restored.unexpected_keys)
    if complete:  # it read every array, as load does
        assert not isinstance(loaded, Exception), f"restore accepted what load rejected: {loaded}"
    if isinstance(loaded, Exception):
        return
    expected = base.tree if oracle == EQUAL else reference_load(files)
    assert same(loaded, expected), "load returned other data than the files hold"
    if complete:
        got = plain(target.tracked) | {"save_counter": target.save_counter}
        assert same(got, expected), "restore produced other data than the files hold"


def outcome_kind(exc: Exception) -> str:
    """A short class of an error, for hypothesis' statistics (--hypothesis-show-statistics)."""
    text = str(exc)
    if "invalid manifest: " in text:
        text = text.split("invalid manifest: ", 1)[1].split("; the checkpoint is damaged")[0]
        text = re.sub(r"^(values/.*?|arrays\[\d+\]( \(.*?\))?( chunks\[\d+\])?): ", "", text)
        return "manifest: " + re.sub(r"'[^']*'|-?\d+", "#", text)[:48]
    if "is damaged (" in text:
        return "chunk: " + re.sub(r"-?\d+", "#", text.split("is damaged (", 1)[1])[:40]
    return type(exc).__name__ + ": " + re.sub(r"-?\d+", "#", re.sub(r"/\S*", "", text))[:40]


def flip_insert_delete(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, byte in ops:
        if op == "insert":
            buf.insert(pos % (len(buf) + 1), byte)
        elif buf:
            pos %= len(buf)
            if op == "flip":
                buf[pos] ^= 1 << (byte % 8)
            elif op == "set":
                buf[pos] = byte
            else:
                del buf[pos]
    return bytes(buf)


byte_ops = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]),
                              st.integers(0, 1 << 20), st.integers(0, 255)),
                    min_size=1, max_size=4)
# ASYNCCKPT_FUZZ_SCALE=20 runs twenty times as many examples (a longer hunt for bugs).
SCALE = float(os.environ.get("ASYNCCKPT_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])


@pytest.fixture
def work(tmp_path) -> str:
    return str(tmp_path)


@settings(FUZZ, max_examples=examples(250))
@given(which=st.integers(0, 3), shard_ops=byte_ops, cut=st.integers(-64, 64),
       tail=st.binary(max_size=16))
def test_fuzz_shard_bytes(bases, work, which, shard_ops, cut, tail):
    """Flips, insertions, deletions, truncation and extension of the shard."""
    base = bases[which]
    files = dict(base.files)
    shard = flip_insert_delete(files["shard-00000.bin"], shard_ops)
    shard = shard[:len(shard) + cut] if cut < 0 else shard + tail[:cut]
    files["shard-00000.bin"] = shard
    check(base, files, EQUAL, work)


@settings(FUZZ, max_examples=examples(150))
@given(which=st.integers(0, 3), ops=byte_ops)
def test_fuzz_manifest_file_bytes(bases, work, which, ops):
    """Damage anywhere in manifest.json (header included), checksum left as it was."""
    base = bases[which]
    files = dict(base.files)
    files["manifest.json"] = flip_insert_delete(files["manifest.json"], ops)
    check(base, files, EQUAL, work)


@settings(FUZZ, max_examples=examples(300))
@given(which=st.integers(0, 3), ops=byte_ops)
def test_fuzz_manifest_body_bytes_with_checksum_recomputed(bases, work, which, ops):
    base = bases[which]
    files = dict(base.files)
    body = files["manifest.json"].split(b"\n", 1)[1]
    files["manifest.json"] = seal(flip_insert_delete(body, ops))
    check(base, files, CONSISTENT, work)


class Obj(list):
    """A JSON object as a list of [key, value] members (so duplicates can be made)."""


def dump(value: Any) -> str:
    if isinstance(value, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def slots(value: Any, out: list) -> list:
    """Every (container, position) in a parsed document."""
    if isinstance(value, Obj):
        for i, member in enumerate(value):
            out.append((value, i))
            slots(member[1], out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append((value, i))
            slots(item, out)
    return out


SPECIALS = [0, 1, -1, 2, 3, 4095, 4096, 65536, GiB, GiB + 1, 1 << 31, 1 << 62, 1 << 63, 1 << 64,
            -(1 << 63), 0.5, "raw", "zstd", "none", "shuffle", "<f4", ">f4", "<f8", "<i4",
            "|u1", "|b1", "<f2", "<c8", "bfloat16", "O", "<U1", "|S1", "<M8[ns]", "dict", "list",
            "tuple", "state", "array", "int", "float", "str", "bytes", "scalar", "t", "items",
            "value", "index", "nan", "inf", "0x1p+0", "AAAA", "AA==", "shard-00000.bin",
            "../shard-00000.bin", "manifest.json", "00000000", "ffffffff", "asyncckpt",
            "save_counter", "model/w", "", None, True, False, "[[[", "\\"]
json_values = st.one_of(st.sampled_from(SPECIALS), st.integers(-(1 << 70), 1 << 70),
                        st.text(max_size=6), st.floats(), st.builds(Obj), st.builds(list),
                        st.lists(st.sampled_from(SPECIALS[:20]), max_size=3))
json_ops = st.lists(st.tuples(st.sampled_from(["replace", "number", "delete", "duplicate",
                                               "retype", "rename", "move"]),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16), json_values),
                    min_size=1, max_size=3)


def mutate_json(doc: Any, ops: list) -> None:
    for op, at, other, new in ops:
        places = slots(doc, [])
        if not places:
            return
        container, i = places[at % len(places)]
        is_obj = isinstance(container, Obj)
        current = container[i][1] if is_obj else container[i]

        def put(value: Any) -> None:
            if is_obj:
                container[i] = [container[i][0], value]
            else:
                container[i] = value
        if op == "replace":
            put(new)
        elif op == "number":
            if isinstance(current, int) and not isinstance(current, bool):
                put([current + 1, current - 1, -current, 0, current * 2, current + 4096,
                     current // 2, current * 32768, current + (1 << 62)][other % 9])
            else:
                put(new)
        elif op == "delete":
            del container[i]
        elif op == "duplicate":
            container.insert(i + 1, json.loads(dump(container[i]),
                                               object_pairs_hook=lambda p: Obj(map(list, p))))
        elif op == "retype":
            put(str(current) if not isinstance(current, (str, list)) else
                [current] if isinstance(current, str) else
                Obj([[str(j), v] for j, v in enumerate(current)]) if not is_obj else None)
        elif op == "rename" and is_obj:
            container[i] = [new if isinstance(new, str) else str(new), current]
        elif op == "move":
            target, j = places[other % len(places)]
            value = target[j][1] if isinstance(target, Obj) else target[j]
            put(json.loads(dump(value), object_pairs_hook=lambda p: Obj(map(list, p))))


@settings(FUZZ, max_examples=examples(450))
@given(which=st.integers(0, 3), ops=json_ops)
def test_fuzz_manifest_json_structure(bases, work, which, ops):
    """Numbers changed, types changed, members deleted, duplicated, renamed or copied over
    others; the checksum recomputed so that validation is what is tested."""
    base = bases[which]
    files = dict(base.files)
    body = files["manifest.json"].split(b"\n", 1)[1]
    doc = json.loads(body, object_pairs_hook=lambda p: Obj(map(list, p)))
    mutate_json(doc, ops)
    files["manifest.json"] = seal(dump(doc).encode())
    check(base, files, CONSISTENT, work)


@settings(FUZZ, max_examples=examples(300))
@given(which=st.integers(0, 3), pick=st.integers(0, 1 << 16), ops=byte_ops,
       how=st.sampled_from(["bytes", "recompress", "truncate", "extend", "no size",
                            "checksum", "other size"]),
       tail=st.binary(min_size=1, max_size=8))
def test_fuzz_chunk_contents_behind_a_good_checksum(bases, work, which, pick, ops, how, tail):
    """A chunk's stored bytes replaced (damaged bytes, other zstd frames) and its checksum
    recomputed: what lies behind the checksum (zstd, byte shuffle, sizes) is tested."""
    base = bases[which]
    files = dict(base.files)
    doc = json.loads(files["manifest.json"].split(b"\n", 1)[1])
    chunks = [c for a in doc["arrays"] for c in a["chunks"]]
    chunk = chunks[pick % len(chunks)]
    shard = files[chunk["file"]]
    stored = shard[chunk["offset"]:chunk["offset"] + chunk["stored_len"]]
    raw = (zstandard.ZstdDecompressor().decompress(stored) if chunk["codec"] == "zstd"
           else stored)
    if how == "bytes":
        stored = flip_insert_delete(stored, ops)
    elif how == "recompress":
        stored = zstandard.ZstdCompressor().compress(flip_insert_delete(raw, ops))
    elif how == "truncate":
        stored = stored[:max(1, len(stored) - len(tail))]
    elif how == "extend":
        stored = stored + tail
    elif how == "no size":
        stored = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    elif how == "checksum":
        stored = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
        stored = flip_insert_delete(stored, ops) if tail[0] % 2 else stored
    else:
        stored = zstandard.ZstdCompressor().compress(raw + tail)
    chunk.update(offset=len(shard), stored_len=len(stored), crc32=f"{zlib.crc32(stored):08x}")
    if how in ("recompress", "no size", "checksum", "other size"):
        chunk["codec"] = "zstd"
    files[chunk["file"]] = shard + stored
    files["manifest.json"] = seal(json.dumps(doc).encode())
    check(base, files, CONSISTENT, work)


# ---------------------------------------------------------------------------------------------
# Sharded (DTensor) nodes

def _as_dtensor(saved: str, **node: Any) -> None:
    """Turn model/w (30 x 100) into a dtensor node holding it as its only piece."""
    def mutate(doc: dict) -> None:
        items = doc["values"]["model"]["items"]
        key, array = next(item for item in items if item[0] == "w")
        whole = {"t": "dtensor", "shape": [30, 100], "mesh": [0],
                 "pieces": [[array["index"], [0, 0]]]}
        whole.update(node)
        items[[k for k, _ in items].index("w")][1] = whole
    rewrite(saved, mutate)


def test_a_dtensor_node_with_one_whole_piece_loads(saved):
    _as_dtensor(saved)
    assert np.array_equal(load(saved)["model"]["w"], mixed_state()["model"]["w"])


@pytest.mark.parametrize("node, message", [
    ({"shape": [60, 100]}, "do not add up"),
    ({"shape": [30, 100, 1]}, "dtensor piece"),
    ({"pieces": [[0, [1, 0]]]}, "does not fit|referenced twice|key path"),
    ({"pieces": [[-1, [0, 0]]]}, "dtensor piece"),
    ({"pieces": [[0, [0]]]}, "dtensor piece"),
    ({"pieces": [[0, [0, 0]], [1, [0, 0]]]}, "dtensor node"),
    ({"shape": [1 << 40, 1 << 40]}, "dtensor node"),
    ({"shape": "30x100"}, "dtensor node"),
    ({"mesh": []}, "mesh"),
    ({"mesh": [-1]}, "mesh"),
    ({"extra": 1}, "dtensor node"),
])
def test_bad_dtensor_nodes(saved, node, message):
    _as_dtensor(saved, **node)
    assert_corrupt(saved, message)


def test_the_piece_overlap_sweep_agrees_with_comparing_every_pair():
    import itertools
    import random
    from asyncckpt._restore import _overlap
    rng = random.Random(5)
    for _ in range(3000):
        boxes = []
        for _ in range(rng.randint(1, 7)):
            lo = tuple(rng.randint(0, 5) for _ in range(2))
            boxes.append((lo, tuple(a + rng.randint(1, 3) for a in lo)))
        pairwise = any(all(max(a, c) < min(b, d) for a, b, c, d in zip(l1, h1, l2, h2))
                       for (l1, h1), (l2, h2) in itertools.combinations(boxes, 2))
        assert _overlap(sorted(boxes)) == pairwise, boxes
    grid = [((i * 2, j * 3), (i * 2 + 2, j * 3 + 3)) for i in range(300) for j in range(30)]
    assert not _overlap(sorted(grid))  # 9000 pieces: checked, not skipped
    assert _overlap(sorted(grid + [((101, 40), (102, 41))]))
