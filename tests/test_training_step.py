"""One optimizer step (picollm.training.step.train_step): accumulation, clipping, the finite check."""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers import TINY_MODEL

from picollm.config import TrainConfig
from picollm.models.registry import build_model
from picollm.training.step import LossModule, build_optimizer, train_step

V = 64


def make(optimizer: str = "adamw"):
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL, vocab_size=V, context_length=8))
    return model, LossModule(model, chunk_tokens=5), build_optimizer(model, TrainConfig(optimizer=optimizer, lr=0.1))


def batches(n: int, rows: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, V, (rows, 8), generator=g), torch.randint(0, V, (rows, 8), generator=g))
            for _ in range(n)]


def test_accumulated_micro_batches_take_the_step_of_their_concatenation():
    micro = batches(3)
    model_a, module_a, opt_a = make("sgd")  # an update linear in the gradient
    result = train_step(module_a, opt_a, micro, grad_clip=1.0)
    model_b, module_b, opt_b = make("sgd")
    whole = [(torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))]
    before = time.perf_counter()
    single = train_step(module_b, opt_b, whole, grad_clip=1.0)
    assert before < single.backward_end < time.perf_counter()  # forward + backward = backward_end - start
    assert result.tokens == single.tokens == 3 * 2 * 8 and not result.skipped
    assert result.loss.shape == () and result.loss.device.type == "cpu"  # a tensor: reading it is the caller's
    assert result.loss.item() == pytest.approx(single.loss.item(), rel=1e-6)
    assert result.grad_norm.item() == pytest.approx(single.grad_norm.item(), rel=1e-5)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(p.grad is None for p in model_a.parameters())  # gradients are cleared for the next step


def test_a_non_finite_loss_or_gradient_skips_the_update():
    model, module, opt = make()
    with torch.no_grad():
        model.output_layer.weight[0, 0] = math.inf
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(module, opt, batches(2), grad_clip=1.0)
    assert result.skipped and not math.isfinite(result.loss.item())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None, name
    # `agree` makes the decision for every rank: a finite step another rank found bad is skipped too
    model, module, opt = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    votes = []
    result = train_step(module, opt, batches(1), agree=lambda bad: votes.append(bad) or True)
    assert votes == [False] and result.skipped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unchecked_steps_always_update_and_clip_to_the_norm():
    model, module, opt = make()
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(module, opt, batches(1), grad_clip=1e-3, check_finite=False, agree=lambda bad: True)
    assert not result.skipped and result.grad_norm.item() > 1e-3  # measured before clipping
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
