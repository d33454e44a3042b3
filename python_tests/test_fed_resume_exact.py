"""Resume from a checkpoint is bit for bit for the methods whose client or server state is not plain
FedAvg's: RoLoRA (each client keeps its frozen factor and its last round, which decide its download) and
Fed-SB (the fixed frame lives in the global state, R is what trains), both under DP-SGD (each client's
noise offsets and account survive) and with clients that skip rounds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedlora_ext.federated import Simulation
from fedtools import one_thread  # noqa: F401  (autouse fixture)
from fedtools import small_config


@pytest.mark.parametrize("method", ["rolora", "fed_sb"])
def test_resume_after_two_rounds_equals_the_uninterrupted_run(method, tmp_path):
    def config(folder):
        return small_config(method, num_clients=3, participation=0.67, rounds=4, local_steps=2, dp_epsilon=8.0,
                            dp_noise_seed=7, out_dir=str(folder))

    torch.manual_seed(0)
    whole = Simulation(config(tmp_path / "whole"))
    whole.run(progress=False)
    torch.manual_seed(0)
    cut = Simulation(config(tmp_path / "cut"))
    (tmp_path / "cut").mkdir()
    for round_index in range(2):
        cut.step(round_index)
        cut.save_checkpoint(round_index + 1, tmp_path / "cut")
    assert any(c.tensors for c in cut.clients) == (method == "rolora")  # RoLoRA's clients keep a factor
    resumed = Simulation.resume(tmp_path / "cut")
    resumed.run(progress=False)
    want, got = load_file(str(tmp_path / "whole" / "adapter.safetensors")), load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert [h["bytes_down"] for h in whole.history] == [h["bytes_down"] for h in resumed.history]
