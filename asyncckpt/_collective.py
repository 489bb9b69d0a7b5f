"""Collective saves and restores: every rank of a process group, one checkpoint.

Saving, each rank writes its own shard (``shard-r<rank>.bin``) into the committing rank's
temporary directory; the committing rank (rank 0, or the I/O rank) gathers every rank's chunk
lists and trees through the store, writes the one manifest and commits exactly as a single
process does, then posts the outcome for every rank.

With ``CheckpointOptions(experimental_io_device=R)`` only rank R touches the filesystem: the
other ranks encode their chunks as usual and stream them to R (:mod:`._transport`), which
writes and fsyncs each rank's shard before the commit. Restoring, R reads the manifest and
shares its bytes; each rank plans its own restore, asks R for the arrays it needs, and R
streams their stored chunks, which the asking rank verifies and decodes itself.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import anyio

from . import _commit, _reader, _writer
from ._dist import Commit, CoordinationError, Coordinator, assemble, compare_digests, shard_for
from ._errors import CorruptCheckpointError, RestoreError, SaveError, explain, first_error
from ._format import Manifest, decode_manifest, encode_manifest
from ._transport import (ABORT, ChunkReceiver, SendSink, StreamAborted, receive_shard,
                         send_chunks)

__all__ = ["write_collective", "shared_manifest", "read_arrays_collective"]


async def write_collective(coord: Coordinator, snap: Any, path: str, options: Any,
                           workers: Any, disk: Any, replicated: Callable[[str], bool],
                           globs: list[str], commit: Commit) -> tuple[int, Any]:
    """Every rank writes (or streams) its shard; the committing rank writes the one manifest
    and runs ``commit(temporary directory)``; every rank gets its result.

    Returns ``(stored bytes, commit result)``. Raises ``SaveError`` on every rank when any
    rank failed (naming it); the committing rank then removes the temporary directory.

    Cancellation: shielded by the caller (a collective save cannot be abandoned by one rank).
    """
    key = coord.next_key()
    boss = coord.committer
    streams = coord.io_rank is not None
    tmp = _commit.temp_dir_for(path) if coord.rank == boss else None
    sink = SendSink(coord.channel, boss) if streams and coord.rank != boss else None
    state: dict[str, Any] = {"stored": 0, "error": None, "report": None}
    stream_errors: dict[int, str] = {}
    streams_limiter = anyio.CapacityLimiter(coord.world)  # a thread per stream, however many

    async def own_part() -> None:
        nonlocal tmp
        try:
            if coord.rank == boss:
                try:
                    await anyio.to_thread.run_sync(_writer._prepare, path, tmp)
                except Exception as exc:
                    await coord.put(f"{key}/tmp", {"tmp": None, "path": path,
                                                   "error": explain(exc)})
                    raise
                await coord.put(f"{key}/tmp", {"tmp": tmp, "path": path, "error": None})
            else:
                info = await coord.get(f"{key}/tmp", [boss], "start the save")
                if info["error"]:
                    raise SaveError(f"rank {boss} could not start saving {path}: "
                                    f"{info['error']}")
                tmp = info["tmp"]
                if info["path"] != path:
                    raise SaveError(f"rank {boss} is saving {info['path']} while rank "
                                    f"{coord.rank} is saving {path}: every rank must make the "
                                    f"same calls in the same order")
            assert tmp is not None
            _, results, state["stored"] = await _writer.write_shard(
                snap, tmp, shard_for(coord.rank), options, workers, disk, sink)
            table = _writer.array_table(snap, results)
            for i, entry in enumerate(table):
                entry["replicated"] = replicated(entry["path"]) and i not in snap.sharded
            state["report"] = {"values": snap.values, "arrays": table,
                               "digests": snap.digests or {}}
        except CoordinationError:
            if sink is not None:
                sink.ended = True  # the I/O rank is not listening: do not wait on it again
            raise
        except Exception as exc:
            cause = first_error(exc)
            state["error"] = f"{type(cause).__name__}: {explain(cause)}"
        finally:
            snap.release()
            if sink is not None:
                await anyio.to_thread.run_sync(sink.close)  # ABORT unless it ended

    async def receive(src: int) -> None:
        assert tmp is not None
        target = os.path.join(tmp, shard_for(src))
        try:
            await anyio.to_thread.run_sync(receive_shard, coord.channel, src,
                                           _writer.FileSink(target, options.fsync),
                                           limiter=streams_limiter)
        except StreamAborted:
            pass  # that rank's own error arrives with its report
        except Exception as exc:
            stream_errors[src] = f"its stream to rank {boss} failed: {explain(exc)}"

    async with anyio.create_task_group() as tg:
        tg.start_soon(own_part)
        if streams and coord.rank == boss:
            for src in range(coord.world):
                if src != boss:
                    tg.start_soon(receive, src)

    payload = {"path": path, "error": state["error"], "report": state["report"]}
    if coord.rank != boss:
        await coord.gather(f"{key}/done", payload, "finish writing its shard")
        result = await coord.get(f"{key}/result", [boss], "commit the checkpoint")
        await coord.forget()  # every rank is past every earlier operation (it was gathered)
        coord.forget_later([f"{key}/tmp", f"{key}/result"])
        if not result["ok"]:
            raise SaveError(result["error"])
        if state["error"]:
            raise SaveError(state["error"])
        return state["stored"], result["extra"]
    assert tmp is not None
    try:
        reports = await coord.gather(f"{key}/done", payload, "finish writing its shard")
        assert reports is not None
        # Every rank is past every earlier operation of this checkpoint: drop their keys.
        coord.forget_later([f"{key}/done/r{r}" for r in range(coord.world)])
        await coord.forget()
        coord.forget_later([f"{key}/tmp", f"{key}/result"])
        failed = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
        failed += [f"rank {r}: {text}" for r, text in sorted(stream_errors.items())
                   if not reports[r]["error"]]
        failed += [f"rank {r} saved {rep['path']} instead of {path}"
                   for r, rep in enumerate(reports) if rep["path"] != path]
        if failed:
            raise SaveError(f"saving {path} failed on {'; '.join(failed)}; nothing was "
                            f"committed")
        differ = compare_digests([rep["report"]["digests"] for rep in reports])
        if differ:
            raise SaveError(f"saving {path} failed: replicated values differ between "
                            f"ranks: {'; '.join(differ)}; nothing was committed")

        def build() -> bytes:  # off the event loop: JSON of every rank's tree
            arrays, ranks = assemble([rep["report"] for rep in reports])
            return encode_manifest(snap.save_counter, {}, arrays, ranks=ranks,
                                   replicated=list(globs))
        manifest = await anyio.to_thread.run_sync(build)
        await _commit.seal(tmp, manifest, sync=options.fsync)
        extra = await commit(tmp)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_commit.discard, tmp)
            await coord.put(f"{key}/result", {"ok": False, "error": str(exc)})
        raise
    await coord.put(f"{key}/result", {"ok": True, "extra": extra})
    return state["stored"], extra


async def shared_manifest(coord: Coordinator, path: str) -> tuple[str, Manifest]:
    """The I/O rank reads and validates ``path``'s manifest and shares its bytes through the
    store; the other ranks validate those bytes themselves (untrusted, as a file would be).
    Returns the key of this collective restore and the manifest."""
    key = coord.next_key()
    per_rank = [f"{key}/{kind}/r{r}" for r in range(coord.world) for kind in ("want", "failed")]
    coord.forget_later([f"{key}/manifest", f"{key}/bytes", *per_rank])
    if coord.rank == coord.committer:
        try:
            data, manifest = await _reader.read_manifest_data(path)
        except Exception as exc:
            await coord.put(f"{key}/manifest", {"error": str(exc),
                                                "corrupt": isinstance(exc, CorruptCheckpointError)})
            raise
        await anyio.to_thread.run_sync(coord.store.set, f"{key}/bytes", data)
        await coord.put(f"{key}/manifest", {"error": None})
        return key, manifest
    info = await coord.get(f"{key}/manifest", [coord.committer], "read the manifest")
    if info["error"]:
        kind = CorruptCheckpointError if info["corrupt"] else RestoreError
        raise kind(f"rank {coord.committer} (the I/O rank) could not read {path}: "
                   f"{info['error']}")
    data = await anyio.to_thread.run_sync(coord.store.get, f"{key}/bytes")
    source = f"{os.path.join(path, 'manifest')} (sent by rank {coord.committer})"
    return key, await anyio.to_thread.run_sync(
        functools.partial(decode_manifest, bytes(data), source=source))


async def read_arrays_collective(coord: Coordinator, key: str, path: str, manifest: Manifest,
                                 requests: list[list[int]] | None, specs: list[Any],
                                 destinations: list[Any], threads: int) -> None:
    """Fill ``destinations`` from ``specs`` (``requests`` names them as ``[array index,
    first chunk, chunk count]`` of ``manifest``): the I/O rank reads them itself and serves
    every other rank the chunks it asked for; the others receive. ``requests`` None: this
    rank's planning failed; it asks for nothing (and raises its own error afterwards).

    Cancellation: shielded; a collective restore cannot be abandoned by one rank.
    """
    boss = coord.committer
    with anyio.CancelScope(shield=True):
        if coord.rank != boss:
            await coord.put(f"{key}/want/r{coord.rank}", {"arrays": requests})
            if requests is None:
                return

            def why() -> str:
                info = coord.store.get(f"{key}/failed/r{coord.rank}") if coord.store.check(
                    [f"{key}/failed/r{coord.rank}"]) else b"no reason given"
                return f"rank {boss} (the I/O rank) could not send {path}: {info.decode()}"
            try:
                await _reader.read_arrays(path, specs, destinations, threads=threads,
                                          source=ChunkReceiver(coord.channel, boss, why))
            except RestoreError:
                raise
            except StreamAborted as exc:
                raise RestoreError(str(exc)) from exc
            except Exception as exc:
                raise RestoreError(f"receiving {path} from rank {boss} (the I/O rank) failed: "
                                   f"{explain(exc)}") from exc
            return
        errors: list[BaseException] = []
        streams = anyio.CapacityLimiter(coord.world)  # a thread per stream, however many

        async def own() -> None:
            try:
                if specs:
                    await _reader.read_arrays(path, specs, destinations, threads=threads)
            except Exception as exc:
                errors.append(exc)

        async def serve(rank: int) -> None:
            want = await coord.get(f"{key}/want/r{rank}", [rank], "ask for its arrays")
            wanted = want.get("arrays")
            if wanted is None:
                return
            try:
                chosen = [_part(manifest, request, rank) for request in wanted]
            except ValueError as exc:
                chosen = exc
            await anyio.to_thread.run_sync(_serve, coord, f"{key}/failed/r{rank}", rank, path,
                                           chosen, limiter=streams)

        async with anyio.create_task_group() as tg:
            tg.start_soon(own)
            for rank in range(coord.world):
                if rank != boss:
                    tg.start_soon(serve, rank)
        if errors:
            raise errors[0]


def _part(manifest: Manifest, request: Any, rank: int) -> Any:
    """The chunks ``[array index, first chunk, count]`` of ``manifest``, checked."""
    ok = (isinstance(request, list) and len(request) == 3
          and all(type(v) is int for v in request) and 0 <= request[0] < len(manifest.arrays))
    spec = manifest.arrays[request[0]] if ok else None
    if spec is None or not (0 <= request[1] and 0 <= request[2]
                            and request[1] + request[2] <= len(spec.chunks)):
        raise ValueError(f"rank {rank} asked for chunks that do not exist: {request!r}")
    index, first, count = request
    return dataclasses.replace(spec, chunks=spec.chunks[first:first + count])


def _serve(coord: Coordinator, failed_key: str, rank: int, path: str,
           specs: list[Any] | Exception) -> None:
    """Send ``rank`` its chunks; on failure post why (first), then ``ABORT`` the stream.
    The failure belongs to that rank's restore, so it is not raised here."""
    shards = None
    try:
        if isinstance(specs, Exception):
            raise specs
        shards = _reader._Shards(path, specs)
        send_chunks(coord.channel, rank, shards, _reader.chunk_order(specs))
    except Exception as exc:
        coord.store.set(failed_key, explain(exc).encode())
        try:
            coord.channel.send(rank, ABORT)
        except Exception:
            pass  # the stream itself broke: that rank sees it break
    finally:
        if shards is not None:
            shards.close()
