"""The chunked output-layer loss (picollm.loss): the same loss and gradients as the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODEL, assert_same_loss_and_gradients

from picollm import loss as loss_mod
from picollm.loss import block_rows, linear_cross_entropy, model_loss, release_workspace
from picollm.models.registry import build_model
from picollm.training.step import LossModule


@pytest.mark.parametrize("family_spec", [
    dict(TINY_MODEL, vocab_size=300),
    {"family": "lstm", "vocab_size": 300, "embed_dim": 16, "hidden_size": 24, "context_length": 32},
])
def test_chunked_loss_and_gradients_equal_the_plain_path(family_spec):
    model = build_model(family_spec)
    x = torch.randint(0, 300, (3, 17))
    y = torch.randint(0, 300, (3, 17))
    assert_same_loss_and_gradients(model, lambda: F.cross_entropy(model(x).reshape(-1, 300), y.reshape(-1)),
                                   lambda: model_loss(model, x, y, chunk_tokens=5))


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


def _plain(h, w, t, b=None, reduction="mean"):
    return F.cross_entropy(F.linear(h, w, b).float(), t, reduction=reduction)


@pytest.mark.parametrize("with_bias", [False, True])
def test_multi_block_bias_and_uneven_last_block(monkeypatch, with_bias):
    """Blocks capped on the CPU (here to 16 rows), 50 rows: 4 blocks, the last one short."""
    monkeypatch.setattr(loss_mod, "MIN_BLOCK_ROWS", 16)
    monkeypatch.setattr(loss_mod, "CPU_BLOCK_BYTES", 16 * 4 * 100)
    assert block_rows(50, 100, 4096, torch.device("cpu")) == 16
    h = torch.randn(50, 12, requires_grad=True)
    w = torch.randn(100, 12, requires_grad=True)
    b = torch.randn(100, requires_grad=True) if with_bias else None
    t = torch.randint(0, 100, (50,))
    got = linear_cross_entropy(h, w, t, b)
    got.backward()
    grads = [x.grad.clone() for x in (h, w, b) if x is not None]
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    want = _plain(h, w, t, b)
    want.backward()
    assert abs(got.item() - want.item()) < 1e-5
    for g, x in zip(grads, [x for x in (h, w, b) if x is not None]):
        assert torch.allclose(g, x.grad, atol=1e-6)


def test_block_rows_cap_only_on_cpu():
    assert block_rows(100_000, 50257, 4096, torch.device("cpu")) == \
        max(loss_mod.MIN_BLOCK_ROWS, loss_mod.CPU_BLOCK_BYTES // (4 * 50257))
    assert block_rows(100_000, 4096, 4096, torch.device("cpu")) == 4096
    assert block_rows(100_000, 50257, 4096, torch.device("meta")) == 4096
    assert block_rows(10, 50257, 4096, torch.device("cpu")) == 10


def test_no_grad_gives_the_same_loss_without_a_graph():
    """Evaluation (no autograd) computes only the loss, and the same one."""
    h = torch.randn(30, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (30,))
    with_grad = linear_cross_entropy(h, w, t, b, chunk_tokens=7, reduction="sum")
    with torch.no_grad():
        without = linear_cross_entropy(h, w, t, b, chunk_tokens=7, reduction="sum")
    assert without.grad_fn is None and not without.requires_grad
    assert torch.allclose(with_grad.detach(), without, atol=1e-5)
    assert torch.allclose(without, _plain(h, w, t, b, "sum").detach(), atol=1e-4)


def test_float64_stays_float64():
    h = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (9,))
    got = linear_cross_entropy(h, w, t, chunk_tokens=4)
    assert got.dtype == torch.float64
    got.backward()
    g = h.grad.clone()
    h.grad = None
    _plain(h, w, t).backward()
    assert torch.allclose(g, h.grad, atol=1e-12)


def test_bf16_autocast_matches_the_plain_path_under_autocast():
    """Under autocast the matmuls run in bf16 and the softmax in fp32, as autocast does for the plain
    path: the two agree to bf16 precision, and the gradients keep the parameters' dtypes."""
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.3).requires_grad_()
    b = torch.randn(300, requires_grad=True)
    t = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t, b, chunk_tokens=16)
    got.backward()
    grads = [h.grad.clone(), w.grad.clone(), b.grad.clone()]
    assert [g.dtype for g in grads] == [torch.float32] * 3
    h.grad = w.grad = b.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w, b).float(), t)
    want.backward()
    assert abs(got.item() - want.item()) < 2e-2 * abs(want.item())
    for g, x in zip(grads, (h, w, b)):
        assert torch.allclose(g, x.grad, atol=2e-2 * x.grad.abs().max().item() + 1e-4)


def test_workspace_is_reused_and_resized_correctly():
    release_workspace()
    for V in (64, 512, 32):  # grows, then a smaller call reuses the larger buffer
        h = torch.randn(20, 8, requires_grad=True)
        w = torch.randn(V, 8, requires_grad=True)
        t = torch.randint(0, V, (20,))
        got = linear_cross_entropy(h, w, t, chunk_tokens=6)
        assert abs(got.item() - _plain(h, w, t).item()) < 1e-5
    release_workspace()


@pytest.mark.slow
def test_chunked_loss_traces_under_torch_compile():
    """The trainer's `compile: true` (and the GPU benchmark) compile `LossModule`: dynamo must trace the
    chunked loss (no workspace side effects, no aliased gradients) and give the eager result."""
    torch.manual_seed(0)
    model = build_model({"family": "lstm", "embed_dim": 8, "hidden_size": 8, "vocab_size": 60, "context_length": 8})
    x = torch.randint(0, 60, (2, 8))
    y = torch.randint(0, 60, (2, 8))
    compiled = torch.compile(LossModule(model, 5), backend="aot_eager", fullgraph=False)
    (compiled(x, y) / 16).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (model_loss(model, x, y, chunk_tokens=5, reduction="sum") / 16).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6), name
