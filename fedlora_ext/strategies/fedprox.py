"""FedProx (Li et al., arXiv 1812.06127) over FedIT: the local loss gains (mu / 2) ||w - w_global||^2.

The proximal term itself lives in the local trainer and applies to any method with ``fedprox_mu > 0``;
this name is FedIT with that term required.
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
