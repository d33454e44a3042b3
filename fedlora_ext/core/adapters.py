"""LoRA / VeRA adapters on Hugging Face models through peft, seen as named tensors.

Everything the federated layer exchanges is a flat ``dict[str, Tensor]`` with stable names:
``"<module>.lora_A"`` ``[r, in]``, ``"<module>.lora_B"`` ``[out, r]`` (peft's layout, also for GPT-2's
``fan_in_fan_out`` Conv1D layers), ``"<module>.vera_d"`` ``[r]``, ``"<module>.vera_b"`` ``[out]``, and
``"head.<param>"`` for trainable non-adapter parameters (a classification head). ``<module>`` is the
module path inside the base model, e.g. ``bert.encoder.layer.0.attention.self.query``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedlora_ext import ops
from fedlora_ext.core.latent import LatentDown
from fedlora_ext.data.quantized import is_quantized, peft_without_bitsandbytes

_PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter to attach.

    Args:
        kind: ``"lora"`` or ``"vera"``.
        rank: adapter rank ``r``.
        alpha: LoRA alpha; the update is ``alpha / r * B A`` (rsLoRA: ``alpha / sqrt(r) * B A``).
        target_modules: names (suffixes) of the Linear / Conv1D modules to adapt.
        rslora: rsLoRA scaling (Kalajdzievski 2023).
        dropout: LoRA dropout.
        latent: LoRA-SB's trainable ``[r, r]`` matrix R between A and B (update ``s B R A``; Fed-SB),
            exchanged as ``"<module>.lora_R"``.
    """

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("query", "value")
    rslora: bool = False
    dropout: float = 0.0
    latent: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "vera"):
            raise ValueError(f"AdapterSpec.kind must be 'lora' or 'vera', got {self.kind!r}")
        if self.latent and self.kind != "lora":
            raise ValueError(f"AdapterSpec.latent (LoRA-SB's R) needs kind 'lora', got {self.kind!r}")
        if self.rank < 1:
            raise ValueError(f"AdapterSpec.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"AdapterSpec.alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("AdapterSpec.target_modules must name at least one module")

    def scaling(self, rank: int | None = None) -> float:
        """``alpha / r`` (rsLoRA ``alpha / sqrt(r)``) for ``rank`` (default: this spec's rank)."""
        r = self.rank if rank is None else rank
        return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r


def default_target_modules(model: nn.Module, kind: str = "lora") -> tuple[str, ...]:
    """The modules peft adapts by default for ``model``'s architecture (its own mapping by
    ``config.model_type``: BERT query/value, GPT-2 c_attn, Llama q_proj/v_proj, ...).

    Raises:
        ValueError: peft has no default for the architecture; the message lists the candidates.
    """
    from peft.utils import constants

    mapping = (constants.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING if kind == "vera"
               else constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = mapping.get(model_type)
    if not names:
        candidates = sorted({n.split(".")[-1] for n, m in model.named_modules() if _linear_like(m)})
        raise ValueError(f"target_modules: peft has no default for model type {model_type!r}; set them, e.g. "
                         f"--set target_modules=a,b (candidates: {', '.join(candidates)})")
    return tuple(names)


def _is_fan_in_fan_out(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2 keeps W as [in, out]


def attach_adapter(model: nn.Module, spec: AdapterSpec, task_type: str, rank: int | None = None) -> nn.Module:
    """Wraps ``model`` in a peft model with a fresh adapter of ``rank`` (default ``spec.rank``).

    The LoRA alpha is chosen so the scaling is ``spec.scaling(rank)``: heterogeneous ranks share the
    scale rule of the spec. GPT-2's Conv1D layers get ``fan_in_fan_out=True``. The model is modified in
    place by peft; pass a copy if the caller keeps the original.

    Raises:
        ValueError: if a target module does not exist, or ``rank`` exceeds a target layer's size.
    """
    from peft import LoraConfig, VeraConfig, get_peft_model

    r = spec.rank if rank is None else rank
    targets = [name for name, m in model.named_modules() if name.split(".")[-1] in spec.target_modules]
    if not targets:
        raise ValueError(
            f"target_modules {list(spec.target_modules)} match no module of {type(model).__name__}; "
            f"candidates: {sorted({n.split('.')[-1] for n, m in model.named_modules() if _linear_like(m)})}"
        )
    for name in targets:
        shape = _weight_shape(model.get_submodule(name))
        if r > min(shape):
            raise ValueError(f"rank {r} is larger than layer {name} allows (weight {shape}): at most {min(shape)}")
    fan_in_fan_out = any(_is_fan_in_fan_out(model.get_submodule(n)) for n in targets)
    if spec.kind == "vera":
        config = VeraConfig(r=r, target_modules=list(spec.target_modules), task_type=task_type,
                            fan_in_fan_out=fan_in_fan_out, vera_dropout=spec.dropout)
    else:
        # peft computes scaling as lora_alpha / r (or / sqrt(r) with use_rslora): keep alpha, so
        # every rank gets the spec's rule.
        config = LoraConfig(r=r, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                            use_rslora=spec.rslora, lora_dropout=spec.dropout, task_type=task_type,
                            fan_in_fan_out=fan_in_fan_out)
    # a float base keeps peft from importing bitsandbytes (fedlora_ext.data.quantized says why)
    hidden = contextlib.nullcontext() if is_quantized(model) else peft_without_bitsandbytes()
    with warnings.catch_warnings(), hidden:  # peft calls a transformers API that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    if spec.latent:
        for layer in adapter_layers(model).values():
            layer.lora_A[ADAPTER] = LatentDown(layer.lora_A[ADAPTER])
    return model


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The logical shape of a layer's weight (a bitsandbytes 4-bit weight is stored packed, [n / 2, 1])."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_fan_in_fan_out(module)


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA / VeRA layers of ``model`` by module path (without peft's prefix), in order."""
    layers = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") or hasattr(module, "vera_lambda_d"):
            if ADAPTER in getattr(module, "lora_A", {}) or ADAPTER in getattr(module, "vera_lambda_d", {}):
                layers[name.removeprefix(_PEFT_PREFIX)] = module
    return layers


def _layer_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    if hasattr(layer, "vera_lambda_d") and ADAPTER in layer.vera_lambda_d:
        return {"vera_d": layer.vera_lambda_d[ADAPTER], "vera_b": layer.vera_lambda_b[ADAPTER]}
    params = {"lora_A": layer.lora_A[ADAPTER].weight, "lora_B": layer.lora_B[ADAPTER].weight}
    if isinstance(layer.lora_A[ADAPTER], LatentDown):
        params["lora_R"] = layer.lora_A[ADAPTER].R.weight
    return params


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter as ``"<module>.<lora_A|lora_B|lora_R|vera_d|vera_b>"`` -> the live Parameter."""
    return {f"{name}.{kind}": p for name, layer in adapter_layers(model).items() for kind, p in _layer_params(layer).items()}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable non-adapter parameters (peft's ``modules_to_save``, e.g. a classifier) as ``head.<name>``."""
    heads = {}
    for name, p in model.named_parameters():
        if ".modules_to_save." + ADAPTER + "." in name:
            short = name.removeprefix(_PEFT_PREFIX).replace(".modules_to_save." + ADAPTER, "")
            heads[f"head.{short}"] = p
    return heads


def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter and head parameters: everything a method may train and exchange."""
    return {**adapter_parameters(model), **head_parameters(model)}


def trainables_to_float32(model: nn.Module) -> None:
    """Adapters and the head in float32 over a 16-bit base: what trains, its optimizer state and its
    per-sample gradients stay float32 (peft already keeps adapters float32; a saved head is loaded in
    the base's dtype)."""
    for p in shared_parameters(model).values():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def read_tensors(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Detached copies of the named shared parameters (all of them when ``names`` is None)."""
    params = shared_parameters(model)
    chosen = params.keys() if names is None else names
    missing = [n for n in chosen if n not in params]
    if missing:
        raise KeyError(f"unknown adapter tensors {missing[:5]}; the model has {list(params)[:5]}...")
    return {n: params[n].detach().clone() for n in chosen}


def write_tensors(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copies ``tensors`` into the model's shared parameters, checking every name and shape."""
    params = shared_parameters(model)
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params:
                raise KeyError(f"write_tensors: the model has no adapter tensor {name!r}")
            target = params[name]
            if target.shape != value.shape:
                raise ValueError(f"write_tensors: {name} has shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)


def set_trainable(model: nn.Module, *, A: bool = True, B: bool = True, head: bool = True, R: bool = True) -> None:
    """Freezes or unfreezes the A factors, B factors (VeRA: d and b vectors), LoRA-SB's R and the head."""
    for name, p in adapter_parameters(model).items():
        kind = name.rsplit(".", 1)[1]
        p.requires_grad_(R if kind == "lora_R" else A if kind in ("lora_A", "vera_d") else B)
    for p in head_parameters(model).values():
        p.requires_grad_(head)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The shared parameters that currently require grad."""
    return {n: p for n, p in shared_parameters(model).items() if p.requires_grad}


def reset_adapters(model: nn.Module, generator_seed: int) -> None:
    """Re-initialises every LoRA layer as peft does for a fresh adapter (A Kaiming-uniform, B zero; R zero),
    reproducibly from ``generator_seed``. VeRA's trainable vectors are reset to their defaults."""
    state = torch.random.get_rng_state()
    torch.manual_seed(generator_seed)
    try:
        for layer in adapter_layers(model).values():
            if hasattr(layer, "reset_vera_parameters") and ADAPTER in getattr(layer, "vera_lambda_d", {}):
                layer.reset_vera_parameters(ADAPTER, d_initial=0.1)
            else:
                layer.reset_lora_parameters(ADAPTER, True)
                if isinstance(layer.lora_A[ADAPTER], LatentDown):
                    with torch.no_grad():
                        layer.lora_A[ADAPTER].R.weight.zero_()
    finally:
        torch.random.set_rng_state(state)


def fold_latent(model: nn.Module) -> None:
    """Turns every LoRA-SB layer into plain peft LoRA with the same update: B <- B R, R removed (exact:
    s (B R) A = s B R A up to float32 rounding), so ``save_pretrained`` and ``merge_and_unload`` see an
    ordinary adapter. In place: the model has no R afterwards."""
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            down = layer.lora_A[ADAPTER] if ADAPTER in getattr(layer, "lora_A", {}) else None  # VeRA: none
            if isinstance(down, LatentDown):
                B = layer.lora_B[ADAPTER].weight
                B.copy_((B.double() @ down.R.weight.double()).to(B.dtype))
                layer.lora_A[ADAPTER] = down.plain()


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """Live frozen base weights of the adapted layers, by module path (W [out, in], Conv1D [in, out])."""
    return {name: layer.get_base_layer().weight for name, layer in adapter_layers(model).items()}


def is_fan_in_fan_out(model: nn.Module, module: str) -> bool:
    """Whether the base weight of ``module`` is stored transposed (GPT-2 Conv1D)."""
    return _is_fan_in_fan_out(adapter_layers(model)[module].get_base_layer())


def merge_stacked_(W: Tensor, Bs: list[Tensor], As: list[Tensor], weights: Tensor, fan_in_fan_out: bool) -> None:
    """``W += sum_k weights_k B_k @ A_k`` in place (transposed for fan_in_fan_out), through the fused op."""
    with torch.no_grad():
        ops.stacked_delta_(W, Bs, As, weights.to(W.device, torch.float32), 1.0, transpose=fan_in_fan_out)


def rank_masks(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Gradient masks by parameter name from boolean rank masks ``[r]`` by module: an A factor's
    unselected rows and a B factor's unselected columns are 0 (LoRA-A2's rank selection)."""
    out = {}
    for name, mask in masks.items():
        keep = mask.to(torch.float32)
        out[f"{name}.lora_A"] = keep[:, None]
        out[f"{name}.lora_B"] = keep[None, :]
    return out
