"""The federated layer: configuration, adapters, clients, the in-process simulator."""

from fedlora_ext.core.config import FedConfig, preset, preset_names
from fedlora_ext.federated.server import Server
from fedlora_ext.federated.simulation import Simulation, SimulationResult, simulate

__all__ = ["FedConfig", "Server", "Simulation", "SimulationResult", "preset", "preset_names", "simulate"]
