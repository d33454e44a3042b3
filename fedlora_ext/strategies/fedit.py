"""FedIT (Zhang et al., arXiv 2305.05644): FedAvg of A and B separately.

Inexact: (sum p_k B_k)(sum p_k A_k) != sum p_k B_k A_k (METHODS.md). With heterogeneous ranks the
factors are zero-padded to the largest rank before averaging. All of it is the Strategy defaults.
"""

from fedlora_ext.strategies.base import Strategy, register


@register
class FedIT(Strategy):
    name = "fedit"
    averages_updates = True
