"""asyncckpt command line: demo, verify, ls, inspect."""

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
    args = parser.parse_args(argv)
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
