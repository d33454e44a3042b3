"""Where a Flower run trains: the run config's device, model-dtype and gradient-checkpointing keys
(through Flower's own run-config parser and the app's declared keys), a node's own ``device`` from its
``node_config``, and GPU client resources for Flower's simulation engine read by Flower's own parsers
(Ray is never started here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

flwr = pytest.importorskip("flwr")

import torch
from conftest import cuda_kernels_available
from flowertools import InMemoryGrid
from flwr.app import Context, Message, RecordDict
from flwr.common.config import fuse_dicts, parse_config_args

from fedlora_ext.core.config import FedConfig
from fedlora_ext.federated.simulation import simulate
from fedlora_ext.flower import FedLoRAStrategy, FlowerRunError, config_from_run_config
from fedlora_ext.flower import client_app as client_app_module
from fedlora_ext.flower.client_app import app as client_app
from fedlora_ext.flower.client_app import node_device, runtime
from fedlora_ext.flower.records import config_record

APP = Path(__file__).resolve().parents[1] / "apps" / "fedlora" / "pyproject.toml"
needs_gpu = [pytest.mark.cuda, pytest.mark.skipif(not cuda_kernels_available(), reason="no GPU or no fedlora CUDA kernels")]


def declared() -> dict:
    return tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["config"]


def flwr_run_config(*overrides: str) -> dict:
    """The run config a ServerApp gets for ``flwr run --run-config "<overrides>"``: Flower's parser, fused
    with the app's declared keys (Flower refuses an undeclared key)."""
    return fuse_dicts(declared(), parse_config_args(list(overrides)))


def small(**changes) -> FedConfig:
    values = {"method": "fedit", "model": "tiny-bert", "num_clients": 3, "rounds": 2, "local_steps": 2,
              "num_examples": 96, "rank": 4, **changes}
    return FedConfig(**values)


# ---- run config ---------------------------------------------------------------------------------
def test_device_keys_are_declared_and_parsed_from_flwr_run():
    for key in ("device", "model-dtype", "gradient-checkpointing", "eval-every"):
        assert key in declared(), key
    config, _ = config_from_run_config(
        flwr_run_config("device='cuda:1' model-dtype='bfloat16' gradient-checkpointing=true eval-every=2"))
    assert (config.device, config.model_dtype, config.gradient_checkpointing, config.eval_every) == \
        ("cuda:1", "bfloat16", True, 2)
    config, _ = config_from_run_config(flwr_run_config("device='cuda' model-dtype='bfloat16'"))
    assert (config.device, config.model_dtype) == ("cuda", "bfloat16")
    default, _ = config_from_run_config({})
    config, _ = config_from_run_config(flwr_run_config())  # "" keeps the preset's values
    assert (config.device, config.model_dtype, config.gradient_checkpointing, config.eval_every) == \
        (default.device, default.model_dtype, default.gradient_checkpointing, default.eval_every)


def test_device_keys_as_strings():
    """Values as strings (a TOML file's or a caller's): "true"/"false", "none", quoted or not."""
    config, _ = config_from_run_config({"device": "cpu", "model-dtype": "float16", "gradient-checkpointing": "true",
                                        "eval-every": "3"})
    assert (config.device, config.model_dtype, config.gradient_checkpointing, config.eval_every) == \
        ("cpu", "float16", True, 3)
    config, _ = config_from_run_config({"device": "'cuda:0'", "gradient_checkpointing": "false", "eval-every": "none"})
    assert (config.device, config.gradient_checkpointing, config.eval_every) == ("cuda:0", False, None)


@pytest.mark.parametrize("key, value, message", [
    ("device", "gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*got 'gpu'"),
    ("device", "cuda:x", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*got 'cuda:x'"),
    ("model-dtype", "bf16", "model_dtype must be one of auto, float32, bfloat16, float16, got 'bf16'"),
    ("gradient-checkpointing", "yes", "gradient_checkpointing must be bool, got 'yes'"),
    ("gradient-checkpointing", 1, "gradient_checkpointing must be bool, got 1"),
    ("eval-every", "0", "eval_every must be >= 1"),
])
def test_bad_device_keys_are_one_line_errors(key, value, message):
    with pytest.raises(ValueError, match=message) as error:
        config_from_run_config({key: value})
    assert "\n" not in str(error.value)


def test_an_undeclared_key_is_refused_by_flower():
    with pytest.raises(ValueError, match="'devices' is not present"):
        flwr_run_config("devices='cuda'")


# ---- a node's own device ------------------------------------------------------------------------
def test_node_device_overrides_the_runs():
    config = small()
    assert node_device({"partition-id": 0}, config) == "auto"  # unset: the run's
    assert node_device({"partition-id": 0, "device": ""}, config) == "auto"
    assert node_device({"partition-id": 0, "device": "cpu"}, config) == "cpu"
    assert node_device({"partition-id": 0, "device": "auto"}, config.replace(device="cpu")) == "auto"


@pytest.mark.parametrize("value, message", [
    ("gpu", r"^node_config: device must be 'auto', 'cpu', 'cuda' or 'cuda:N' \(N a GPU index\), got 'gpu'$"),
    ("cuda:", r"^node_config: device must be .*got 'cuda:'$"),
    (1, r"^node_config: device must be str, got 1 \(int\)$"),
])
def test_a_bad_node_device_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        node_device({"partition-id": 0, "device": value}, small())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("value", ["cuda", "cuda:1"])
def test_a_gpu_node_device_without_a_gpu_is_one_line(value):
    with pytest.raises(ValueError, match=rf"^node_config: device '{value}': torch .*; use --device cpu") as error:
        node_device({"partition-id": 0, "device": value}, small())
    assert "\n" not in str(error.value)
    grid = InMemoryGrid(client_app, {1: {"partition-id": 0}, 2: {"partition-id": 1, "device": value},
                                     3: {"partition-id": 2}})
    with pytest.raises(FlowerRunError, match=f"node_config: device '{value}'"):  # the server names the node's error
        FedLoRAStrategy(small()).connect(grid)


def _hello(config: FedConfig) -> Message:
    return Message(RecordDict({"config": config_record(config)}), 5, "query")


def test_node_runtime_is_cached_per_node_device():
    """The node builds its runtime from the run's config with its own device, once per run and configuration."""
    config = small()
    client_app_module._RUNTIMES.clear()
    context = Context(run_id=3, node_id=5, node_config={"partition-id": 1, "device": "cpu"}, state=RecordDict(),
                      run_config={})
    node, node_config = runtime(_hello(config), context)
    assert node_config == config.replace(device="cpu") and node.config.device == "cpu"
    again, _ = runtime(_hello(config), context)
    assert again is node and len(client_app_module._RUNTIMES) == 1
    plain = Context(run_id=3, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    other, other_config = runtime(_hello(config), plain)  # without its own device: the run's
    assert other is not node and other_config == config
    client_app_module._RUNTIMES.clear()


def run_flower(config: FedConfig, nodes: dict[int, dict]):
    grid = InMemoryGrid(client_app, nodes)
    strategy = FedLoRAStrategy(config)
    strategy.connect(grid)
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=config.rounds, timeout=60)
    strategy.finish()
    return strategy


def test_a_flower_run_with_node_devices_matches_the_simulator():
    """Nodes told ``device='cpu'`` (one left to the run's ``auto``) end with the simulator's adapter bit for bit."""
    config = small(device="cpu")
    nodes = {10: {"partition-id": 0, "num-partitions": 3, "device": "cpu"},
             11: {"partition-id": 1, "num-partitions": 3, "device": "cpu"},
             12: {"partition-id": 2, "num-partitions": 3}}
    flower = run_flower(config, nodes)
    sim = simulate(config, progress=False)
    assert len(flower.history) == config.rounds
    a, b = sim.strategy.global_tensors(sim.state), flower.strategy.global_tensors(flower.state)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("device", [pytest.param("cuda:0", marks=needs_gpu)])
def test_a_flower_run_with_a_gpu_node(device):
    """On a GPU machine: one node trains on the GPU, the others and the server on the CPU; the run completes
    and transport stays CPU arrays (the records are numpy)."""
    config = small(device="cpu")
    nodes = {10: {"partition-id": 0, "device": device}, 11: {"partition-id": 1}, 12: {"partition-id": 2}}
    flower = run_flower(config, nodes)
    assert len(flower.history) == config.rounds
    assert all(t.device.type == "cpu" for t in flower.strategy.global_tensors(flower.state).values())


# ---- GPU resources on Flower's simulation engine ------------------------------------------------
def test_gpu_client_resources_parse_with_flwr_run():
    """``flwr run apps/fedlora local --federation-config "num-supernodes=4 client-resources-num-gpus=0.25"``:
    Flower's own parsing of --federation-config into the SimulationConfig it sends, and the Ray backend
    config the simulation runtime builds from it (the README's recipe)."""
    from flwr.cli.run.run import _parse_federation_config_overrides
    from flwr.cli.typing import SuperLinkConnection
    from flwr.simulation.app import _run_simulation_settings

    local = SuperLinkConnection(name="local", address=":local:")
    sim_config = _parse_federation_config_overrides(
        ["num-supernodes=4 client-resources-num-cpus=2 client-resources-num-gpus=0.25"], local)
    assert sim_config.num_supernodes == 4 and sim_config.client_resources_num_gpus == 0.25
    supernodes, backend, backend_config, _, _ = _run_simulation_settings(sim_config)
    assert (supernodes, backend) == (4, "ray")
    assert backend_config["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}
    with pytest.raises(ValueError, match="Unknown simulation config field"):
        _parse_federation_config_overrides(["num-gpus=0.25"], local)


def test_gpu_client_resources_in_a_connection_parse():
    """The same in a ``[superlink.<name>]`` connection of Flower's config.toml (``options.``, which Flower
    1.42 still reads but calls deprecated), and Flower's check of the value."""
    from flwr.cli.flower_config import parse_superlink_connection
    from flwr.cli.run.run import _parse_deprecated_options
    from flwr.simulation.app import _run_simulation_settings

    text = """
[superlink.local-gpu]
address = ":local:"
options.num-supernodes = 4
options.backend.client-resources.num-cpus = 2
options.backend.client-resources.num-gpus = 0.25
"""
    connection = parse_superlink_connection(tomllib.loads(text)["superlink"]["local-gpu"], "local-gpu")
    assert connection.options.num_supernodes == 4
    assert connection.options.backend.client_resources.num_gpus == 0.25
    _, _, backend_config, _, _ = _run_simulation_settings(_parse_deprecated_options(connection))
    assert backend_config["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}
    bad = tomllib.loads(text.replace("num-gpus = 0.25", 'num-gpus = "quarter"'))["superlink"]["local-gpu"]
    with pytest.raises(ValueError, match="client-resources.num-gpus must be a number"):
        parse_superlink_connection(bad, "local-gpu")


def test_gpu_client_resources_pass_the_ray_backends_check():
    """The Ray backend's own check of the client resources (without starting Ray: __init__ would)."""
    pytest.importorskip("ray")
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    backend = RayBackend.__new__(RayBackend)
    backend.client_resources_key = "client_resources"
    resources = {"client_resources": {"num_cpus": 2, "num_gpus": 0.25}, "init_args": {}}
    assert backend._validate_client_resources(resources) == {"num_cpus": 2, "num_gpus": 0.25}
    with pytest.raises(ValueError, match="client resources are expected to be of type"):
        backend._validate_client_resources({"client_resources": {"num_gpus": "0.25"}})
