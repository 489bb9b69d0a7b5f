"""Several processes (torch.distributed, gloo on CPU), one checkpoint, one commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import asyncckpt as ac

pytest.importorskip("torch.distributed")
CHILD = os.path.join(os.path.dirname(__file__), "_dist_child.py")


def run_ranks(scenario: str, world: int, tmp_path) -> list[dict]:
    directory = tmp_path / "ckpts"
    directory.mkdir(exist_ok=True)
    init = tmp_path / f"init-{scenario}"
    procs = [subprocess.Popen([sys.executable, CHILD, scenario, str(r), str(world),
                               str(directory), str(init)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=180)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results.append({"rc": proc.returncode, "err": err[-2000:],
                        **(json.loads(lines[-1]) if lines else {})})
    return results


@pytest.mark.parametrize("world", [2, 4])
async def test_rank_local_and_replicated_round_trip(tmp_path, world):
    results = run_ranks("roundtrip", world, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    latest = results[0]["latest"]
    assert latest.endswith("ckpt-3") and {r["latest"] for r in results} == {latest}
    assert {tuple(r["kept"]) for r in results} == {tuple(results[0]["kept"])}
    for rank, r in enumerate(results):
        assert r["restored"] == latest and r["same_m"] and r["w_ok"] and r["step"] == 3
        assert r["rank_value"] == rank and r["tensor"] == float(rank)
    # Replicated bytes are written once, spread over the ranks.
    files = os.listdir(latest)
    shard_bytes = sum(os.path.getsize(os.path.join(latest, f)) for f in files if "shard" in f)
    model_bytes = (256 * 256 + 5 * 1000) * 4
    local_bytes = world * (20000 * 4 + 10 * 4)
    assert shard_bytes <= model_bytes + local_bytes + 4096
    assert len([f for f in files if "shard" in f]) == world
    # One plain process sees the replicated values once and each rank's own under rank/<r>.
    tree = await ac.load(latest)
    assert tree["model"]["w"].shape == (256, 256) and len(tree["model"]["layers"]) == 5
    for rank in range(world):
        assert tree[f"rank/{rank}"]["optimizer"]["m"][0] == rank * 100 + 3
        assert tree[f"rank/{rank}"]["optimizer"]["rank"] == rank
    assert "optimizer" not in tree and tree["save_counter"] == 3
    # ... and can restore just the replicated values, without torch.distributed.
    target = {"w": np.zeros((256, 256), np.float32),
              "layers": [np.zeros(1000, np.float32) for _ in range(5)]}
    status = await ac.Checkpoint(model=target, optimizer={}).restore(latest)
    status.expect_partial()
    assert np.array_equal(target["w"], tree["model"]["w"])
    assert "optimizer" in status.missing_keys
    assert ac.latest_checkpoint(tmp_path / "ckpts") == latest


def test_ranks_calling_in_a_different_order_get_a_clear_error(tmp_path):
    results = run_ranks("wrong_order", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    assert all(r["error"] for r in results)
    assert "rank 1" in results[0]["error"] and "same calls" in results[1]["error"]
    assert sorted(os.listdir(tmp_path / "ckpts")) == []


def test_a_failing_rank_fails_the_save_everywhere(tmp_path):
    results = run_ranks("rank_fails", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    for r in results:
        assert r["error"] and "rank 1" in r["error"]
        assert r["latest"] == r["first"]
    assert ac.latest_checkpoint(tmp_path / "ckpts") == results[0]["first"]
    assert [e for e in os.listdir(tmp_path / "ckpts") if "asyncckpt-tmp" in e] == []


def test_a_rank_killed_mid_save_commits_nothing(tmp_path):
    results = run_ranks("rank_dies", 2, tmp_path)
    assert results[1]["rc"] == 9
    survivor = results[0]
    assert survivor["rc"] == 0, survivor["err"]
    assert "rank 1" in survivor["error"] and "coordination_timeout" in survivor["error"]
    assert survivor["latest"] == survivor["first"]
    assert ac.latest_checkpoint(tmp_path / "ckpts") == survivor["first"]
    assert not any("asyncckpt-tmp" in e for e in os.listdir(tmp_path / "ckpts"))


def test_sync_manager_under_two_ranks(tmp_path):
    results = run_ranks("sync", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    assert results[0]["path"] == results[1]["path"] == results[0]["latest"]
    tree = ac.latest_checkpoint(tmp_path / "ckpts")
    assert tree == results[0]["path"]


@pytest.mark.parametrize("world", [2, 4])
def test_io_device_rank_alone_touches_the_filesystem(tmp_path, world):
    results = run_ranks("io_device", world, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    io = world - 1
    latest = results[io]["latest"]
    assert latest.endswith("ckpt-3") and {r["latest"] for r in results} == {latest}
    assert {tuple(r["kept"]) for r in results} == {tuple(results[io]["kept"])}
    for rank, r in enumerate(results):
        assert r["restored"] == latest and r["step"] == 3 and r["m_ok"] and r["w_ok"], r
        assert r["tensor"] == float(rank)
        if rank != io:  # the seam proof: no open, write, listing, rename or fsync at all
            assert r["calls"] == 0, r["some_calls"]
        else:  # ... while the same spy sees the I/O rank's
            assert r["calls"] > 50
    assert len([f for f in os.listdir(latest) if "shard" in f]) == world
    assert ac.latest_checkpoint(tmp_path / "ckpts") == latest


@pytest.mark.parametrize("scenario", ["io_dies", "io_eio"])
def test_io_device_failures_commit_nothing(tmp_path, scenario):
    results = run_ranks(scenario, 2, tmp_path)
    survivors = results[:1] if scenario == "io_dies" else results
    if scenario == "io_dies":
        assert results[1]["rc"] == 9
    for r in survivors:
        assert r["rc"] == 0, r["err"]
        assert r["error"] and "rank 1" in r["error"], r["error"]
        assert r["latest"] == r["first"]
    assert ac.latest_checkpoint(tmp_path / "ckpts") == survivors[0]["first"]
    assert not any("asyncckpt-tmp" in e for e in os.listdir(tmp_path / "ckpts"))


def test_io_rank_receives_a_stream_without_holding_it(tmp_path):
    """The other ranks' bytes are streamed chunk by chunk: the I/O rank writes each as it
    comes and never holds a rank's state (192 MiB here) in memory."""
    results = run_ranks("io_memory", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    assert results[1]["stored"] > 150 << 20  # random floats: the stream really was big
    # a few chunks in flight, not 192 MiB: in the first save (pools, threads and the gloo
    # group are made then, ~13 MiB) and in the second (nothing kept from the first, ~8 MiB)
    assert results[0]["first_kib"] < 48 << 10, results[0]
    assert results[0]["grew_kib"] < 48 << 10, results[0]


def test_dtensors_reshard_from_2_to_4_to_1_ranks(tmp_path):
    import torch
    saved = run_ranks("dtensor_save", 2, tmp_path)
    assert all(r["rc"] == 0 for r in saved), [r["err"] for r in saved]
    first = saved[0]["latest"]
    # Pieces are stored once: the replicated DTensor by one rank, the shards by their owners.
    tree = asyncio_run_load(first)
    rng = np.random.default_rng(1)
    big = rng.standard_normal((256, 1024), dtype=np.float32)
    rows = np.arange(13 * 7, dtype=np.float32).reshape(13, 7) + 1
    assert np.array_equal(tree["model"]["big"], big)
    assert np.array_equal(tree["model"]["rows"], rows)
    assert np.array_equal(tree["model"]["rep"], rows * 2)
    assert str(tree["model"]["cols"].dtype) == "bfloat16"
    assert tree["rank/1"]["own"].tolist() == [1, 1, 1]
    from asyncckpt import _reader, _tree
    import anyio
    manifest = anyio.run(_reader.read_manifest, first, backend="asyncio")
    pieces = _tree.dtensor_pieces(list(manifest.ranks))
    assert {k: len(v[(0, 1)]) for k, v in pieces.items()} == {
        "model/big": 2, "model/rows": 2, "model/cols": 2, "model/rep": 1}
    # 4 ranks restore the 2-rank checkpoint into their own shards, reading only what they need.
    resharded = run_ranks("dtensor_reshard", 4, tmp_path)
    assert all(r["rc"] == 0 for r in resharded), [r["err"] for r in resharded]
    for r in resharded:
        assert r["restored"] == first and r["in_place"], r
        assert all(r["same"].values()) and all(r["same_io"].values()), r
        # a quarter of "big" (its chunks are 64 KiB) and the small values; not half or all
        assert big.nbytes / 4 <= r["read"] < big.nbytes * 0.3, r["read"]
    latest = resharded[0]["latest"]
    # ... and one plain process restores the 4-rank checkpoint whole, into numpy and torch.
    again = np.random.default_rng(2).standard_normal((256, 1024), dtype=np.float32)
    target = {"big": np.zeros((256, 1024), np.float32), "rows": torch.zeros(13, 7),
              "cols": torch.zeros(5, 9, dtype=torch.bfloat16), "rep": np.zeros((13, 7), np.float32)}
    status = asyncio_run_restore(ac.Checkpoint(model=target), latest)
    status.assert_consumed()  # rank-local values of another world size are not offered
    one = run_ranks("dtensor_one", 1, tmp_path)  # and a 1-rank mesh, into its DTensors
    assert one[0]["rc"] == 0 and all(one[0]["same"].values()), one[0]
    assert np.array_equal(target["big"], again)
    assert torch.equal(target["rows"], torch.from_numpy(rows + 1))
    assert torch.equal(target["cols"],
                       torch.arange(5 * 9).reshape(5, 9).to(torch.bfloat16) + 2)
    assert np.array_equal(target["rep"], (rows + 1) * 2)


def asyncio_run_load(path):
    import anyio
    return anyio.run(ac.load, path, backend="asyncio")


def asyncio_run_write(ckpt, path):
    import anyio
    return anyio.run(ckpt.write, path, backend="asyncio")


def asyncio_run_restore(ckpt, path):
    import anyio
    return anyio.run(ckpt.restore, path, backend="asyncio")


def test_two_checkpoints_keep_their_coordination_apart(tmp_path):
    results = run_ranks("two_checkpoints", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    assert results[0]["paths"] == results[1]["paths"]
    assert [os.path.basename(p) for p in results[0]["paths"]] == ["ckpt-1", "ckpt-1",
                                                                  "ckpt-2", "ckpt-2"]


def test_collective_saves_run_one_at_a_time_in_start_order(tmp_path):
    results = run_ranks("collective_order", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    directory = tmp_path / "ckpts"
    expected = [str(directory / f"ckpt-{i}") for i in (1, 2, 3)]
    for r in results:
        assert r["errors"] == [], r["errors"]
        assert r["paths"] == r["waited"] == expected
        # One collective write at a time on each rank, in the order the saves started.
        assert r["events"] == [[kind, f"ckpt-{i}", depth] for i in (1, 2, 3)
                               for kind, depth in (("enter", 1), ("exit", 0))], r["events"]
        assert r["kept"] == expected and r["latest"] == expected[-1]
    assert ac.latest_checkpoint(directory) == expected[-1]
    # the state file lists them in commit order
    assert ac.CheckpointManager(ac.Checkpoint(), directory, max_to_keep=None).checkpoints \
        == expected
    for i, path in enumerate(expected, start=1):
        tree = asyncio_run_load(path)
        assert int(tree["step"]) == i and tree["save_counter"] == i
        for rank in range(2):
            assert (tree[f"rank/{rank}"]["optimizer"]["m"] == rank * 100 + i).all(), (path, rank)


CRITICAL = ("fsync", "fsync_dir", "rename", "replace", "exchange", "write_all", "remove_tree",
            "unlink")


def _crash_points(calls: list[str], exhaustive: bool) -> list[int]:
    if exhaustive:
        return list(range(len(calls) + 1))
    critical = [k for k, name in enumerate(calls) if name in CRITICAL]
    step = max(1, len(critical) // 7)
    return sorted(set(critical[::step] + [critical[-1], len(calls)]))


async def _check_after_crash(directory, k: int) -> None:
    """Old or new state, complete; and a new manager leaves no residue behind."""
    latest = ac.latest_checkpoint(directory)
    assert latest is not None and os.path.basename(latest) in ("ckpt-1", "ckpt-2"), (k, latest)
    number = int(latest.rsplit("-", 1)[1])
    tree = await ac.load(latest)
    for rank in range(2):
        assert int(tree[f"rank/{rank}"]["step"]) == number, k
        assert tree[f"rank/{rank}"]["optimizer"]["m"][0] == rank * 100 + number, k
    async with ac.CheckpointManager(ac.Checkpoint(), directory, max_to_keep=1) as manager:
        assert manager.latest_checkpoint == latest, k
    left = os.listdir(directory)
    marks = (".asyncckpt-tmp-", ".asyncckpt-deleting-", ".asyncckpt-old-", ".asyncckpt-retire")
    assert not [e for e in left if any(m in e for m in marks)], (k, left)
    for entry in left:
        if entry.startswith("ckpt-"):
            await ac.load(os.path.join(directory, entry))  # complete, or it would not be there


@pytest.mark.parametrize("exhaustive", [
    False, pytest.param(True, marks=pytest.mark.slow)], ids=["sampled", "every-call"])
async def test_killing_the_committing_rank_at_each_commit_step(tmp_path, exhaustive):
    """kill -9 of rank 0 at filesystem calls of its commit (from the gather of every rank's
    report to the end of retirement), over a directory holding one committed checkpoint."""
    import concurrent.futures
    (tmp_path / "count").mkdir()
    counted = run_ranks("commit_crash:-1", 2, tmp_path / "count")
    assert all(r["rc"] == 0 and r["error"] is None for r in counted), counted
    calls = counted[0]["calls"]
    assert "fsync" in calls and "rename" in calls and "remove_tree" in calls, calls
    points = _crash_points(calls, exhaustive)

    def crash(k: int) -> tuple[int, list[dict]]:
        base = tmp_path / f"k{k}"
        base.mkdir()
        return k, run_ranks(f"commit_crash:{k}", 2, base)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(crash, points))
    for k, (killed, survivor) in runs:
        if k < len(calls):
            assert killed["rc"] == 9, (k, killed["err"])
            assert survivor["rc"] == 0, (k, survivor["err"])
            if calls[k] == "remove_tree":  # deleting what it retired: after the commit
                assert survivor["error"] is None, (k, survivor)
            else:
                assert "rank 0" in survivor["error"], (k, survivor)
        await _check_after_crash(tmp_path / f"k{k}" / "ckpts", k)


def test_the_store_does_not_grow_with_the_number_of_saves(tmp_path):
    results = run_ranks("store_keys", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    counts = results[0]["counts"]
    assert max(counts[2:]) <= counts[1] + 2, counts


def test_a_damaged_chunk_sent_by_the_io_rank_fails_only_that_restore(tmp_path):
    results = run_ranks("io_damaged", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    assert results[0]["error"].startswith("CorruptCheckpointError") and "damaged" in \
        results[0]["error"]
    assert results[1]["error"] is None
    assert all(r["took"] < 5 for r in results), results  # nobody waits for a timeout
    assert results[0]["second"] == results[1]["second"]  # and the channel still works


def test_collective_operations_take_turns_through_the_io_rank(tmp_path):
    results = run_ranks("io_interleaved", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    for rank, r in enumerate(results):
        assert r["restored"] == rank * 100 + 1
    assert results[1]["tree_ok"]
    tree = asyncio_run_load(results[0]["export"])
    assert float(tree["rank/1"]["optimizer"]["m"][0]) == 101.0


def test_dtensors_of_the_same_name_on_different_meshes_stay_apart(tmp_path):
    (tmp_path / "ckpts").mkdir()
    whole = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) * 2
    asyncio_run_write(ac.Checkpoint(model={"w": whole}), tmp_path / "ckpts" / "plain")
    results = run_ranks("dtensor_stages", 4, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    assert all(r["same"] and r["from_plain"] for r in results), results
    assert all("s: DTensor placement" in r["refused"] for r in results), results


def test_replicated_globs():
    from asyncckpt._dist import assign_owners, compile_globs
    match = compile_globs(["model/**", "opt/*/lr", "x?"])
    assert match("model") and match("model/a/b/c") and match("opt/0/lr") and match("xy")
    assert not match("models/a") and not match("opt/0/1/lr") and not match("xyz")
    owners = assign_owners([("a", 100), ("b", 60), ("c", 50), ("d", 10)], 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}


def test_check_replicated_catches_ranks_that_differ(tmp_path):
    results = run_ranks("replicated_differ", 2, tmp_path)
    assert all(r["rc"] == 0 for r in results), [r["err"] for r in results]
    for r in results:
        assert r["error"] and "model/layers/2" in r["error"] and "rank 1" in r["error"]
    assert os.listdir(tmp_path / "ckpts") == []
