"""Configuration: bad settings fail before any training with a message naming the problem; TOML round
trip; every packaged preset loads and builds."""

from __future__ import annotations

import pytest

from fedlora_ext.federated import FedConfig, Simulation, preset, preset_names, simulate
from fedlora_ext.federated import client as client_module
from fedlora_ext.strategies import make_strategy
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config


@pytest.fixture
def no_training(monkeypatch):
    """Makes any local training step a test failure: errors must come before it."""

    def fail(*args, **kwargs):
        raise AssertionError("training started before the configuration error was raised")

    monkeypatch.setattr(client_module.LocalTrainer, "train", fail)


# ---- errors raised by FedConfig itself --------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"dirichlet_alpha": 0.0}, r"dirichlet_alpha must be > 0 \(or None for IID\), got 0.0"),
    ({"dirichlet_alpha": -0.5}, r"dirichlet_alpha must be > 0"),
    ({"num_clients": 0}, r"num_clients must be >= 1, got 0"),
    ({"num_clients": 4, "client_ranks": (4, 2)},
     r"client_ranks has 2 entries, expected one per client \(num_clients = 4\)"),
    ({"num_clients": 2, "client_ranks": (4, 0)}, r"client_ranks must all be >= 1"),
    ({"rank": 0}, r"rank must be >= 1"),
    ({"participation": 0.0}, r"participation must be in \(0, 1\]"),
    ({"task": "translation"}, r"task must be one of"),
    ({"adapter": "ia3"}, r"adapter must be 'lora' or 'vera'"),
    ({"num_examples": 2, "num_clients": 3}, r"num_examples \(2\) must be >= num_clients \(3\)"),
])
def test_config_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        small_config("fedit", **changes)


# ---- errors raised when the run is built, before any training ---------------------------------------
@pytest.mark.parametrize("method, changes, message", [
    ("no_such_method", {}, r"unknown method 'no_such_method'; known methods: \[.*'fedit'.*\]"),
    ("fedprox", {"fedprox_mu": 0.0}, r"method 'fedprox' needs fedprox_mu > 0, got 0.0"),
    ("fedsa_rslora", {"rslora": False}, r"method 'fedsa_rslora' needs rslora = true"),
    ("fedsa_vera", {"adapter": "lora"}, r"method 'fedsa_vera' supports adapters \('vera',\), got 'lora'"),
    ("fedit", {"adapter": "vera"}, r"method 'fedit' supports adapters \('lora',\), got 'vera'"),
    ("lora_a2", {"rank": 4, "num_clients": 2, "client_ranks": (2, 8)}, r"lora_a2: client budgets \[2, 8\] exceed"),
    ("fedit", {"target_modules": ("nope",)}, r"target_modules \['nope'\] match no module"),
])
def test_run_rejects(no_training, method, changes, message):
    config = small_config(method, **changes)
    with pytest.raises(ValueError, match=message):
        simulate(config, progress=False)


@pytest.mark.parametrize("method",
                         ["ffa_lora", "fedsa_lora", "fedsa_rslora", "fedsa_vera", "fedex_lora", "centralized"])
def test_heterogeneous_ranks_rejected_where_the_method_cannot_take_them(no_training, method):
    config = small_config(method, num_clients=3, client_ranks=(4, 2, 1))
    with pytest.raises(ValueError, match=rf"method '{method}' cannot take heterogeneous client ranks \[4, 2, 1\]"):
        make_strategy(config)
    with pytest.raises(ValueError, match="cannot take heterogeneous client ranks"):
        simulate(config, progress=False)
    # the same rank for everyone is not heterogeneous
    make_strategy(config.replace(client_ranks=(4, 4, 4)))


@pytest.mark.parametrize("model, changes, layer", [
    ("tiny-bert", {"rank": 64}, r"rank 64 is larger than layer .*query allows \(weight \(32, 32\)\): at most 32"),
    ("tiny-bert", {"method": "flora", "client_ranks": (8, 40, 2)}, r"rank 40 is larger than layer"),
    ("tiny-gpt2", {"rank": 33}, r"rank 33 is larger than layer .*c_attn allows \(weight \(32, 96\)\): at most 32"),
])
def test_rank_larger_than_the_layer(no_training, model, changes, layer):
    task = "classification" if model == "tiny-bert" else "causal_lm"
    config = small_config(changes.pop("method", "fedit"), model=model, task=task, **changes)
    with pytest.raises(ValueError, match=layer):
        Simulation(config)


def test_rank_equal_to_the_layer_is_fine():
    Simulation(small_config("fedit", rank=32))


# ---- TOML ---------------------------------------------------------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_toml(path, values: dict) -> None:
    """A minimal TOML writer for flat FedConfig dictionaries (TOML has no null: None is left out, except
    an IID partition, spelled ``dirichlet_alpha = "iid"``)."""
    lines = []
    for key, value in values.items():
        if value is None:
            if key != "dirichlet_alpha":
                continue
            value = "iid"
        lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("config", [
    FedConfig(method="hetlora", model="tiny-llama", task="causal_lm", rank=8, alpha=12.5,
              target_modules=("q_proj", "v_proj"), client_ranks=(8, 4, 2, 1), num_clients=4,
              participation=0.5, rounds=7, dirichlet_alpha=0.3, hetlora_lambda=0.01, rslora=True,
              out_dir="/tmp/somewhere", seed=11),
    FedConfig(method="fedsa_vera", adapter="vera", dirichlet_alpha=None, lr=0.1, optimizer="sgd"),
    FedConfig(),
], ids=["hetlora", "iid-vera", "defaults"])
def test_toml_round_trip(tmp_path, config):
    path = tmp_path / "run.toml"
    write_toml(path, config.to_dict())
    assert FedConfig.from_toml(path) == config


def test_toml_preset_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "hetlora"\nrounds = 2\ndirichlet_alpha = "iid"\n')
    config = FedConfig.from_toml(path)
    assert config == preset("hetlora").replace(rounds=2, dirichlet_alpha=None)


def test_toml_unknown_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "fedit"\nnum_client = 4\n')
    with pytest.raises(ValueError, match=r"FedConfig \(.*run.toml\): unknown key 'num_client'; did you mean num_clients"):
        FedConfig.from_toml(path)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; presets: \["):
        preset("nope")


# ---- presets ------------------------------------------------------------------------------------------
def test_presets_cover_the_seed_papers():
    assert set(preset_names()) >= {"fedit", "fedprox", "ffa_lora", "fedsa_lora", "flora_homogeneous",
                                   "flora_heterogeneous", "hetlora", "lora_a2", "fedex_lora"}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_builds(name):
    """Each packaged preset is a valid configuration whose strategy and tiny model can be built (ranks fit
    the layers, heterogeneous ranks only where allowed)."""
    config = preset(name)
    assert isinstance(config, FedConfig)
    assert make_strategy(config).name == config.method
    real_text = config.dataset != "synthetic"  # the main job's preset: a slice of the packaged corpus
    sim = Simulation(config.replace(num_examples=max(64, config.num_clients * 4),
                                    max_examples=200 if real_text else None))
    assert len(sim.clients) == config.num_clients
    assert [c.rank for c in sim.clients] == (list(config.ranks()) if config.method != "lora_a2"
                                             else [config.rank] * config.num_clients)


@pytest.mark.parametrize("changes,match", [
    ({"rank": "abc"}, r"rank must be int, got 'abc' \(str\)"),
    ({"rank": 2.5}, r"rank must be int, got 2.5 \(float\)"),
    ({"lr": "fast"}, r"lr must be float, got 'fast'"),
    ({"personal_eval": 1}, r"personal_eval must be bool, got 1 \(int\)"),
    ({"target_modules": ("query", 3)}, r"target_modules must be tuple\[str, ...\]"),
    ({"dp_epsilon": True}, r"dp_epsilon must be float \| None, got True"),
])
def test_wrong_types_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        FedConfig(**changes)


def test_ints_are_accepted_for_floats():
    config = FedConfig(lr=1, alpha=8)
    assert config.lr == 1.0 and isinstance(config.lr, float) and isinstance(config.alpha, float)


def test_cosine_lr_schedule_sets_each_rounds_client_lr(monkeypatch):
    config = small_config("fedit", rounds=4, local_steps=1, lr=0.2, lr_schedule="cosine")
    assert [config.round_lr(t) for t in range(4)] == pytest.approx([0.2, 0.1707107, 0.1, 0.0292893])
    assert config.replace(lr_schedule="constant").round_lr(3) == 0.2
    seen = []
    original = client_module.LocalTrainer.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.lr)

    monkeypatch.setattr(client_module.LocalTrainer, "__init__", record)
    Simulation(config).run(progress=False)
    per_round = [seen[i:i + config.num_clients] for i in range(0, len(seen), config.num_clients)]
    assert per_round == [[config.round_lr(t)] * config.num_clients for t in range(4)]
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, got 'linear'"):
        FedConfig(lr_schedule="linear")
