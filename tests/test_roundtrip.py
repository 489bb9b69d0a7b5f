"""Round trips of every leaf kind, structure, key paths, and in-place restore."""

from __future__ import annotations

import os

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt._tree import escape_segment

rng = np.random.default_rng(1234)

ARRAYS = {
    "f32": rng.standard_normal((64, 33), dtype=np.float32),
    "f64": rng.standard_normal(1000),
    "f16": rng.standard_normal(77).astype(np.float16),
    "i8": rng.integers(-128, 127, 50, dtype=np.int8),
    "u64": rng.integers(0, 2**63, 9, dtype=np.uint64),
    "bool": rng.random(31) > 0.5,
    "c64": (rng.standard_normal(10) + 1j * rng.standard_normal(10)).astype(np.complex64),
    "c128": rng.standard_normal(4) * 1j,
    "zero_d": np.array(3.25),
    "empty": np.zeros((0, 5), dtype=np.float32),
    "fortran": np.asfortranarray(rng.standard_normal((17, 9))),
    "strided": rng.standard_normal((40, 40))[::3, ::2],
    "big_endian": np.arange(100, dtype=">i4"),
    "big_endian_f": np.linspace(0, 1, 13).astype(">f8"),
    "str": np.array(["a", "bcd", ""]),
    "bytes": np.array([b"xy", b"z"]),
    "datetime": np.array(["2026-01-01", "2026-11-23"], dtype="datetime64[D]"),
    "void": np.frombuffer(b"abcdefgh", dtype="V4"),
}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


async def test_every_array_kind_round_trips(tmp_path):
    ckpt = ac.Checkpoint(arrays=dict(ARRAYS))
    path = await ckpt.write(tmp_path / "c")
    loaded = await ac.load(path)
    assert set(loaded["arrays"]) == set(ARRAYS)
    for key, value in ARRAYS.items():
        assert _same(loaded["arrays"][key], np.array(value, order="C")), key


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
async def test_ml_dtypes_round_trip_bit_exact(tmp_path, name):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = getattr(ml_dtypes, name)
    raw = rng.integers(0, 256, 4096, dtype=np.uint8)
    value = raw.view(dtype) if np.dtype(dtype).itemsize == 1 else raw.view(np.uint16).view(dtype)
    ckpt = ac.Checkpoint(x=value)
    loaded = await ac.load(await ckpt.write(tmp_path / "c"))
    assert loaded["x"].dtype == np.dtype(dtype)
    assert loaded["x"].tobytes() == value.tobytes()


async def test_scalars_and_structure_round_trip_exactly(tmp_path):
    tree = {
        "ints": [0, -5, 2**100, True, False],
        "floats": (1.5, float("inf"), -0.0, 1e-310),
        "misc": {"s": "héllo/wörld", "b": b"\x00\xff", "n": None},
        3: {"nested": [(), [], {}]},
        "np": [np.float32(2.5), np.int16(-3), np.bool_(True), np.complex128(1 + 2j)],
    }
    ckpt = ac.Checkpoint(tree=tree, step=7, name="run")
    loaded = await ac.load(await ckpt.write(tmp_path / "c"))
    assert loaded["step"] == 7 and loaded["name"] == "run"
    got = loaded["tree"]
    assert got["ints"] == [0, -5, 2**100, True, False]
    assert [type(v) for v in got["ints"]] == [int, int, int, bool, bool]
    assert got["floats"][:2] == (1.5, float("inf"))
    assert str(got["floats"][2]) == "-0.0" and got["floats"][3] == 1e-310
    assert isinstance(got["floats"], tuple)
    assert got["misc"] == {"s": "héllo/wörld", "b": b"\x00\xff", "n": None}
    assert got[3] == {"nested": [(), [], {}]} and 3 in got and "3" not in got
    assert [type(v) for v in got["np"]] == [np.float32, np.int16, np.bool_, np.complex128]
    assert got["np"][0] == np.float32(2.5)
    nan = await ac.load(await ac.Checkpoint(x=float("nan")).write(tmp_path / "n"))
    assert nan["x"] != nan["x"]


async def test_int_and_str_keys_stay_distinct(tmp_path):
    tree = {1: np.ones(2), "1": np.zeros(2), "a/b": {"~x": 1}, "": 2}
    loaded = await ac.load(await ac.Checkpoint(t=tree).write(tmp_path / "c"))
    assert list(loaded["t"].keys()) == [1, "1", "a/b", ""]
    assert _same(loaded["t"][1], np.ones(2)) and _same(loaded["t"]["1"], np.zeros(2))
    assert loaded["t"]["a/b"] == {"~x": 1}


def test_key_path_escaping_is_unambiguous():
    assert escape_segment(1) == "1"
    assert escape_segment("1") == "~21"
    assert escape_segment("-7") == "~2-7"
    assert escape_segment("a/b") == "a~1b"
    assert escape_segment("~1") == "~01"
    assert escape_segment("x.y") == "x.y"
    samples = [1, "1", "a/b", "a~1b", "~1", "~21", "", -1, "-1"]
    assert len({escape_segment(s) for s in samples}) == len(samples)


async def test_unsupported_leaf_names_its_key_path(tmp_path):
    ckpt = ac.Checkpoint(model={"layers": [{"w": object()}]})
    with pytest.raises(TypeError, match=r"model/layers/0/w"):
        await ckpt.write(tmp_path / "c")
    with pytest.raises(TypeError, match=r"model/x"):
        await ac.Checkpoint(model={"x": np.array([object()])}).write(tmp_path / "c")
    with pytest.raises(TypeError, match=r"key"):
        await ac.Checkpoint(model={(1, 2): 1}).write(tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")


class Stateful:
    def __init__(self, w: np.ndarray, lr: float) -> None:
        self.w, self.lr, self.loaded = w, lr, None

    def state_dict(self) -> dict:
        return {"w": self.w, "lr": self.lr, "ids": {0: "a", 1: "b"}, "betas": (0.9, 0.99)}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state
        self.w, self.lr = state["w"], state["lr"]


async def test_state_dict_objects_round_trip_with_types(tmp_path):
    obj = Stateful(np.arange(6.0), 0.1)
    ckpt = ac.Checkpoint(opt=obj)
    path = await ckpt.write(tmp_path / "c")
    assert (await ac.load(path))["opt"]["ids"] == {0: "a", 1: "b"}
    w = obj.w
    obj.w[:] = -1
    obj.lr = 5.0
    (await ckpt.restore(path)).assert_consumed()
    assert obj.loaded["ids"] == {0: "a", 1: "b"} and obj.loaded["betas"] == (0.9, 0.99)
    assert obj.lr == 0.1 and obj.w is w and np.array_equal(w, np.arange(6.0))


async def test_restore_is_in_place_and_replaces_immutables(tmp_path):
    w = rng.standard_normal((300, 300)).astype(np.float32)
    fortran = np.asfortranarray(rng.standard_normal((5, 4)))
    model = {"w": w, "f": fortran, "cfg": (1, "x"), "n": 3}
    ckpt = ac.Checkpoint(model=model, step=10)
    path = await ckpt.write(tmp_path / "c")
    saved_w, saved_f = w.copy(), fortran.copy()
    w[:] = 0
    fortran[:] = 0
    model["cfg"] = (2, "y")
    model["n"] = 4
    ckpt.step = 11
    status = await ckpt.restore(path)
    status.assert_consumed()
    assert ckpt.model is model and model["w"] is w and model["f"] is fortran
    assert np.array_equal(w, saved_w) and np.array_equal(fortran, saved_f)
    assert model["cfg"] == (1, "x") and model["n"] == 3 and ckpt.step == 10


async def test_save_counter_and_paths(tmp_path):
    ckpt = ac.Checkpoint(x=np.ones(3))
    assert ckpt.save_counter == 0
    prefix = tmp_path / "deep" / "er" / "ckpt"
    first = await ckpt.save(prefix)
    second = await ckpt.save(str(prefix))
    assert first == f"{prefix}-1" and second == f"{prefix}-2"
    assert isinstance(first, str) and ckpt.save_counter == 2
    written = await ckpt.write(tmp_path / "manual")
    assert written == str(tmp_path / "manual") and ckpt.save_counter == 2
    assert (await ac.load(second))["save_counter"] == 2
    await ckpt.restore(first)
    assert ckpt.save_counter == 1
    with pytest.raises(AttributeError):
        ckpt.save_counter = 5


async def test_write_replaces_an_existing_checkpoint(tmp_path):
    ckpt = ac.Checkpoint(x=np.ones(1000))
    path = await ckpt.write(tmp_path / "c")
    ckpt.x = np.full(10, 7.0)
    await ckpt.write(tmp_path / "c")
    assert np.array_equal((await ac.load(path))["x"], np.full(10, 7.0))
    assert sorted(os.listdir(tmp_path)) == ["c"]


async def test_metrics_are_reported(tmp_path):
    ckpt = ac.Checkpoint(x=np.zeros(3 << 20, np.uint8), y=rng.standard_normal(1 << 18))
    assert ckpt.last_save_metrics is None
    await ckpt.write(tmp_path / "c")
    m = ckpt.last_save_metrics
    assert isinstance(m, ac.SaveMetrics)
    assert m.raw_bytes == (3 << 20) + (1 << 21)
    assert m.stored_bytes < m.raw_bytes  # the zeros compress
    assert 0 < m.snapshot_seconds <= m.total_seconds
    assert m.compressed_chunks >= 1 and m.chunks >= 2
    on_disk = sum(os.path.getsize(tmp_path / "c" / f) for f in os.listdir(tmp_path / "c")
                  if f.startswith("shard"))
    assert on_disk == m.stored_bytes


@pytest.mark.parametrize("options", [
    ac.CheckpointOptions(compression="none"),
    ac.CheckpointOptions(adaptive_compression=False, byte_shuffle=True),
    ac.CheckpointOptions(adaptive_compression=False, byte_shuffle=False, compression_level=5),
    ac.CheckpointOptions(chunk_bytes=4096, io_threads=3),
    ac.CheckpointOptions(fsync=False, page_lock=False, low_priority_threads=False),
])
async def test_options_round_trip(tmp_path, options):
    state = {"a": rng.standard_normal(50_000).astype(np.float32),
             "b": np.repeat(np.arange(100, dtype=np.int64), 300), "c": np.arange(7, dtype=np.int8)}
    path = await ac.Checkpoint(s=state).write(tmp_path / "c", options=options)
    loaded = await ac.load(path, options=options)
    for key, value in state.items():
        assert _same(loaded["s"][key], value)
