"""Command line: ``python -m asyncckpt demo``."""

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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo
        return run_demo(directory=args.dir, steps=args.steps, every=args.every,
                        size_mib=args.size_mib)
    return 2


if __name__ == "__main__":
    sys.exit(main())
