"""Per-sample gradients of adapter parameters from module hooks (what opacus's GradSampleModule does,
for the layers a LoRA / VeRA model trains, without wrapping the model).

A forward hook keeps each hooked layer's input; a hook on the layer's output turns the output gradient
into one gradient per sample: ``[B, *param.shape]``. Supported owners: ``nn.Linear`` (peft's
``lora_A`` / ``lora_B``, a classification head) and peft VeRA layers (``vera_lambda_d`` / ``_b``).
The loss must be a sum of per-sample losses: a batch mean over tokens would make one sample's
gradient depend on the others (and its sensitivity unbounded).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ADAPTER = "default"


def _is_vera_layer(module: nn.Module) -> bool:
    return _ADAPTER in getattr(module, "vera_lambda_d", {})


class PerSampleGradients:
    """Collects per-sample gradients of ``params`` while active (``with PerSampleGradients(...) as g``).

    After a backward, ``grad_samples[i]`` is the ``[B, *params[i].shape]`` per-sample gradient of
    ``params[i]`` (summed over repeated calls of one layer); ``clear()`` drops them before the next step.

    Raises:
        ValueError: if ``params`` is empty, or a parameter is not owned by a supported layer.
    """

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("PerSampleGradients: params is empty; the model has no trainable adapter parameters")
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._layers = self._owners(model)
        self._handles: list = []
        self.grad_samples: list[Tensor | None] = [None] * len(self.params)

    def _owners(self, model: nn.Module) -> list[nn.Module]:
        layers, covered = [], set()
        for module in model.modules():
            if _is_vera_layer(module):
                owned = [module.vera_lambda_d[_ADAPTER], module.vera_lambda_b[_ADAPTER]]
                if any(id(p) in self._index for p in owned) and not isinstance(module.vera_dropout[_ADAPTER], nn.Identity):
                    raise ValueError("PerSampleGradients: VeRA layers with dropout are not supported (vera_dropout must be 0)")
            elif isinstance(module, nn.Linear):
                owned = [p for p in (module.weight, module.bias) if p is not None]
            else:
                continue
            mine = [id(p) for p in owned if id(p) in self._index]
            if mine:
                layers.append(module)
                covered.update(mine)
        missing = [i for i, p in enumerate(self.params) if id(p) not in covered]
        if missing:
            names = {id(p): n for n, p in model.named_parameters()}
            shown = [names.get(id(self.params[i]), f"params[{i}]") for i in missing[:3]]
            raise ValueError(
                f"PerSampleGradients: parameters {shown} are not owned by an nn.Linear or a peft VeRA layer; "
                "per-sample gradients are supported for LoRA A/B, VeRA vectors and linear heads"
            )
        return layers

    def __enter__(self) -> PerSampleGradients:
        self._handles = [layer.register_forward_hook(self._on_forward) for layer in self._layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.grad_samples = [None] * len(self.params)

    def _on_forward(self, layer: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = inputs[0].detach()
        compute = self._vera_grads if _is_vera_layer(layer) else self._linear_grads
        output.register_hook(lambda grad: compute(layer, x, grad.detach()))

    def _add(self, param: nn.Parameter, value: Tensor) -> None:
        i = self._index.get(id(param))
        if i is None or not param.requires_grad:
            return
        value = value.to(param.dtype)
        self.grad_samples[i] = value if self.grad_samples[i] is None else self.grad_samples[i] + value

    def _linear_grads(self, layer: nn.Linear, x: Tensor, grad: Tensor) -> None:
        # in the parameter's precision, at least float32: under autocast the output gradient is 16-bit
        dtype = torch.promote_types(layer.weight.dtype, torch.float32)
        batch = grad.shape[0]
        g = grad.reshape(batch, -1, grad.shape[-1]).to(dtype)
        if layer.weight.requires_grad:
            inputs = x.reshape(batch, -1, x.shape[-1]).to(dtype)
            self._add(layer.weight, torch.bmm(g.transpose(1, 2), inputs))  # sum_t g_t x_t^T
        if layer.bias is not None and layer.bias.requires_grad:
            self._add(layer.bias, g.sum(1))

    def _vera_grads(self, layer: nn.Module, x: Tensor, grad: Tensor) -> None:
        # peft's VeRA: y = W x + lambda_b * (B (lambda_d * (A x))), A and B frozen and shared.
        lambda_d, lambda_b = layer.vera_lambda_d[_ADAPTER], layer.vera_lambda_b[_ADAPTER]
        A = layer.vera_A[_ADAPTER][:, : layer.in_features].to(x.device, lambda_d.dtype)
        B = layer.vera_B[_ADAPTER][: layer.out_features, :].to(x.device, lambda_d.dtype)
        batch = grad.shape[0]
        g = grad.to(lambda_d.dtype).reshape(batch, -1, grad.shape[-1])
        h = F.linear(x.to(lambda_d.dtype).reshape(batch, -1, x.shape[-1]), A)  # [B, T, r]
        with torch.no_grad():
            if lambda_b.requires_grad:
                self._add(lambda_b, (g * F.linear(lambda_d * h, B)).sum(1))
            if lambda_d.requires_grad:
                self._add(lambda_d, ((g * lambda_b) @ B * h).sum(1))
