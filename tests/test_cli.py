"""python -m asyncckpt verify / ls / inspect."""

from __future__ import annotations

import os

import numpy as np
import pytest

import asyncckpt as ac
from asyncckpt.__main__ import main


@pytest.fixture
def managed(tmp_path):
    import anyio

    async def make() -> None:
        step = np.array(0)
        ckpt = ac.Checkpoint(model={"w": np.arange(5000.0), "b": np.zeros(3, np.int8)}, step=step)
        manager = ac.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
        for i in (10, 20, 30):
            step[...] = i
            await manager.save()
    anyio.run(make)
    return tmp_path


def test_verify_a_healthy_directory_and_checkpoint(managed, capsys):
    assert main(["verify", str(managed)]) == 0
    out = capsys.readouterr().out
    assert "ckpt-2" in out and "ckpt-3" in out and "DAMAGED" not in out
    assert main(["verify", str(managed / "ckpt-3")]) == 0


def test_verify_reports_damage_and_residue(managed, capsys):
    shard = managed / "ckpt-2" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.mkdir(managed / "ckpt-4.asyncckpt-tmp-0123")
    assert main(["verify", str(managed)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "ckpt-2" in out and "residue" in out
    assert main(["verify", str(managed / "ckpt-2")]) == 1
    (managed / "checkpoint").write_text("garbage: 1\n")
    assert main(["verify", str(managed)]) == 1
    assert "checkpoint" in capsys.readouterr().out


def test_ls_shows_step_size_and_latest(managed, capsys):
    assert main(["ls", str(managed)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["ckpt-2", "20"]
    assert lines[2].split()[:2] == ["ckpt-3", "30"] and lines[2].endswith("<- latest")


def test_inspect_shows_the_tree(managed, capsys):
    assert main(["inspect", str(managed / "ckpt-3")]) == 0
    out = capsys.readouterr().out
    assert "model: dict" in out and "w: array float64 [5000]" in out
    assert "b: array int8 [3]" in out and "step: array int64 []" in out


def test_bench_runs_small_and_writes_json(tmp_path, capsys):
    import json
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "4MiB", "--saves", "2", "--dir", str(tmp_path),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blocking per save" in text and "x memcpy" in text and "x write+fsync" in text
    figures = json.loads(out.read_text())
    assert figures["raw_bytes"] > 3 << 20 and len(figures["blocking_ms"]) == 2
    assert [e for e in os.listdir(tmp_path) if e != "bench.json"] == []  # cleaned up


@pytest.mark.parametrize("args, message", [
    (["--size", "12"], "1 MiB minimum"),
    (["--size", "lots"], "not a size"),
    (["--dir", "/nonexistent/dir"], "not a directory"),
])
def test_bench_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *args])
    assert message in capsys.readouterr().err


def test_parse_size_units():
    from asyncckpt._bench import parse_size
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("1.5GB") == 1_500_000_000
