"""PyTorch tensors, modules and optimizers (CPU here; CUDA tests are marked gpu)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import asyncckpt as ac

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64,
          torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2]


def _random(dtype, shape=(33, 17)):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point and dtype.itemsize == 1:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g, dtype=dtype)


def _bits(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_tensor_dtypes_round_trip_bit_exactly(tmp_path, dtype):
    t = _random(dtype)
    ckpt = ac.Checkpoint(t=t)
    path = await ckpt.write(tmp_path / "c")
    loaded = (await ac.load(path))["t"]
    assert isinstance(loaded, np.ndarray) and loaded.shape == tuple(t.shape)
    assert loaded.tobytes() == _bits(t)
    if dtype == torch.bfloat16:
        assert loaded.dtype == np.dtype(ml_dtypes.bfloat16)
    target = torch.zeros_like(t)
    (await ac.Checkpoint(t=target).restore(path)).assert_consumed()
    assert _bits(target) == _bits(t)


async def test_views_and_shared_storage(tmp_path):
    base = torch.arange(100, dtype=torch.float32)
    view = base.view(10, 10)[::2, 1::3]
    transposed = base.view(10, 10).t()
    ckpt = ac.Checkpoint(v=view, t=transposed, b=base)
    path = await ckpt.write(tmp_path / "c")
    loaded = await ac.load(path)
    assert np.array_equal(loaded["v"], view.numpy())
    assert np.array_equal(loaded["t"], transposed.numpy())
    target = torch.zeros(10, 10).t()  # non-contiguous restore target
    await ac.Checkpoint(t=target).restore(path)
    assert torch.equal(target, transposed)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


async def test_resumed_training_continues_bit_exactly(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    _train(model, opt, sched, 5, seed=1)
    ckpt = ac.Checkpoint(model=model, optimizer=opt, scheduler=sched)
    path = await ckpt.save(tmp_path / "ckpt")
    saved_state = copy.deepcopy(opt.state_dict())
    _train(model, opt, sched, 4, seed=2)
    reference = [p.detach().clone() for p in model.parameters()]

    fresh_model = _model()
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1.0, betas=(0.5, 0.5))
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=3, gamma=0.5)
    params_before = list(fresh_model.parameters())
    restored = ac.Checkpoint(model=fresh_model, optimizer=fresh_opt, scheduler=fresh_sched)
    (await restored.restore(path)).assert_consumed()
    assert list(fresh_model.parameters()) == params_before  # same tensor objects
    got = fresh_opt.state_dict()
    assert got["param_groups"][0]["betas"] == (0.9, 0.99)          # tuple stays a tuple
    assert sorted(got["state"]) == sorted(saved_state["state"])     # int parameter ids
    assert all(isinstance(k, int) for k in got["state"])
    _train(fresh_model, fresh_opt, fresh_sched, 4, seed=2)
    for a, b in zip(fresh_model.parameters(), reference):
        assert torch.equal(a, b)


async def test_load_gives_numpy_and_python_types(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1), 1, seed=0)
    path = await ac.Checkpoint(model=model, optimizer=opt).write(tmp_path / "c")
    tree = await ac.load(path)
    assert isinstance(tree["model"]["0.weight"], np.ndarray)
    assert tree["model"]["1.num_batches_tracked"].dtype == np.int64
    group = tree["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == 0.1 and group["params"] == list(range(len(group["params"])))
    assert group["nesterov"] is False


async def test_tensor_shape_mismatch_names_key(tmp_path):
    path = await ac.Checkpoint(w=torch.ones(3, 4)).write(tmp_path / "c")
    target = torch.zeros(4, 3)
    with pytest.raises(ac.MismatchError, match=r"w.*\(3, 4\).*\(4, 3\)"):
        await ac.Checkpoint(w=target).restore(path)
    assert torch.equal(target, torch.zeros(4, 3))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
async def test_cuda_tensors_snapshot_and_restore_in_place(tmp_path):
    t = torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16)
    ckpt = ac.Checkpoint(t=t)
    path = await ckpt.write(tmp_path / "c")
    expected = t.clone()
    t.zero_()
    (await ckpt.restore(path)).assert_consumed()
    assert t.device.type == "cuda" and torch.equal(t, expected)
    assert ckpt.last_save_metrics.page_locked


async def test_device_staging_has_no_effect_without_cuda_tensors(tmp_path):
    t = torch.arange(1000, dtype=torch.float32)
    ckpt = ac.Checkpoint(t=t)
    await ckpt.write(tmp_path / "c", ac.CheckpointOptions(device_staging=True))
    assert ckpt.last_save_metrics.device_staged is False
    with pytest.raises(ValueError, match="device_staging must be True or False"):
        ac.CheckpointOptions(device_staging="yes")


@pytest.mark.gpu
@cuda
async def test_device_staging_snapshot_returns_before_the_copy_to_host(tmp_path):
    """The caller may change its tensors once start_save returned, while the copy to the
    host still runs: what was saved is the state at the call."""
    tensors = {f"t{i}": torch.randn(1 << 22, device="cuda") for i in range(8)}
    expected = {k: v.clone() for k, v in tensors.items()}
    options = ac.CheckpointOptions(device_staging=True)
    ckpt = ac.Checkpoint(**tensors)
    async with ac.CheckpointManager(ckpt, tmp_path, max_to_keep=1, options=options) as manager:
        handle = await manager.start_save()
        for v in tensors.values():
            v.fill_(7.0)  # right away, on the training stream
        await handle.wait()
    assert handle.metrics.device_staged
    (await ckpt.restore(handle.path)).assert_consumed()
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors)


@pytest.mark.gpu
@cuda
async def test_device_staging_falls_back_when_the_memory_is_not_free(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1 << 40))
    t = torch.randn(1 << 20, device="cuda")
    ckpt = ac.Checkpoint(t=t)
    path = await ckpt.write(tmp_path / "c", ac.CheckpointOptions(device_staging=True))
    assert ckpt.last_save_metrics.device_staged is False
    expected = t.clone()
    t.zero_()
    await ckpt.restore(path)
    assert torch.equal(t, expected)
