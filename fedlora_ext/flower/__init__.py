"""Running on Flower (many machines): our strategies as a Flower ServerApp and ClientApp.

``fedlora_ext.flower.server_app:app`` and ``fedlora_ext.flower.client_app:app`` are the components of
the Flower app in ``apps/fedlora`` (``flwr run apps/fedlora <federation>``). Needs ``flwr``:
``pip install "fedlora_ext[flower]"``.
"""

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("fedlora_ext.flower needs Flower: pip install 'flwr>=1.41,<2' "
                      "(or install fedlora_ext with the [flower] extra)") from error

from fedlora_ext.flower.run_config import config_from_run_config
from fedlora_ext.flower.strategy import FedLoRAStrategy, FlowerRunError

__all__ = ["FedLoRAStrategy", "FlowerRunError", "config_from_run_config"]
