"""PyTorch adapter: tensors as arrays, without importing torch unless the caller did.

Every function here is only reached when ``torch`` is already in ``sys.modules`` (the caller
passed a tensor or a torch object), so ``import asyncckpt`` never imports torch.

- CPU tensors are saved through a numpy view of their memory (no copy until the snapshot);
  bfloat16 / float8 go through a same-size integer view reinterpreted as the ml_dtypes type,
  so they round-trip bit-exactly without passing through float32.
- CUDA tensors are copied device-to-host by the snapshot into the page-locked arena
  (registered with CUDA once), with non-blocking copies on a side stream; the snapshot ends
  when that stream's copies are done.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["is_tensor", "is_dtensor", "dtensor_layout", "dtensor_local", "is_torch_object",
           "host_view", "numpy_dtype", "can_hold", "fresh_tensor", "copy_to_device",
           "register_host_memory", "cuda_snapshot", "device_staged_snapshot", "mesh_ranks"]

_BITS = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8",
         "float8_e4m3fnuz": "uint8", "float8_e5m2fnuz": "uint8", "float8_e8m0fnu": "uint8"}


def _torch() -> Any:
    return sys.modules.get("torch")


def is_tensor(value: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


_PLAIN: list[frozenset[type]] = []


def plain_tensor_types() -> frozenset[type]:
    """``torch.Tensor`` and ``nn.Parameter`` (exact types, no subclass), once torch is
    imported: what most leaves are, told apart by one set lookup."""
    if _PLAIN:
        return _PLAIN[0]
    torch = _torch()
    if torch is None:
        return frozenset()
    _PLAIN.append(frozenset({torch.Tensor, torch.nn.Parameter}))
    return _PLAIN[0]


def is_dtensor(value: object) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def dtensor_layout(value: Any, path: str
                   ) -> tuple[tuple[int, ...], tuple[int, ...], bool, list[int]]:
    """A DTensor's global shape, the global offset of this rank's local shard, whether
    this rank writes that shard (of ranks holding the same shard through ``Replicate``
    placements, only the one at mesh coordinate 0 along those mesh dimensions does), and
    the global ranks of its device mesh."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    placements = tuple(value.placements)
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"{path}: this DTensor has a Partial placement (values not reduced "
                         f"yet); call .redistribute() to Shard/Replicate placements first")
    odd = [p for p in placements if type(p) not in (Shard, Replicate)]
    if odd:  # e.g. _StridedShard (FSDP2 + TP): its local data is not one box of the whole
        raise ValueError(f"{path}: DTensor placement {odd[0]!r} is not supported (only Shard "
                         f"and Replicate); call .redistribute() or .full_tensor() first")
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"{path}: this rank is not in the DTensor's device mesh")
    _, offset = compute_local_shape_and_global_offset(value.shape, mesh, placements)
    writes = all(c == 0 for c, p in zip(coordinate, placements) if isinstance(p, Replicate))
    return (tuple(value.shape), tuple(int(o) for o in offset), writes,
            mesh_ranks(value))


def mesh_ranks(value: Any) -> list[int]:
    """The global ranks of a DTensor's device mesh, in mesh order."""
    return [int(r) for r in value.device_mesh.mesh.flatten().tolist()]


def dtensor_local(value: Any) -> tuple[Any, tuple[int, ...]]:
    """A DTensor target's local shard (restored in place) and its global offset."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh,
                                                      tuple(value.placements))
    return value.to_local(), tuple(int(o) for o in offset)


def is_torch_object(value: object) -> bool:
    """An nn.Module, optimizer, scheduler, ... (fresh leaves restored into it become tensors)."""
    return type(value).__module__.split(".")[0] == "torch"


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy (or ml_dtypes) dtype with the same bits as a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name in _BITS:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    if name == "bool":
        return np.dtype(bool)
    try:
        return np.dtype(name)
    except TypeError as exc:
        raise TypeError(f"torch dtype {dtype} has no numpy equivalent to save it as") from exc


def _torch_dtype(dtype: np.dtype) -> Any:
    torch = _torch()
    name = "bool" if dtype == np.dtype(bool) else dtype.name
    return getattr(torch, name)


def host_view(tensor: Any, path: str) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (same shape and strides, same bits)."""
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    try:
        bits = _bits_of(t.dtype)
        if bits is not None:
            return t.view(bits[0]).numpy().view(bits[1])
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"{path}: cannot save a tensor of dtype {t.dtype} "
                        f"({exc}); convert it first") from exc


_BITS_OF: dict[Any, tuple[Any, np.dtype] | None] = {}


def _bits_of(dtype: Any) -> tuple[Any, np.dtype] | None:
    """For a dtype numpy lacks (bfloat16, float8): the same-width integer torch dtype to view
    it as, and the ml_dtypes dtype to view the result as; None for the others."""
    if dtype not in _BITS_OF:
        name = str(dtype).removeprefix("torch.")
        _BITS_OF[dtype] = ((getattr(_torch(), _BITS[name]), numpy_dtype(dtype))
                           if name in _BITS else None)
    return _BITS_OF[dtype]


def can_hold(dtype: np.dtype) -> bool:
    """Whether a torch tensor can hold this dtype's bits as they are (native byte order)."""
    if dtype.name in _BITS:
        return True
    if dtype.kind not in "biufc" or not dtype.isnative:
        return False
    torch = _torch()
    name = "bool" if dtype == np.dtype(bool) else dtype.name
    return isinstance(getattr(torch, name, None), torch.dtype)


def fresh_tensor(shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, np.ndarray]:
    """A new CPU tensor for a loaded value and a numpy view to read into."""
    torch = _torch()
    name = dtype.name
    if name in _BITS:
        t = torch.empty(shape, dtype=getattr(torch, name))
        return t, t.view(getattr(torch, _BITS[name])).numpy().view(dtype)
    t = torch.empty(shape, dtype=_torch_dtype(dtype))
    return t, t.numpy()


def copy_to_device(tensor: Any, host: np.ndarray) -> None:
    """Copy restored host bytes into a (CUDA) tensor in place."""
    torch = _torch()
    name = str(tensor.dtype).removeprefix("torch.")
    if name in _BITS:
        src = torch.from_numpy(host.view(_BITS[name])).view(tensor.dtype)
    else:
        src = torch.from_numpy(host)
    with torch.no_grad():
        tensor.copy_(src)


def register_host_memory(arena: Any) -> None:
    """Register an arena with CUDA (page-locked for DMA) once."""
    if getattr(arena, "cuda_registered", False):
        return
    torch = _torch()
    rc = torch.cuda.cudart().cudaHostRegister(arena.address, arena.capacity, 0)
    arena.cuda_registered = int(rc) == 0


def _host_tensor(dst: np.ndarray, dtype: Any) -> Any:
    """A torch view of an arena view, with the tensor's own dtype."""
    torch = _torch()
    name = str(dtype).removeprefix("torch.")
    if name in _BITS:
        return torch.from_numpy(dst.view(_BITS[name])).view(dtype)
    return torch.from_numpy(dst)


def cuda_snapshot(jobs: list[tuple[np.ndarray, Any]]) -> Any:
    """Start device-to-host copies into arena views on a side stream; returns an event."""
    torch = _torch()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for dst, tensor in jobs:
            _host_tensor(dst, tensor.dtype).copy_(tensor.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record(stream)
    return event


class DeviceStaged:
    """A snapshot through spare device memory: ``copied`` completes after the on-device
    copy (the caller may then change its tensors), ``finish()`` waits for the copies on to
    the host and frees the device buffers."""

    def __init__(self, copied: list[Any], done: list[Any], buffers: list[Any]) -> None:
        self._copied, self._done, self._buffers = copied, done, buffers

    def synchronize(self) -> None:
        for event in self._copied:
            event.synchronize()

    def finish(self) -> None:
        for event in self._done:
            event.synchronize()
        self._buffers.clear()


_ALIGN = 256


def device_staged_snapshot(jobs: list[tuple[np.ndarray, Any]]) -> DeviceStaged | None:
    """Per GPU: one buffer in spare device memory, one batched on-device copy of every
    tensor into it (``torch._foreach_copy_``) on a side stream, then device-to-host copies
    from it into the arena on that stream. None (nothing started) when a GPU lacks the free
    memory: the caller takes the direct path."""
    torch = _torch()
    groups: dict[Any, list[tuple[np.ndarray, Any]]] = {}
    for dst, tensor in jobs:
        groups.setdefault(tensor.device, []).append((dst, tensor))
    sizes = {}
    for device, group in groups.items():
        sizes[device] = sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
                            for _, t in group)
        free, _ = torch.cuda.mem_get_info(device)
        if sizes[device] > free * 0.9:  # leave the training its headroom
            return None
    copied, done, buffers = [], [], []
    for device, group in groups.items():
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.device(device), torch.cuda.stream(stream):
            try:
                flat = torch.empty(sizes[device], dtype=torch.uint8, device=device)
            except torch.cuda.OutOfMemoryError:
                for event in done:  # earlier GPUs already started: let them finish
                    event.synchronize()
                return None
            views, offset = [], 0
            for _, tensor in group:
                n = tensor.numel() * tensor.element_size()
                views.append(flat[offset:offset + n].view(tensor.dtype).view(tensor.shape))
                offset += -(-n // _ALIGN) * _ALIGN
            torch._foreach_copy_(views, [t.detach() for _, t in group])
            copied.append(torch.cuda.Event())
            copied[-1].record(stream)
            for (dst, tensor), view in zip(group, views):
                _host_tensor(dst, tensor.dtype).copy_(view, non_blocking=True)
            done.append(torch.cuda.Event())
            done[-1].record(stream)
        buffers.append(flat)
    return DeviceStaged(copied, done, buffers)
