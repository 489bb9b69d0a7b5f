"""jax.Array leaves: saved from any device, restored onto the target's own devices."""

from __future__ import annotations

import numpy as np
import pytest

import asyncckpt as ac

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


async def test_jax_arrays_round_trip_including_bfloat16(tmp_path):
    key = jax.random.PRNGKey(0)
    params = {"w": jax.random.normal(key, (64, 32)),
              "bf": jax.random.normal(key, (100,)).astype(jnp.bfloat16),
              "i": jnp.arange(10, dtype=jnp.int32)}
    ckpt = ac.Checkpoint(params=params)
    path = await ckpt.write(tmp_path / "c")
    loaded = await ac.load(path)
    for k, v in params.items():
        assert loaded["params"][k].dtype == np.dtype(v.dtype)
        assert loaded["params"][k].tobytes() == np.asarray(v).tobytes()
    target = {k: jnp.zeros_like(v) for k, v in params.items()}
    restored = ac.Checkpoint(params=target)
    (await restored.restore(path)).assert_consumed()
    for k, v in params.items():
        got = restored.params[k]
        assert isinstance(got, jax.Array) and got.sharding == target[k].sharding
        assert np.asarray(got).tobytes() == np.asarray(v).tobytes()


async def test_jax_shape_mismatch_names_key(tmp_path):
    path = await ac.Checkpoint(w=jnp.ones((2, 3))).write(tmp_path / "c")
    with pytest.raises(ac.MismatchError, match=r"w.*\(2, 3\).*\(3, 2\)"):
        await ac.Checkpoint(w=jnp.ones((3, 2))).restore(path)
