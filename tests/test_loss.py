"""The chunked output-layer loss (picollm.loss): the same loss and gradients as the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODEL

from picollm.loss import linear_cross_entropy, model_loss
from picollm.models.registry import build_model


@pytest.mark.parametrize("family_spec", [
    dict(TINY_MODEL, vocab_size=300),
    {"family": "lstm", "vocab_size": 300, "embed_dim": 16, "hidden_size": 24, "context_length": 32},
])
def test_chunked_loss_and_gradients_equal_the_plain_path(family_spec):
    model = build_model(family_spec)
    x = torch.randint(0, 300, (3, 17))
    y = torch.randint(0, 300, (3, 17))
    plain = F.cross_entropy(model(x).reshape(-1, 300), y.reshape(-1))
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model_loss(model, x, y, chunk_tokens=5)
    chunked.backward()
    assert abs(chunked.item() - plain.item()) < 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-5), name


def test_linear_cross_entropy_sum_bias_and_per_token():
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    t = torch.randint(0, 20, (11,))
    got = linear_cross_entropy(h, w, t, b, chunk_tokens=4, reduction="sum")
    (got * 2).backward()
    g = [h.grad.clone(), w.grad.clone(), b.grad.clone()]
    h.grad = w.grad = b.grad = None
    want = F.cross_entropy(h @ w.T + b, t, reduction="sum")
    (want * 2).backward()
    assert torch.allclose(got, want, atol=1e-5)
    for a, c in zip(g, [h.grad, w.grad, b.grad]):
        assert torch.allclose(a, c, atol=1e-4)
    per_token = linear_cross_entropy(h, w, t, b, chunk_tokens=3, reduction="none")
    assert torch.allclose(per_token, F.cross_entropy(h @ w.T + b, t, reduction="none"), atol=1e-5)


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL, vocab_size=64, context_length=16))
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model_loss(model, x, y, chunk_tokens=7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
