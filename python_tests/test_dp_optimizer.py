"""The fused DP optimizer against opacus 1.6's own DPOptimizer: same step with the noise off, same noise
statistics with it on, opacus's path kept where the fused op does not apply, one-line drop-in."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from torch import nn

from fedlora_ext.dp import FusedDPOptimizer, fuse


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def _pair(model: nn.Module, **dp):
    """The same model twice, under opacus's optimizer and under the fused one."""
    reference, fused = GradSampleModule(copy.deepcopy(model)), GradSampleModule(copy.deepcopy(model))
    opt_ref = DPOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), **dp)
    opt_fused = FusedDPOptimizer(torch.optim.SGD(fused.parameters(), lr=0.1), noise_seed=7, **dp)
    return (reference, opt_ref), (fused, opt_fused)


def _step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("batch", [1, 5, 32])
@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 100.0])
def test_noise_off_equals_opacus(batch, max_grad_norm):
    """Several steps with clipping active or not: parameters agree to float rounding."""
    (m1, o1), (m2, o2) = _pair(_mlp(), noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=batch)
    gen = torch.Generator().manual_seed(batch)
    for _ in range(3):
        x, y = torch.randn(batch, 10, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
        _step(m1, o1, x, y)
        _step(m2, o2, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sum_reduction_equals_opacus():
    (m1, o1), (m2, o2) = _pair(_mlp(), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=None,
                               loss_reduction="sum")
    x, y = torch.randn(6, 10), torch.randint(0, 3, (6,))
    for model, opt in ((m1, o1), (m2, o2)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_noise_statistics_match_opacus():
    """The noise of one step has std sigma * C / B per coordinate, as opacus's (not the same values)."""
    sigma, C, B = 1.3, 0.7, 4
    model = GradSampleModule(nn.Linear(300, 200))
    opt = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma, max_grad_norm=C,
                           expected_batch_size=B)
    clean = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                             expected_batch_size=B)
    x = torch.randn(B, 300)
    grads = []
    for optimizer in (opt, clean):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.pre_step()
        grads.append(model._module.weight.grad.clone())
    noise = grads[0] - grads[1]
    expected = sigma * C / B
    assert abs(noise.mean().item()) < 5 * expected / noise.numel() ** 0.5
    assert noise.std().item() == pytest.approx(expected, rel=0.02)


def test_fresh_noise_every_step():
    model = GradSampleModule(nn.Linear(50, 50))
    opt = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=2)
    seen = []
    for _ in range(2):
        opt.zero_grad()
        model(torch.zeros(2, 50)).sum().backward()  # zero input: weight grad is pure noise
        opt.step()
        seen.append(model._module.weight.grad.clone())
    assert not torch.equal(seen[0], seen[1])
    corr = torch.corrcoef(torch.stack([seen[0].flatten(), seen[1].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.1


def test_empty_poisson_batch_is_pure_noise():
    """B = 0 (an empty Poisson batch): the gradient is noise / expected_batch_size, as in opacus."""
    model = nn.Linear(4, 3)
    opt = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=2.0, max_grad_norm=1.0,
                           expected_batch_size=8)
    for p in model.parameters():
        p.grad_sample = torch.zeros(0, *p.shape)
    assert opt.pre_step()
    for p in model.parameters():
        assert p.grad.shape == p.shape and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_virtual_steps_fall_back_to_opacus():
    """A skipped (accumulating) step followed by a real one: identical to opacus with the noise off."""
    (m1, o1), (m2, o2) = _pair(_mlp(), noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=8)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    for model, opt in ((m1, o1), (m2, o2)):
        opt.zero_grad()
        opt.signal_skip_step(do_skip=True)
        nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
        opt.step()  # skipped: clipped grads stay accumulated in summed_grad
        opt.zero_grad()  # keeps summed_grad after a skipped step
        nn.functional.cross_entropy(model(x[4:]), y[4:]).backward()
        opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fuse_is_a_one_line_drop_in_for_make_private():
    """make_private, then ``fuse(optimizer)``: training runs, the accountant counts every step, the
    weights move every step."""
    model = _mlp()
    data = torch.utils.data.TensorDataset(torch.randn(64, 10), torch.randint(0, 3, (64,)))
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=torch.utils.data.DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0)
    optimizer = fuse(optimizer)
    assert isinstance(optimizer, FusedDPOptimizer)
    steps = 0
    for x, y in loader:
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        steps += 1
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sum(n for _, _, n in engine.accountant.history) == steps
    assert engine.get_epsilon(delta=1e-5) > 0


def test_fuse_rejects_other_clipping_modes():
    model = nn.Linear(3, 3)
    per_layer = DPPerLayerOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                    max_grad_norm=[1.0, 1.0], expected_batch_size=2)
    with pytest.raises(TypeError, match="DPPerLayerOptimizer"):
        fuse(per_layer)


def test_secure_mode_keeps_opacus_noise():
    """secure_mode asks for opacus's floating-point-attack-resistant sampler: the step is opacus's."""
    model = GradSampleModule(nn.Linear(5, 2))
    opt = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=2, secure_mode=True)
    model(torch.randn(2, 5)).sum().backward()
    assert not opt._fusable()
    opt.step()
    assert torch.isfinite(model._module.weight).all()


def test_peft_lora_noise_off_equals_opacus_and_weights_move():
    """On a peft LoRA model (tiny BERT, q and v): the fused step equals opacus's, and the trained LoRA
    B factors change every step (opacus issue 820: LoRA under DP can silently stop updating). A is not
    checked: with B = 0 at the start its gradient is zero, then too small to move it in float32 here."""
    from fedlora_ext.data import build_model
    from fedlora_ext.federated.adapters import AdapterSpec, attach_adapter

    base = attach_adapter(build_model("tiny-bert", "classification", 3, seed=1), AdapterSpec(rank=4), "SEQ_CLS")
    for module in base.modules():  # dropout off (opacus needs train mode): both models see one forward pass
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    (m1, o1), (m2, o2) = _pair(base, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=6)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids, labels = torch.randint(0, 64, (6, 12), generator=gen), torch.randint(0, 3, (6,), generator=gen)
        moved = []
        for model, opt in ((m1, o1), (m2, o2)):
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            opt.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            moved.append(all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n))
        assert all(moved)
    for (n1, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n1)
