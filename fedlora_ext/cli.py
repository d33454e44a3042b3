"""The `fedlora` command line. Subcommands: `selfcheck` (smoke job of a fresh install), `info`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _info(_: argparse.Namespace) -> int:
    import fedlora_ext

    print(json.dumps(fedlora_ext.build_info(), indent=2))
    return 0


def _selfcheck(_: argparse.Namespace) -> int:
    from fedlora_ext.selfcheck import run_selfcheck

    return run_selfcheck()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Private federated LoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("selfcheck", help="show the build and check every op against its twin").set_defaults(
        handler=_selfcheck
    )
    commands.add_parser("info", help="print build_info() as JSON").set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
