"""The `fedlora` command line.

Subcommands: `selfcheck` (smoke job of a fresh install), `info` (build info), `simulate` (a federated
run in-process from a preset or a TOML file), `presets` (list the packaged presets).
"""

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


def _simulate(args: argparse.Namespace) -> int:
    from fedlora_ext.federated import FedConfig, preset, simulate

    config = FedConfig.from_toml(args.config) if args.config else preset(args.preset)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("out_dir", args.out), ("seed", args.seed)) if v is not None}
    config = config.replace(**overrides)
    result = simulate(config, progress=not args.quiet)
    for metrics in result.history:
        shown = {k: _rounded(v) for k, v in metrics.items() if k != "clients"}
        print(json.dumps(shown))
    print(f"bytes uploaded {result.ledger.total('up')}, downloaded {result.ledger.total('down')}"
          + (f"; run folder {result.out_dir}" if result.out_dir else ""))
    if result.privacy:
        from fedlora_ext.federated.privacy import format_report

        print(format_report(result.privacy))
    return 0


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def _presets(_: argparse.Namespace) -> int:
    from fedlora_ext.federated import preset_names

    print("\n".join(preset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Private federated LoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("selfcheck", help="show the build and check every op against its twin").set_defaults(
        handler=_selfcheck
    )
    commands.add_parser("info", help="print build_info() as JSON").set_defaults(handler=_info)
    sim = commands.add_parser("simulate", help="run a federated job in-process")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--preset", default="fedit", help="a packaged preset (see `fedlora presets`)")
    source.add_argument("--config", help="a TOML file of FedConfig keys (may start from `preset = ...`)")
    sim.add_argument("--rounds", type=int, help="override the number of rounds")
    sim.add_argument("--seed", type=int, help="override the seed")
    sim.add_argument("--out", help="run folder for config.json, metrics.jsonl, adapter.safetensors")
    sim.add_argument("--quiet", action="store_true", help="no progress bars")
    sim.set_defaults(handler=_simulate)
    commands.add_parser("presets", help="list the packaged presets").set_defaults(handler=_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
