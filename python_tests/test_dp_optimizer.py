"""The fused DP optimizer against opacus 1.6's own DPOptimizer: same step with the noise off, same noise
statistics with it on, opacus's path kept where the fused op does not apply, one-line drop-in."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from torch import nn

from fedlora_ext import reference
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


def test_virtual_steps_equal_opacus():
    """A skipped (accumulating) step followed by a real one, on the fused path: identical to opacus with
    the noise off."""
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
    assert not opt._fusable(opt.params)
    opt.step()
    assert torch.isfinite(model._module.weight).all()


def test_peft_lora_noise_off_equals_opacus_and_weights_move():
    """On a peft LoRA model (tiny BERT, q and v): the fused step equals opacus's, and the trained LoRA
    B factors change every step (opacus issue 820: LoRA under DP can silently stop updating). A is not
    checked: with B = 0 at the start its gradient is zero, then too small to move it in float32 here."""
    from fedlora_ext.data import build_model
    from fedlora_ext.core.adapters import AdapterSpec, attach_adapter

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


# ------------------------------------------------------------------ opacus bookkeeping (issue 14 item 4)


def _backward(model, x, y) -> None:
    nn.functional.cross_entropy(model(x), y).backward()


def test_reused_per_sample_grads_are_refused_like_opacus():
    """A second step without a new backward: opacus's ValueError, the weights do not move again and the
    accountant does not count the reused batch."""
    from opacus.accountants import RDPAccountant

    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    for fused in (False, True):
        model = GradSampleModule(_mlp())
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=8)
        accountant = RDPAccountant()
        opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.1))
        opt = fuse(opt) if fused else opt
        _backward(model, x, y)
        opt.step()
        after_first = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match="Gradients haven't been cleared since the last optimizer step"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(after_first, model.parameters()))
        assert sum(n for _, _, n in accountant.history) == 1
        # a new backward without zero_grad appends to the used grad_sample: still refused
        _backward(model, x, y)
        with pytest.raises(ValueError, match="zero_grad"):
            opt.step()
        assert sum(n for _, _, n in accountant.history) == 1
        opt.zero_grad()
        _backward(model, x, y)
        opt.step()
        assert sum(n for _, _, n in accountant.history) == 2


def _attrs(model, opt):
    return ([None if p.summed_grad is None else p.summed_grad.clone() for p in model.parameters()],
            [p.grad.clone() for p in model.parameters()], opt._is_last_step_skipped)


def test_summed_grad_and_flags_match_opacus():
    """p.summed_grad (the clipped sum), p.grad, the used marks and _is_last_step_skipped after a real
    step, a skipped step and the step that closes it, all without falling back to opacus."""
    (m1, o1), (m2, o2) = _pair(_mlp(), noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=8)
    x, y = torch.randn(12, 10), torch.randint(0, 3, (12,))
    for model, opt in ((m1, o1), (m2, o2)):
        opt.zero_grad()
        _backward(model, x[:4], y[:4])
        opt.step()
    assert o2._fusable(o2.params)
    for (s1, g1, k1), (s2, g2, k2) in [(_attrs(m1, o1), _attrs(m2, o2))]:
        for a, b in zip(s1 + g1, s2 + g2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert k1 is k2 is False
    for p in m2.parameters():
        assert p.grad_sample._processed and p.summed_grad._processed and p.grad is not p.summed_grad
    for model, opt in ((m1, o1), (m2, o2)):
        opt.zero_grad()
        opt.signal_skip_step(do_skip=True)
        _backward(model, x[4:8], y[4:8])
        assert opt.step() is None
    s1, s2 = [p.summed_grad for p in m1.parameters()], [p.summed_grad for p in m2.parameters()]
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert o1._is_last_step_skipped and o2._is_last_step_skipped
    assert not any(hasattr(s, "_processed") for s in s2)
    for model, opt in ((m1, o1), (m2, o2)):
        opt.zero_grad()  # keeps summed_grad after a skipped step
        _backward(model, x[8:], y[8:])
        opt.step()
    for a, b in zip(list(m1.parameters()) + [p.summed_grad for p in m1.parameters()],
                    list(m2.parameters()) + [p.summed_grad for p in m2.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not o2._is_last_step_skipped


def test_accumulated_iterations_match_opacus():
    """Several backward passes before one step: grad_sample is a list, the mean divides by B * k."""
    (m1, o1), (m2, o2) = _pair(_mlp(), noise_multiplier=0.0, max_grad_norm=0.2, expected_batch_size=4)
    x, y = torch.randn(12, 10), torch.randint(0, 3, (12,))
    for model, opt in ((m1, o1), (m2, o2)):
        for i in range(3):
            _backward(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
        assert opt.accumulated_iterations == 3
        opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def _noisy_run(opt_factory, steps=2):
    model = GradSampleModule(nn.Linear(6, 4))
    torch.nn.init.zeros_(model._module.weight)
    opt = opt_factory(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 6, generator=gen)).sum().backward()
        opt.step()
    return model._module.weight.detach().clone()


def _dp(model, **kw):
    return DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=3, **kw)


def test_seed_makes_noise_reproducible():
    a = _noisy_run(lambda m: fuse(_dp(m), seed=11))
    b = _noisy_run(lambda m: fuse(_dp(m), seed=11))
    c = _noisy_run(lambda m: fuse(_dp(m), seed=12))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="seed"):
        fuse(_dp(GradSampleModule(nn.Linear(2, 2))), seed=-1)
    with pytest.raises(ValueError, match="not both"):
        fuse(_dp(GradSampleModule(nn.Linear(2, 2)), generator=torch.Generator()), seed=1)


def test_generator_makes_noise_reproducible_like_opacus():
    """opacus's generator semantics: the noise is a function of the generator's state (reseed to replay)."""
    gen = torch.Generator()
    runs = []
    for _ in range(2):
        def factory(m):
            opt = fuse(_dp(m, generator=gen))
            gen.manual_seed(8888)  # after construction, as opacus's randomness_test does
            return opt
        runs.append(_noisy_run(factory))
    assert torch.equal(runs[0], runs[1])
    # without reseeding the generator moves on: different noise
    assert not torch.allclose(runs[1], _noisy_run(lambda m: fuse(_dp(m, generator=gen))))
    # fuse(generator=...) on an optimizer without one: torch.default_generator follows torch.manual_seed
    replay = []
    for _ in range(2):
        torch.manual_seed(1337)
        replay.append(_noisy_run(lambda m: fuse(_dp(m), generator=torch.default_generator)))
    assert torch.equal(*replay)


def test_default_noise_never_touches_the_global_rng():
    """By default the key is a fresh secret: torch.manual_seed does not replay the noise, and the global
    generator is not consumed (also on the mixed-dtype fallback path)."""
    runs = []
    for _ in range(2):
        torch.manual_seed(1337)
        runs.append(_noisy_run(lambda m: fuse(_dp(m))))
    assert not torch.allclose(runs[0], runs[1])

    model = GradSampleModule(nn.Linear(6, 4))
    model._module.bias.data = model._module.bias.data.double()  # mixed dtypes: opacus's clip, our noise
    opt = fuse(_dp(model))
    assert not opt._fusable(opt.params)
    model._module.weight.grad_sample = torch.zeros(3, 4, 6)
    model._module.bias.grad_sample = torch.zeros(3, 4, dtype=torch.float64)
    state = torch.get_rng_state()
    opt.step()
    assert torch.equal(state, torch.get_rng_state())
    assert model._module.weight.grad.abs().sum() > 0 and model._module.bias.grad.dtype == torch.float64


def test_fused_step_does_not_consume_the_global_rng():
    model = GradSampleModule(nn.Linear(6, 4))
    opt = fuse(_dp(model))
    model(torch.randn(3, 6)).sum().backward()
    state = torch.get_rng_state()
    opt.step()
    assert torch.equal(state, torch.get_rng_state())


def test_fuse_keeps_a_half_accumulated_virtual_step():
    """fuse() between a skipped step and the step that closes it: summed_grad and the queue survive."""
    (m1, o1), (m2, _) = _pair(_mlp(), noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=8)
    o2 = DPOptimizer(torch.optim.SGD(m2.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.3,
                     expected_batch_size=8)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    for model, opt in ((m1, o1), (m2, o2)):
        opt.signal_skip_step(do_skip=True)
        _backward(model, x[:4], y[:4])
        opt.step()
        opt.zero_grad()
    o2 = fuse(o2)
    assert o2._is_last_step_skipped and all(p.summed_grad is not None for p in m2.parameters())
    for model, opt in ((m1, o1), (m2, o2)):
        _backward(model, x[4:], y[4:])
        opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batch_memory_manager_equals_opacus():
    """make_private + BatchMemoryManager (virtual steps) through fuse: the weights and the accountant's
    history equal opacus's with the noise off."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    data = torch.utils.data.TensorDataset(torch.randn(64, 10), torch.randint(0, 3, (64,)))
    results = []
    for fused in (False, True):
        model = _mlp()
        engine = PrivacyEngine()
        torch.manual_seed(5)  # the Poisson sampler's batches (global RNG) are the same in both runs
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=torch.utils.data.DataLoader(data, batch_size=16), noise_multiplier=0.0, max_grad_norm=0.5)
        optimizer = fuse(optimizer) if fused else optimizer
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=optimizer) as dl:
            for x, y in dl:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        results.append(([p.detach().clone() for p in model.parameters()], list(engine.accountant.history)))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("accumulated", [False, True], ids=["one_pass", "after_virtual_step"])
def test_step_noise_is_the_stream_at_the_parameters_positions(accumulated):
    """p.grad = (p.summed_grad + sigma C z) / expected_batch_size, z the fedlora stream (seed, offset 0) over
    the flattened parameter list, whether the step runs in one pass (nothing accumulated: clipped sum and
    noised gradient from one dp_clip_noise_with_sum call) or after a virtual step (the accumulated sum,
    then gaussian_noise_): both paths draw the same normals at the same positions."""
    model = GradSampleModule(nn.Linear(6, 4))
    opt = fuse(DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.8, max_grad_norm=1.0,
                           expected_batch_size=3), seed=11)
    model(torch.randn(3, 6, generator=torch.Generator().manual_seed(1))).sum().backward()
    params = opt.params
    clipped, _ = reference.dp_clip_noise([p.grad_sample for p in params], 1.0, 0.0, 1.0, 0, 0)
    earlier = [torch.full_like(p, 0.25) for p in params]  # what a virtual step left in p.summed_grad
    if accumulated:
        for p, e in zip(params, earlier):
            p.summed_grad = e.clone()
    assert opt.pre_step() is True

    z = reference.stream_normals(11, 0, sum(p.numel() for p in params))
    start = 0
    for p, c, e in zip(params, clipped, earlier):
        summed = c + e if accumulated else c
        torch.testing.assert_close(p.summed_grad, summed, rtol=1e-5, atol=1e-6)
        noise = z[start : start + p.numel()].view_as(p)
        torch.testing.assert_close(p.grad, (summed + 0.8 * 1.0 * noise) / 3, rtol=1e-5, atol=1e-6)
        start += p.numel()
