"""asyncckpt command line: demo, bench, verify, ls, inspect."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small numpy model with background saves")
    demo.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--every", type=int, default=50, help="save every N steps")
    demo.add_argument("--size-mib", type=int, default=64, help="model state size in MiB")
    verify = sub.add_parser("verify", help="check every checksum of a checkpoint or of a "
                                           "managed directory; exit 1 on damage")
    verify.add_argument("path")
    ls = sub.add_parser("ls", help="list checkpoints with step, time, size and ratio")
    ls.add_argument("directory")
    inspect = sub.add_parser("inspect", help="show a checkpoint's tree")
    inspect.add_argument("path")
    bench = sub.add_parser("bench", help="benchmark this machine's storage with asyncckpt")
    bench.add_argument("--dir", default=None, help="directory to benchmark (default: a temp dir)")
    bench.add_argument("--size", default="256MiB", help="state size, e.g. 256MiB, 4GiB")
    bench.add_argument("--dtype-mix", default="optimizer", choices=["float32", "bf16", "optimizer"])
    bench.add_argument("--saves", type=int, default=3)
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--background", dest="background", action="store_true", default=True)
    mode.add_argument("--foreground", dest="background", action="store_false")
    bench.add_argument("--level", type=int, default=1, help="zstd level")
    bench.add_argument("--no-compression", action="store_true")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from ._bench import BenchConfig, parse_size, run_bench
        try:
            cfg = BenchConfig(directory=args.dir, size=parse_size(args.size),
                              dtype_mix=args.dtype_mix, saves=args.saves,
                              background=args.background, compression_level=args.level,
                              compression="none" if args.no_compression else "zstd",
                              threads=args.threads, json_path=args.json)
            return run_bench(cfg)
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "demo":
        from ._demo import run_demo
        return run_demo(directory=args.dir, steps=args.steps, every=args.every,
                        size_mib=args.size_mib)
    import anyio

    from . import _tools
    tool = {"verify": (_tools.verify, args.path if args.command != "ls" else None),
            "ls": (_tools.list_checkpoints, getattr(args, "directory", None)),
            "inspect": (_tools.inspect, getattr(args, "path", None))}[args.command]
    status, lines = anyio.run(tool[0], tool[1], backend="asyncio")
    for line in lines:
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
