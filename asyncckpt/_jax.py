"""JAX adapter: ``jax.Array`` leaves, only reached when the caller already imported jax.

Snapshot: every jax leaf's device-to-host copy is started first (``copy_to_host_async``), then
each is read as a numpy array, which waits for that array's own computation only, never for
unrelated work. bfloat16 arrives as an ml_dtypes array. Restore: jax arrays are immutable, so
the restored value is a new array put on the target's own sharding (device), replacing it in
its container.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["is_array", "start_host_copy", "put_like"]


def is_array(value: object) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.Array)


def start_host_copy(value: Any) -> None:
    """Start the device-to-host transfer now; the snapshot thread reads it later."""
    try:
        value.copy_to_host_async()
    except (AttributeError, RuntimeError):
        pass


def put_like(host: np.ndarray, target: Any) -> Any:
    """A jax array holding ``host`` on ``target``'s sharding."""
    import jax
    return jax.device_put(host, target.sharding)
