"""Peak memory of ONE federated round on a ~110M-parameter random Llama, per method, dtype and DP.

Usage (from the repository root)::

    python benchmarks/bench_memory.py                       # the full grid: 34 processes, ~15 min on 2 cores
    python benchmarks/bench_memory.py --smoke               # tiny Llama, 6 configurations, 2 at a time: < 1 min
    python benchmarks/bench_memory.py --methods fedit flora --dtypes float32 --dp off
    python benchmarks/bench_memory.py --json benchmarks/results/bench_memory.json
    python benchmarks/bench_memory.py --shape 1b --methods fedit --dtypes bfloat16 nf4 int8 --no-checkpointing-check

``--dtypes nf4 fp4 int8``: a bitsandbytes base (QLoRA) computing in bfloat16, built in code one layer at a
time (each linear weight drawn in bfloat16 and quantised at once; embeddings, norms and the head stay
bfloat16). ``--shape 1b``: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632,
vocab 32000: 1.03B parameters).

The model is ``LlamaForSequenceClassification`` (hidden 768, 12 layers, 12 heads, FFN 2048, vocab
32000: ~110M parameters), built in code, seeded, directly in the target dtype (no float32 copy
first). Each configuration runs in its own process (``--one '<json>'``), because peak RSS is a
high-water mark that only grows. In that process, in order:

1. imports (torch, transformers, peft, opacus, datasets, fedlora_ext) and the synthetic data;
2. ``baseline``: RSS now (VmRSS), before the model exists; the RSS high-water mark is then reset
   (``echo 5 > /proc/self/clear_refs``) so that the peak belongs to what follows;
3. the model is built; ``weights``: sum of numel * element_size over its parameters and buffers;
4. ``Simulation(config, train_data, test_data, base_model=model).run()`` for one round (4 clients,
   all participating, ``local_steps`` 1, then the evaluation of the global model on 8 examples);
5. ``peak``: VmHWM (peak RSS) from /proc/self/status, reset once more after the model is built (a
   quantised model is built one layer at a time and its 16-bit temporaries are returned first), so it is
   the round's peak with the model in memory; ``peak - baseline``: what the model and the round added;
   on CUDA also ``torch.cuda.max_memory_allocated``.

Methods: fedit, ffa_lora, fedsa_lora at rank 8; flora with client ranks 8,4,2,1 and, as the
comparison point, flora with rank 8 for all four clients; hetlora with ranks 8,4,2,1; lora_a2 and
fedex_lora at rank 8. Targets (PASS / FAIL lines, stored in the JSON under ``targets``):

* flora 8,4,2,1 peak <= 1.15 x flora 8,8,8,8 peak (same dtype, no DP);
* bfloat16 base: (peak - baseline) <= 0.65 x the float32 (peak - baseline), per method (and DP setting);
* gradient checkpointing lowers the activation peak: fedit, float32, no DP, seq_len 256, batch 4:
  (peak - baseline) with ``gradient_checkpointing=True`` < without.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "bench_memory.json"
MARK = "BENCH_MEMORY_ROW "
MB = 1 << 20

#: (label, method, client ranks): label is what ``--methods`` selects; "flora" selects both flora rows
METHODS = (
    ("fedit", "fedit", (8, 8, 8, 8)),
    ("ffa_lora", "ffa_lora", (8, 8, 8, 8)),
    ("fedsa_lora", "fedsa_lora", (8, 8, 8, 8)),
    ("flora", "flora", (8, 4, 2, 1)),
    ("flora", "flora", (8, 8, 8, 8)),
    ("hetlora", "hetlora", (8, 4, 2, 1)),
    ("lora_a2", "lora_a2", (8, 8, 8, 8)),
    ("fedex_lora", "fedex_lora", (8, 8, 8, 8)),
)
METHOD_LABELS = tuple(dict.fromkeys(label for label, _, _ in METHODS))

#: ~110M parameters as LlamaForSequenceClassification
FULL_MODEL = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 512}
#: --shape 1b: ~1.03B parameters, TinyLlama-1.1B's shape (grouped-query attention, 4 KV heads)
ONE_B_MODEL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
               "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 512}
SHAPES = {"110m": FULL_MODEL, "1b": ONE_B_MODEL}
#: --dtypes beyond float32 / bfloat16: bitsandbytes bases (QLoRA), computing in bfloat16
QUANTIZED = ("nf4", "fp4", "int8")
#: the 4-bit target at the 1b shape (issue 26): its embeddings and head stay 16-bit, so not 0.25
QUANTIZED_LIMIT = 0.45
#: --smoke: checks that the script runs end to end, in seconds
SMOKE_MODEL = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}
#: the warm-up round before the baseline (see run_one)
WARMUP_MODEL = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}
#: the warm-up of a quantised row: bitsandbytes quantises blocks of 64 weights
WARMUP_QUANTIZED = dict(WARMUP_MODEL, hidden_size=64, intermediate_size=128)
SMOKE_CONFIGS = (  # (method, ranks, dtype, dp): each code path and target once, plus the checkpointing pair
    ("flora", (8, 4, 2, 1), "float32", False),
    ("flora", (8, 8, 8, 8), "float32", False),
    ("flora", (8, 8, 8, 8), "bfloat16", False),
    ("fedit", (8, 8, 8, 8), "float32", True),
)

NUM_CLIENTS = 4
EXAMPLES_PER_CLIENT = 16  # DP-SGD samples each step at rate batch_size / 16
TEST_EXAMPLES = 8
NUM_LABELS = 4
GC_SEQ_LEN = 256


# ------------------------------------------------------------------------------------ one configuration


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def _malloc_trim() -> None:
    """Returns freed heap memory to the OS (glibc), so that RSS counts live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def use_source_tree(source: str) -> None:
    """Imports ``fedlora_ext`` from ``source`` (a folder holding a ``fedlora_ext`` package, e.g. an older
    commit exported with ``git archive``, with the compiled ``_C`` library copied in) instead of the
    installed package: drops the editable install's import hooks and puts ``source`` first on sys.path."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if type(f).__name__ not in ("ScikitBuildInplaceFinder", "ScikitBuildRedirectingFinder")]
    sys.path.insert(0, str(Path(source).resolve()))


def run_one(spec: dict) -> dict:
    """Measures one configuration in this process; returns its row (all memory in bytes)."""
    if spec.get("source"):
        use_source_tree(spec["source"])
    import torch
    import transformers as tf

    import fedlora_ext
    from fedlora_ext.core.config import FedConfig
    from fedlora_ext.data.synthetic import synthetic_dataset
    from fedlora_ext.federated.simulation import Simulation

    try:
        from fedlora_ext.app.jobs import quiet_libraries

        quiet_libraries()
    except ImportError:
        pass
    torch.set_num_threads(spec["threads"])
    row = dict(spec, fedlora_ext_file=fedlora_ext.__file__)
    quantization = spec["dtype"] if spec["dtype"] in QUANTIZED else "none"
    seq_len = spec["seq_len"]
    dtype = torch.bfloat16 if quantization != "none" else getattr(torch, spec["dtype"])
    n_train = NUM_CLIENTS * EXAMPLES_PER_CLIENT
    train = synthetic_dataset("classification", n_train, seq_len, NUM_LABELS, seed=0)
    test = synthetic_dataset("classification", TEST_EXAMPLES, seq_len, NUM_LABELS, seed=1)
    ranks = tuple(spec["ranks"])
    try:
        config = FedConfig(
            method=spec["method"], model="bench-llama", task="classification", rank=max(ranks),
            client_ranks=ranks if len(set(ranks)) > 1 else (), num_clients=NUM_CLIENTS, participation=1.0,
            rounds=1, local_steps=spec["local_steps"], batch_size=spec["batch_size"], seq_len=seq_len,
            num_labels=NUM_LABELS, num_examples=n_train, dirichlet_alpha=None,
            dp_noise_multiplier=1.0 if spec["dp"] else None, dp_noise_seed=0 if spec["dp"] else None,
            eval_examples=TEST_EXAMPLES, model_dtype=str(dtype).removeprefix("torch."), quantization=quantization,
            device=spec["device"],
            gradient_checkpointing=spec["gradient_checkpointing"], target_modules=("q_proj", "v_proj"),
            seed=0)
    except (TypeError, ValueError) as error:
        row["error"] = f"FedConfig refused: {type(error).__name__}: {error}"
        return row
    device = torch.device("cuda" if spec["device"] in ("auto", "cuda") and torch.cuda.is_available()
                          else spec["device"] if spec["device"].startswith("cuda") else "cpu")
    row["device_resolved"] = str(device)

    def build(model_kwargs):
        cfg = tf.LlamaConfig(**model_kwargs, num_labels=NUM_LABELS, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        torch.manual_seed(0)
        if quantization != "none":
            return quantized_llama(cfg, quantization, dtype)
        return tf.LlamaForSequenceClassification._from_config(cfg, dtype=dtype)  # built in dtype, no fp32 copy

    if device.type == "cuda":  # the CUDA context (hundreds of MB of host memory) belongs in the baseline
        torch.zeros(1, device=device)
    row["rss_after_imports_bytes"] = _status_kib("VmRSS") * 1024
    if spec.get("warmup", True):
        # the first round imports ~2000 more modules lazily (peft, accelerate, opacus, scipy, pandas, ...) and
        # initialises torch's kernels: ~150 MB and seconds that belong to the process, not to the model. A
        # round of the same configuration on a micro Llama does that before the baseline is taken.
        warm = time.perf_counter()
        try:
            warmup = WARMUP_QUANTIZED if quantization != "none" else WARMUP_MODEL
            Simulation(config, train_data=train, test_data=test, base_model=build(warmup)).run(progress=False)
        except Exception as error:  # noqa: BLE001  (the measured round raises it again, with figures)
            row["warmup_error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        row["seconds_warmup"] = time.perf_counter() - warm
    gc.collect()
    _malloc_trim()
    baseline = _status_kib("VmRSS") * 1024
    row["peak_reset"] = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):  # on CUDA the weights are drawn there, with no host copy
        model = build(spec["model"])
    # a quantised model is built one layer at a time, and the 16-bit temporaries of that build stay in the
    # heap (glibc keeps them): returned, and the high-water mark started again, so the peak is the round's
    # with the model in memory (a no-op for a model built directly in its dtype)
    row["build_peak_bytes"] = _status_kib("VmHWM") * 1024
    gc.collect()
    _malloc_trim()
    row["peak_reset_after_build"] = _reset_peak_rss()
    row["params"] = sum(p.numel() for p in model.parameters())
    row["weight_bytes"] = (sum(p.numel() * p.element_size() for p in model.parameters())
                           + sum(b.numel() * b.element_size() for b in model.buffers()))
    row["model_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    row["params"] = row["params"] if quantization == "none" else logical_params(model)
    row["baseline_bytes"] = baseline
    row["after_model_bytes"] = _status_kib("VmRSS") * 1024

    started = time.perf_counter()
    try:
        simulation = Simulation(config, train_data=train, test_data=test, base_model=model)
        setup_done = time.perf_counter()
        result = simulation.run(progress=False)
    except Exception as error:  # noqa: BLE001  (the row says why it has no figures; the grid goes on)
        row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
    else:
        finished = time.perf_counter()
        metrics = result.history[-1]
        row["seconds_setup"] = setup_done - started
        row["seconds"] = finished - setup_done
        for key in ("seconds_train", "seconds_dp", "seconds_aggregate", "seconds_eval", "test_accuracy", "test_loss",
                    "personal_accuracy"):
            if isinstance(metrics.get(key), (int, float)):
                row[key] = metrics[key]
        if metrics.get("failed"):  # a client that raises is left out of the round, not fatal to it
            row["failed_clients"] = metrics["failed"]
            row["error"] = f"{len(metrics['failed'])} client(s) failed: " + next(iter(metrics["failed"].values()))[:300]
        if metrics.get("skipped"):
            row["error"] = f"round skipped: {metrics['skipped']}"
    row["peak_bytes"] = _status_kib("VmHWM") * 1024
    row["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset
    row["peak_minus_baseline_bytes"] = row["peak_bytes"] - baseline
    if device.type == "cuda":
        row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def quantized_llama(cfg, kind: str, dtype):
    """A random ``LlamaForSequenceClassification`` whose linear layers are bitsandbytes ``kind`` layers,
    built in code one layer at a time: the model is laid out on the meta device, each linear weight is
    drawn in ``dtype`` and quantised at once (at most one layer's 16-bit weight exists at a time), then the
    rest (embeddings, norms, the head, the rotary table) is drawn on the CPU. No file, so no file-backed
    pages in the peak."""
    import torch
    import transformers as tf
    from torch import nn

    from fedlora_ext.data.quantized import HEADS, import_bitsandbytes, keep_trainable_layout

    bnb = import_bitsandbytes()
    with torch.device("meta"):
        model = tf.LlamaForSequenceClassification._from_config(cfg, dtype=dtype)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in HEADS:
            continue
        weight = torch.empty(module.out_features, module.in_features, dtype=dtype).normal_(0, 0.02)
        with torch.device("meta"):
            if kind == "int8":
                layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=dtype,
                                          compress_statistics=True, quant_type=kind)
        if kind == "int8":
            layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        else:
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type=kind)
        model.set_submodule(name, layer.to("cpu"))  # .to quantises
        del weight
    for module in model.modules():  # what is still on the meta device: drawn on the CPU
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                value = torch.ones(p.shape, dtype=p.dtype) if p.dim() == 1 else torch.empty(p.shape, dtype=p.dtype).normal_(0, 0.02)
                module._parameters[key] = nn.Parameter(value, requires_grad=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its inv_freq buffer, computed
    return keep_trainable_layout(model)


def logical_params(model) -> int:
    """Parameters as the model's shape counts them (a 4-bit weight is stored packed, two per byte)."""
    from torch import nn

    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


# ------------------------------------------------------------------------------------------- the grid


def _ranks_text(ranks) -> str:
    return ",".join(map(str, ranks))


def build_grid(args) -> list[dict]:
    model = SMOKE_MODEL if args.smoke else SHAPES[args.shape]
    common = {"model": model, "shape": "smoke" if args.smoke else args.shape, "local_steps": 1, "batch_size": args.batch_size, "threads": args.threads,
              "device": args.device, "smoke": args.smoke, "warmup": args.warmup, "source": args.source,
              "mmap_threshold": args.mmap_threshold}
    grid = []
    if args.smoke and not args.methods_given:
        wanted = list(SMOKE_CONFIGS)
    else:
        wanted = [(method, ranks, dtype, dp == "on") for dtype in args.dtypes for dp in args.dp
                  for label, method, ranks in METHODS if label in args.methods]
    for method, ranks, dtype, dp in wanted:
        grid.append(dict(common, method=method, ranks=list(ranks), dtype=dtype, dp=dp, seq_len=args.seq_len,
                         gradient_checkpointing=args.gradient_checkpointing, group="grid"))
    if args.checkpointing_check and ("fedit" in args.methods or args.smoke and not args.methods_given):
        for gc in (False, True):
            grid.append(dict(common, method="fedit", ranks=[8] * NUM_CLIENTS, dtype="float32", dp=False,
                             seq_len=GC_SEQ_LEN, gradient_checkpointing=gc, group="checkpointing"))
    return grid


def run_subprocess(spec: dict, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if spec.get("mmap_threshold"):  # glibc: blocks this large are mmapped and unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["mmap_threshold"])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT,
                              check=False)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    return dict(spec, error=f"exit {done.returncode}: {tail[:400]}")


def _mb(value) -> str:
    return "-" if value is None else f"{value / MB:.0f}"


HEADER = (f"{'shape':<5} {'method':<11} {'ranks':<8} {'dtype':<9} {'dp':<3} {'seq':>4} {'gc':<3} {'weights MB':>10} "
          f"{'baseline MB':>11} {'peak MB':>8} {'peak-base MB':>12} {'cuda MB':>8} {'seconds':>8}  note")


def format_row(r: dict) -> str:
    seconds = r.get("seconds")
    return (f"{r.get('shape', '110m'):<5} {r['method']:<11} {_ranks_text(r['ranks']):<8} {r['dtype']:<9} {'on' if r['dp'] else 'off':<3} "
            f"{r['seq_len']:>4} {'on' if r['gradient_checkpointing'] else 'off':<3} {_mb(r.get('weight_bytes')):>10} "
            f"{_mb(r.get('baseline_bytes')):>11} {_mb(r.get('peak_bytes')):>8} "
            f"{_mb(r.get('peak_minus_baseline_bytes')):>12} {_mb(r.get('cuda_max_allocated_bytes')):>8} "
            f"{'-' if seconds is None else f'{seconds:.1f}':>8}  "
            f"{'mmap >= ' + _mb(r['mmap_threshold']) + ' MB ' if r.get('mmap_threshold') else ''}{r.get('error', '')}")


# --------------------------------------------------------------------------------------------- targets


def _find(rows, **keys):
    for r in rows:
        if all(r.get(k) == v for k, v in keys.items()) and "error" not in r and r.get("peak_bytes"):
            return r
    return None


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """One row per target found in ``rows``: target, case, value, limit, met."""
    out = []
    grid = [r for r in rows if r.get("group") == "grid"]
    for dtype in dict.fromkeys(r["dtype"] for r in grid):
        four = _find(grid, method="flora", ranks=[8, 4, 2, 1], dtype=dtype, dp=False)
        one = _find(grid, method="flora", ranks=[8, 8, 8, 8], dtype=dtype, dp=False)
        if four and one:
            value = four["peak_bytes"] / one["peak_bytes"]
            out.append({"target": "flora 8,4,2,1 peak <= 1.15 x flora 8,8,8,8 peak", "case": f"{dtype} no DP",
                        "value": round(value, 3), "limit": 1.15, "met": value <= 1.15,
                        "detail": f"{_mb(four['peak_bytes'])} MB vs {_mb(one['peak_bytes'])} MB"})
    bf16_rows = []
    for r in grid:
        if r["dtype"] != "bfloat16" or "error" in r or not r.get("peak_bytes"):
            continue
        fp32 = _find(grid, method=r["method"], ranks=r["ranks"], dtype="float32", dp=r["dp"])
        if fp32 is None or fp32["peak_minus_baseline_bytes"] <= 0:
            continue
        value = r["peak_minus_baseline_bytes"] / fp32["peak_minus_baseline_bytes"]
        bf16_rows.append({"target": "bf16 (peak - baseline) <= 0.65 x fp32 (peak - baseline)",
                          "case": f"{r['method']} {_ranks_text(r['ranks'])} {'DP' if r['dp'] else 'no DP'}",
                          "value": round(value, 3), "limit": 0.65, "met": value <= 0.65,
                          "detail": f"{_mb(r['peak_minus_baseline_bytes'])} MB vs "
                                    f"{_mb(fp32['peak_minus_baseline_bytes'])} MB"})
    out += bf16_rows
    if bf16_rows:
        worst = max(bf16_rows, key=lambda t: t["value"])
        out.append(dict(worst, target="bf16 / fp32 (peak - baseline), worst method <= 0.65",
                        case=f"worst: {worst['case']}"))
    for r in grid:  # a quantised base against the bfloat16 one it computes in, same run
        if r["dtype"] not in QUANTIZED or "error" in r or not r.get("peak_bytes"):
            continue
        bf16 = _find(grid, method=r["method"], ranks=r["ranks"], dtype="bfloat16", dp=r["dp"], shape=r.get("shape"))
        if bf16 is None or bf16["peak_minus_baseline_bytes"] <= 0:
            continue
        value = r["peak_minus_baseline_bytes"] / bf16["peak_minus_baseline_bytes"]
        limit = QUANTIZED_LIMIT if r["dtype"] in ("nf4", "fp4") and r.get("shape") == "1b" else None
        out.append({"target": f"{r['dtype']} / bf16 (peak - baseline)" + (f" <= {limit} at 1b" if limit else ", reported"),
                    "case": f"{r.get('shape')} {r['method']} {'DP' if r['dp'] else 'no DP'}", "value": round(value, 3),
                    "limit": limit, "met": value <= limit if limit else True,
                    "detail": f"{_mb(r['peak_minus_baseline_bytes'])} MB vs {_mb(bf16['peak_minus_baseline_bytes'])} MB"})
    checkpointing = [r for r in rows if r.get("group") == "checkpointing"]
    without = _find(checkpointing, gradient_checkpointing=False)
    with_gc = _find(checkpointing, gradient_checkpointing=True)
    if without and with_gc:
        value = with_gc["peak_minus_baseline_bytes"] / without["peak_minus_baseline_bytes"]
        out.append({"target": f"gradient checkpointing lowers (peak - baseline) at seq_len {GC_SEQ_LEN}",
                    "case": "fedit float32 no DP", "value": round(value, 3), "limit": 1.0, "met": value < 1.0,
                    "detail": f"{_mb(with_gc['peak_minus_baseline_bytes'])} MB with vs "
                              f"{_mb(without['peak_minus_baseline_bytes'])} MB without"})
    return out


def print_targets(targets: list[dict]) -> None:
    if not targets:
        return
    print("\nTargets")
    for t in targets:
        print(f"  {'PASS' if t['met'] else 'FAIL'}  {t['target']:<58} {t['case']:<28} "
              f"value {t['value']:<6} (limit {t['limit']})  {t['detail']}")


# ---------------------------------------------------------------------------------------------- main


def machine() -> dict:
    import torch

    info = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "python": platform.python_version(),
            "torch": torch.__version__, "os_cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                                  if ln.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = platform.processor() or None
    try:
        info["mem_total_kib"] = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                                         if ln.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import opacus
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__, opacus=opacus.__version__)
    except ImportError:
        pass
    try:
        run = lambda *cmd: subprocess.run(["git", "-C", str(REPO_ROOT), *cmd], capture_output=True,
                                          text=True, timeout=10, check=False).stdout.strip()
        info["git_head"] = run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain",
                                                                                   "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration, print its row
    parser.add_argument("--methods", nargs="+", choices=METHOD_LABELS, default=None,
                        help="methods to run (flora runs both 8,4,2,1 and 8,8,8,8); default all")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", *QUANTIZED), default=["float32", "bfloat16"],
                        help="base dtypes; nf4 / fp4 / int8: a bitsandbytes base computing in bfloat16")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="110m",
                        help="the Llama: 110m (hidden 768, 12 layers) or 1b (TinyLlama-1.1B's shape, 22 layers)")
    parser.add_argument("--dp", nargs="+", choices=("on", "off"), default=["off", "on"])
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per example of the method grid (default 64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each measured process (default 2; --smoke: 1, with 2 jobs)")
    parser.add_argument("--device", default="cpu", help="FedConfig.device (cpu, cuda, auto)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every configuration of the grid with gradient checkpointing (QLoRA's setting)")
    parser.add_argument("--no-checkpointing-check", dest="checkpointing_check", action="store_false",
                        help=f"skip the fedit seq_len {GC_SEQ_LEN} pair with / without gradient checkpointing")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny Llama (hidden 64, 2 layers, vocab 1000), a few configurations unless --methods")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="no warm-up round on a micro Llama before the baseline (lazy imports then count)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="configurations measured at once (default 1; --smoke: 2). Memory is per process, "
                             "but parallel runs share the cores, so their seconds are not comparable")
    parser.add_argument("--source", default=None,
                        help="import fedlora_ext from this folder instead of the installed package (a before/after "
                             "comparison: git archive <commit> fedlora_ext | tar -x -C DIR, then copy _C*.so in)")
    parser.add_argument("--note", default=None, help="free text stored in the JSON header (e.g. which commit --source is)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="MALLOC_MMAP_THRESHOLD_ of the measured processes: glibc then maps every block this large "
                             "on its own and unmaps it when freed, so RSS follows live memory (default: glibc's "
                             "dynamic threshold, which keeps freed blocks of up to 32 MB in the heap)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    parser.add_argument("--json", default=None, help=f"output (default {DEFAULT_JSON.relative_to(REPO_ROOT)}; "
                                                     "--smoke: bench_memory_smoke.json)")
    args = parser.parse_args(argv)

    if args.one is not None:
        row = run_one(json.loads(args.one))
        print(MARK + json.dumps(row), flush=True)
        return 0

    args.threads = args.threads or (1 if args.smoke else 2)
    args.methods_given = args.methods is not None
    args.methods = args.methods or list(METHOD_LABELS)
    grid = build_grid(args)
    info = machine()
    started = time.perf_counter()
    print(f"{len(grid)} configurations, each in its own process; {'smoke model' if args.smoke else 'Llama ' + args.shape}, "
          f"{NUM_CLIENTS} clients x {EXAMPLES_PER_CLIENT} examples, local_steps 1, batch {args.batch_size}, "
          f"seq_len {args.seq_len}, eval on {TEST_EXAMPLES}; {args.threads} threads; "
          f"{info.get('cpu_model')}, {info['os_cpu_count']} cores, torch {info['torch']}\n")
    print(HEADER)
    print("-" * len(HEADER))
    jobs = args.jobs or (2 if args.smoke else 1)
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # each thread waits on one child process
        for row in pool.map(lambda spec: run_subprocess(spec, args.timeout), grid):
            rows.append(row)
            print(format_row(row), flush=True)
    params = next((r["params"] for r in rows if r.get("params")), None)
    if params is not None:
        print(f"\nmodel: LlamaForSequenceClassification, {params / 1e6:.1f}M parameters "
              f"({params * 4 / MB:.0f} MB in float32, {params * 2 / MB:.0f} MB in bfloat16)")
    targets = evaluate_targets(rows)
    print_targets(targets)
    if args.smoke and targets:
        print("  (--smoke: a 0.1M-parameter model; these lines check the code path, not the targets)")
    total = time.perf_counter() - started
    print(f"\n{total:.0f} s in all")
    info.update(total_seconds=total, jobs=jobs, warmup=args.warmup, source=args.source, note=args.note,
                fedlora_ext_file=next((r["fedlora_ext_file"] for r in rows if r.get("fedlora_ext_file")), None), num_clients=NUM_CLIENTS, examples_per_client=EXAMPLES_PER_CLIENT,
                test_examples=TEST_EXAMPLES, seq_len=args.seq_len, batch_size=args.batch_size, threads=args.threads,
                params=params, smoke=args.smoke, targets=targets,
                table="\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows]))
    path = Path(args.json) if args.json else (DEFAULT_JSON.with_name("bench_memory_smoke.json") if args.smoke
                                              else DEFAULT_JSON)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": info, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
