"""FedProx (Li et al., arXiv 1812.06127) over FedIT: the local loss gains (mu / 2) ||w - w_global||^2.

The proximal term itself lives in the local trainer and applies to any method with ``fedprox_mu > 0``;
this name is FedIT with that term required. In METHODS.md's terms w_global is what the client downloaded
this round, so the term covers exactly the downloaded tensors that it trains:
  - FedIT / FedProx, FedEx-LoRA, HetLoRA: A and B (HetLoRA: the first r_k ranks it received) and the head;
  - FFA-LoRA: B and the head (A is frozen and never travels);
  - FedSA-LoRA: A only (VeRA: d); the client's own B (b) and head stay unpulled: they are its own, not the
    server's;
  - FLoRA: the head (the adapters start fresh each round; the stacks merge into the base, which is frozen);
  - LoRA-A2: the head, and the factor it trains when it downloaded it (not one it kept from its last round).
It is added after the DP-SGD clip-and-noise step (post-processing: no privacy cost).
"""

from fedlora_ext.strategies.base import register
from fedlora_ext.strategies.fedit import FedIT


@register
class FedProx(FedIT):
    name = "fedprox"

    def validate(self, config) -> None:
        super().validate(config)
        if not config.fedprox_mu > 0:
            raise ValueError(f"method 'fedprox' needs fedprox_mu > 0, got {config.fedprox_mu}")
