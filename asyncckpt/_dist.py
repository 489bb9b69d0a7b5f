"""Many processes, one checkpoint: which ranks take part, and the store they meet in.

A :class:`Coordinator` names this rank, the world, the committing rank (rank 0, or the I/O
rank of ``CheckpointOptions(experimental_io_device=...)``) and the key-value store behind the
process group. The collective save and restore themselves are in :mod:`._collective`.
Replicated keys (``Checkpoint(replicated=[globs])``) are written once, each by one rank:
replicated arrays are assigned, largest first, to the rank with the fewest bytes so far (ties
to the lowest rank), so the write work is spread over the ranks.

Coordination never issues collectives on the training's process group: it only uses the
key-value store behind it (``set`` / ``wait`` / ``get``, thread-safe, called from worker
threads), so a background save cannot deadlock or reorder against the training's own
collectives. Every wait is bounded by ``CheckpointOptions.coordination_timeout``; a timeout
names each rank that did not arrive. Each checkpoint draws its own key namespace on first use.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import anyio

from ._errors import SaveError

__all__ = ["Coordinator", "CoordinationError", "compile_globs", "assign_owners", "assemble"]


def compile_globs(patterns: list[str] | tuple[str, ...]) -> Callable[[str], bool]:
    """Key-path globs: ``*`` and ``?`` stay within one segment, ``**`` spans any number
    (including none: ``model/**`` matches ``model`` itself)."""
    regexes = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"replicated patterns must be non-empty strings, got {pattern!r}")
        parts = []
        for i, segment in enumerate(pattern.split("/")):
            if segment == "**":
                parts.append("(?:/.*)?" if i else "(?:.*)")
                continue
            text = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                           for c in segment)
            parts.append(("/" if i else "") + text)
        regexes.append(re.compile("".join(parts) + r"\Z"))
    return lambda path: any(r.match(path) for r in regexes)


def assign_owners(sizes: list[tuple[str, int]], world: int) -> dict[str, int]:
    """Which rank writes each replicated array (same answer on every rank)."""
    loads = [0] * world
    owners = {}
    for path, nbytes in sorted(sizes, key=lambda item: (-item[1], item[0])):
        rank = loads.index(min(loads))
        owners[path] = rank
        loads[rank] += nbytes
    return owners


_NAMESPACES: dict[str, Any] = {}  # process group -> how many checkpoints used it


class CoordinationError(SaveError):
    """Ranks did not meet within ``coordination_timeout`` (the message names them)."""


@dataclass
class Coordinator:
    """The ranks of one process group, and the store they meet in."""

    rank: int
    world: int
    store: Any
    timeout: float
    counter: list[Any]
    io_rank: int | None = None   # the one rank that touches the filesystem (None: all do)
    channel: Any = None          # its byte streams (a ``_transport.Channel``) when io_rank is set

    @property
    def committer(self) -> int:
        """The rank that writes the manifest, commits and keeps the state file."""
        return 0 if self.io_rank is None else self.io_rank

    @property
    def touches_files(self) -> bool:
        return self.io_rank is None or self.rank == self.io_rank

    @classmethod
    def current(cls, process_group: Any, timeout: float, counter: list[Any]
                ) -> Coordinator | None:
        """The ranks of ``process_group`` (None: the default group), or None in a single
        process. ``counter`` is the checkpoint's ``[namespace, operations so far, keys to
        delete, manager views so far]``; the
        namespace is drawn on its first collective use (the same draw on every rank, as
        every rank makes the same calls), so two checkpoints never read each other's keys."""
        dist = sys.modules.get("torch.distributed")
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
        world = dist.get_world_size(process_group)
        if world <= 1:
            return None
        from torch.distributed import distributed_c10d as c10d
        store = c10d._get_default_store()
        if counter[0] is None:
            group = "default" if process_group is None else str(
                getattr(process_group, "group_name", "") or id(process_group))
            number = next(_NAMESPACES.setdefault(group, itertools.count()))
            counter[0] = f"asyncckpt/{group}/{number}"
        return cls(dist.get_rank(process_group), world, store, timeout, counter)

    def forget_later(self, keys: list[str]) -> None:
        """Keys of an operation, deleted from the store by :meth:`forget` once every rank is
        known to be past it (the next save's gather), so a long run does not grow the
        store. Every rank deletes them (deleting twice is harmless), so they never pile up
        on a rank that is not the next save's committing rank."""
        self.counter[2].extend(keys)

    async def forget(self) -> None:
        keys, self.counter[2][:] = list(self.counter[2]), []

        def delete() -> None:
            for key in keys:
                self.store.delete_key(key)
        if keys:
            await anyio.to_thread.run_sync(delete)

    def next_view_key(self) -> str:
        """A key for a manager's view (managers are built in the foreground, in the same
        order on every rank; counted apart from the operations, which run in turns)."""
        self.counter[3] += 1
        return f"{self.counter[0]}/view/{self.counter[3]}"

    def next_key(self) -> str:
        """A namespace for the next collective save; every rank must call in the same order."""
        self.counter[1] += 1
        return f"{self.counter[0]}/{self.counter[1]}"

    async def put(self, key: str, payload: Any) -> None:
        data = json.dumps(payload).encode()
        await anyio.to_thread.run_sync(self.store.set, key, data)

    async def get(self, key: str, ranks: list[int], what: str) -> Any:
        """Wait for ``key`` (posted by one of ``ranks``) and decode it."""
        await self.wait([key], ranks, what)
        return json.loads(await anyio.to_thread.run_sync(self.store.get, key))

    async def wait(self, keys: list[str], ranks: list[int], what: str) -> None:
        def waiting() -> None:
            self.store.wait(keys, datetime.timedelta(seconds=self.timeout))
        try:
            await anyio.to_thread.run_sync(waiting)
        except RuntimeError as exc:
            missing = [r for k, r in zip(keys, ranks)
                       if not self.store.check([k])]
            names = ", ".join(f"rank {r}" for r in missing) or "a rank"
            raise CoordinationError(
                f"{names} did not {what} within coordination_timeout={self.timeout} s "
                f"(this is rank {self.rank}); every rank must make the same checkpoint calls "
                f"in the same order, and a rank that died cannot take part") from exc

    def exchange_sync(self, key: str, payload: Any = None) -> Any:
        """Blocking: the committer posts ``payload`` under ``key``; every rank returns it."""
        if self.rank == self.committer:
            self.store.set(key, json.dumps(payload).encode())
            return payload
        try:
            self.store.wait([key], datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise CoordinationError(
                f"rank {self.committer} did not answer within coordination_timeout="
                f"{self.timeout} s (this is rank {self.rank}); every rank must make the same "
                f"checkpoint calls in the same order") from exc
        return json.loads(self.store.get(key))

    async def gather(self, key: str, payload: Any, what: str) -> list[Any] | None:
        """Every rank posts ``payload``; the committer gets them all (others: None)."""
        await self.put(f"{key}/r{self.rank}", payload)
        if self.rank != self.committer:
            return None
        keys = [f"{key}/r{r}" for r in range(self.world)]
        await self.wait(keys, list(range(self.world)), what)
        return [json.loads(await anyio.to_thread.run_sync(self.store.get, k)) for k in keys]


def _renumber(node: dict[str, Any], mapping: dict[int, int]) -> dict[str, Any]:
    kind = node["t"]
    if kind == "array":
        return {"t": "array", "index": mapping[node["index"]]}
    if kind == "dict":
        return {"t": "dict", "items": [[k, _renumber(c, mapping)] for k, c in node["items"]]}
    if kind in ("list", "tuple"):
        return {"t": kind, "items": [_renumber(c, mapping) for c in node["items"]]}
    if kind == "state":
        return {"t": "state", "value": _renumber(node["value"], mapping)}
    if kind == "dtensor":
        return {"t": "dtensor", "shape": node["shape"], "mesh": node["mesh"],
                "pieces": [[mapping[i], offset] for i, offset in node["pieces"]]}
    return node


def assemble(reports: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Merge every rank's report into one array table and per-rank trees.

    A report is ``{"values": {name: node}, "arrays": [{"path", "dtype", "shape", "chunks"}]}``
    with ``chunks`` None for a replicated array another rank wrote.
    """
    arrays: list[dict[str, Any]] = []
    replicated: dict[str, int] = {}
    for report in reports:  # written arrays first, so a replicated path has its chunks
        for spec in report["arrays"]:
            if spec["chunks"] is not None and spec.get("replicated"):
                replicated[spec["path"]] = len(arrays)
                arrays.append({k: spec[k] for k in ("path", "dtype", "shape", "chunks")})
    ranks = []
    for rank, report in enumerate(reports):
        mapping = {}
        for local, spec in enumerate(report["arrays"]):
            if spec.get("replicated"):
                if spec["path"] not in replicated:
                    raise SaveError(f"replicated array {spec['path']} was written by no rank "
                                    f"(rank {rank} expected another rank to write it)")
                mapping[local] = replicated[spec["path"]]
            else:
                mapping[local] = len(arrays)
                arrays.append({k: spec[k] for k in ("path", "dtype", "shape", "chunks")})
        ranks.append({name: _renumber(node, mapping) for name, node in report["values"].items()})
    return arrays, ranks


Commit = Callable[[str], Awaitable[Any]]


def digests(leaves: list[Any]) -> dict[str, str]:
    """Checksums of replicated arrays (host data; device arrays are fetched), for
    ``CheckpointOptions(check_replicated=True)``."""
    import zlib

    import numpy as np
    out = {}
    for leaf in leaves:
        data = leaf.array if leaf.array is not None else np.asarray(
            leaf.device.detach().cpu().numpy() if hasattr(leaf.device, "detach") else leaf.device)
        out[leaf.path] = f"{zlib.crc32(np.ascontiguousarray(data).reshape(-1).view(np.uint8)):08x}"
    return out


def compare_digests(per_rank: list[dict[str, str]]) -> list[str]:
    problems = []
    for path in sorted(set().union(*per_rank)):
        values = [d.get(path) for d in per_rank]
        if len(set(values)) > 1:
            odd = [r for r, v in enumerate(values) if v != values[0]]
            problems.append(f"{path} on " + ", ".join(f"rank {r}" for r in odd) + " differs from "
                            f"rank 0")
    return problems


def shard_for(rank: int) -> str:
    return f"shard-r{rank:05d}.bin"


def prune(node: dict[str, Any], path: str, keep: Callable[[str], bool], sharded: bool
          ) -> dict[str, Any] | None:
    """The part of a tree whose leaves' key paths ``keep`` accepts (None if nothing);
    sharded (DTensor) values are kept if ``sharded``.

    Dicts drop entries; a list or tuple with any kept element keeps its length, the other
    elements becoming None.
    """
    from ._tree import join_path
    kind = node["t"]
    if kind == "state":
        inner = prune(node["value"], path, keep, sharded)
        return None if inner is None else {"t": "state", "value": inner}
    if kind == "dict":
        items = []
        for key, child in node["items"]:
            kept = prune(child, join_path(path, key), keep, sharded)
            if kept is not None:
                items.append([key, kept])
        if items or (not node["items"] and keep(path)):
            return {"t": "dict", "items": items}
        return None
    if kind in ("list", "tuple"):
        kept_items = [prune(child, join_path(path, i), keep, sharded)
                      for i, child in enumerate(node["items"])]
        if any(k is not None for k in kept_items) or (not node["items"] and keep(path)):
            return {"t": kind, "items": [k if k is not None else {"t": "none"}
                                         for k in kept_items]}
        return None
    if kind == "dtensor":
        return node if sharded else None
    return node if keep(path) else None


def view(manifest: Any, rank: int | None) -> dict[str, Any]:
    """Tracked values seen by one rank (``rank``), or the part every rank shares (``None``):
    replicated values, and sharded (DTensor) values, whose pieces come from every rank."""
    if rank is not None:
        return manifest.ranks[rank]
    keep = compile_globs(manifest.replicated)
    out = {}
    for name, node in manifest.ranks[0].items():
        kept = prune(node, name, keep, True)
        if kept is not None:
            out[name] = kept
    return out


def local_view(manifest: Any, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s own values (neither replicated nor sharded)."""
    shared = compile_globs(manifest.replicated)
    out = {}
    for name, node in manifest.ranks[rank].items():
        kept = prune(node, name, lambda p: not shared(p), False)
        if kept is not None:
            out[name] = kept
    return out
