"""Mismatches, partial restores and damaged checkpoints."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

import asyncckpt as ac


@pytest.fixture
async def saved(tmp_path):
    state = {"w": np.arange(20_000, dtype=np.float32).reshape(100, 200),
             "z": np.zeros(300_000, dtype=np.float64), "b": np.ones(3)}
    ckpt = ac.Checkpoint(model=state, step=3)
    path = await ckpt.write(tmp_path / "c", options=ac.CheckpointOptions(chunk_bytes=1 << 16))
    return path, state


async def test_shape_and_dtype_mismatch_name_key_and_modify_nothing(saved):
    path, _ = saved
    target = {"w": np.zeros((100, 201), np.float32), "z": np.full(300_000, 5.0), "b": np.ones(3)}
    ckpt = ac.Checkpoint(model=target, step=0)
    with pytest.raises(ac.MismatchError, match=r"model/w.*\(100, 200\).*\(100, 201\)"):
        await ckpt.restore(path)
    assert (target["z"] == 5.0).all() and ckpt.step == 0 and ckpt.save_counter == 0
    target["w"] = np.zeros((100, 200), np.float64)
    with pytest.raises(ValueError, match=r"model/w.*float32.*float64"):
        await ckpt.restore(path)
    target["w"] = {"not": "an array"}
    with pytest.raises(ac.MismatchError, match="model/w"):
        await ckpt.restore(path)
    assert (target["z"] == 5.0).all()


async def test_partial_restores_report_keys(saved):
    path, state = saved
    ckpt = ac.Checkpoint(model={"w": np.zeros((100, 200), np.float32), "extra": np.ones(2)})
    status = await ckpt.restore(path)
    assert set(status.unexpected_keys) == {"model/z", "model/b", "step"}
    assert set(status.missing_keys) == {"model/extra"}
    with pytest.raises(ac.IncompleteRestoreError, match="expect_partial"):
        status.assert_consumed()
    with pytest.raises(AssertionError):
        status.assert_existing_objects_matched()
    status.expect_partial()
    assert np.array_equal(ckpt.model["w"], state["w"])


async def test_restore_none_is_a_no_op():
    ckpt = ac.Checkpoint(x=np.ones(2))
    status = await ckpt.restore(None)
    with pytest.raises(AssertionError):
        status.assert_consumed()
    assert np.array_equal(ckpt.x, np.ones(2))


def _shard_files(path):
    return sorted(f for f in os.listdir(path) if f.startswith("shard"))


async def test_flipped_byte_in_shard_is_detected(saved):
    path, _ = saved
    for name in _shard_files(path):
        with open(os.path.join(path, name), "r+b") as f:
            f.seek(os.path.getsize(os.path.join(path, name)) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ac.CorruptCheckpointError, match="damaged"):
        await ac.load(path)


async def test_truncated_and_missing_shards_are_detected(saved):
    path, _ = saved
    name = _shard_files(path)[0]
    shard = os.path.join(path, name)
    os.truncate(shard, os.path.getsize(shard) - 1)
    with pytest.raises(ac.CorruptCheckpointError, match="truncated"):
        await ac.load(path)
    os.unlink(shard)
    with pytest.raises(ac.CorruptCheckpointError, match="missing"):
        await ac.load(path)


async def test_symlinked_shard_is_rejected(saved, tmp_path):
    path, _ = saved
    name = _shard_files(path)[0]
    shard = os.path.join(path, name)
    os.rename(shard, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", shard)
    with pytest.raises(ac.CorruptCheckpointError):
        await ac.load(path)


def _rewrite_manifest(path, mutate):
    mpath = os.path.join(path, "manifest.json")
    data = open(mpath, "rb").read()
    header, body = data.split(b"\n", 1)
    doc = json.loads(body)
    mutate(doc)
    body = json.dumps(doc).encode()
    with open(mpath, "wb") as f:
        f.write(f"asyncckpt-manifest 1 {len(body)} {zlib.crc32(body):08x}\n".encode() + body)


@pytest.mark.parametrize("damage", [
    lambda data: data[:-1],
    lambda data: data + b" ",
    lambda data: data.replace(b'"save_counter":0', b'"save_counter":1'),
    lambda data: b"not a manifest",
    lambda data: b"",
    lambda data: data.replace(b"asyncckpt-manifest 1 ", b"asyncckpt-manifest 2 "),
])
async def test_damaged_manifest_is_detected(saved, damage):
    path, _ = saved
    mpath = os.path.join(path, "manifest.json")
    data = open(mpath, "rb").read()
    with open(mpath, "wb") as f:
        f.write(damage(data))
    with pytest.raises(ac.CorruptCheckpointError):
        await ac.load(path)
    with pytest.raises(ac.CorruptCheckpointError):
        await ac.Checkpoint(model={}).restore(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=2), "format/version"),
    (lambda d: d["arrays"][0].update(shape=[100, 201]), "chunks hold"),
    (lambda d: d["arrays"][0].update(dtype="O"), "dtype"),
    (lambda d: d["arrays"][0]["chunks"][0].update(file="../evil"), "not allowed"),
    (lambda d: d["arrays"][0]["chunks"][0].update(file="/etc/passwd"), "not allowed"),
    (lambda d: d["arrays"][0]["chunks"][1].update(
        file=d["arrays"][0]["chunks"][0]["file"], offset=d["arrays"][0]["chunks"][0]["offset"]),
     "overlap"),
    (lambda d: d["arrays"][0]["chunks"][0].update(offset=1 << 40), "truncated"),
    (lambda d: d["arrays"][0]["chunks"][0].update(codec="lz4"), "codec"),
    (lambda d: d["values"]["model"].update(t="pickle"), "node type"),
    (lambda d: d["arrays"].append(d["arrays"][0]), "exactly once"),
])
async def test_well_formed_but_invalid_manifests_are_rejected(saved, mutate, message):
    path, _ = saved
    _rewrite_manifest(path, mutate)
    with pytest.raises(ac.CorruptCheckpointError, match=message):
        await ac.load(path)


async def test_restoring_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ac.RestoreError, match="no checkpoint"):
        await ac.load(tmp_path / "nope")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(ac.CorruptCheckpointError, match="manifest.json is missing"):
        await ac.load(tmp_path / "empty")
