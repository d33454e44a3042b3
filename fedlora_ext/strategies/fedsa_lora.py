"""FedSA-LoRA (Guo et al., ICLR'25, arXiv 2410.01463): A is shared and averaged, every client keeps its
own B (and head): A learns what is general, B what is the client's own.

Variants: ``fedsa_rslora`` (rsLoRA scaling alpha / sqrt(r); set ``rslora = true``) and ``fedsa_vera``
(VeRA: the vectors d [r] are shared, b [out] stay local).
"""

from __future__ import annotations

from fedlora_ext.core.state import ClientState, GlobalState
from fedlora_ext.strategies.base import Strategy, factor_kind, register

_SHARED = ("lora_A", "vera_d")


@register
class FedSALoRA(Strategy):
    name = "fedsa_lora"
    averages_updates = True
    heterogeneous_ranks = False
    personalised = True
    global_model = False  # the server never sees a B: each client's model is the model

    def global_tensors(self, state: GlobalState):
        """Only the shared A (VeRA: d) means anything at the server; B and heads are the clients'."""
        return {n: t for n, t in state.tensors.items() if factor_kind(n) in _SHARED}

    def download(self, state: GlobalState, client: ClientState, round_index: int):
        return {n: t.clone() for n, t in self.global_tensors(state).items()}

    def upload_kinds(self, round_index: int) -> set[str]:
        return super().upload_kinds(round_index) & set(_SHARED)

    def upload(self, model, client, start, round_index):
        trained = super().upload(model, client, start, round_index)
        return {n: t for n, t in trained.items() if factor_kind(n) in _SHARED}

    def keep(self, model, client, round_index):
        from fedlora_ext.core import adapters

        return {n: t.detach().clone() for n, t in adapters.shared_parameters(model).items() if factor_kind(n) not in _SHARED}


@register
class FedSARsLoRA(FedSALoRA):
    name = "fedsa_rslora"

    def validate(self, config) -> None:
        super().validate(config)
        if not config.rslora:
            raise ValueError("method 'fedsa_rslora' needs rslora = true (scaling alpha / sqrt(r))")


@register
class FedSAVeRA(FedSALoRA):
    name = "fedsa_vera"
    adapter_kinds = ("vera",)
