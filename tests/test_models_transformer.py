"""Transformer specifics: RoPE, pre- vs post-norm, the KV cache, tied weights, initialisation, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from picollm.checkpoint import WEIGHTS_FILE, load_model, save_model
from picollm.models.registry import build_model
from picollm.models.transformer import apply_rope, rope_tables

V = 97


def transformer(**fields):
    spec = {"family": "transformer", "vocab_size": V, "context_length": 32, "d_model": 32, "n_heads": 2,
            "n_layers": 3, **fields}
    return build_model(spec).eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_rope_scores_depend_only_on_relative_position():
    model = transformer(pos="rope")
    cos, sin = model.rope_cos, model.rope_sin
    hd = cos.shape[-1]
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q[None], cos[m:m + 1].double(), sin[m:m + 1].double())[0]
        kn = apply_rope(k[None], cos[n:n + 1].double(), sin[n:n + 1].double())[0]
        return float(qm @ kn)

    for m, n in [(5, 2), (9, 9), (3, 7), (0, 0)]:
        for s in (1, 4, 11):
            assert score(m, n) == pytest.approx(score(m + s, n + s), abs=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and they do depend on the offset
    # rotation keeps norms
    rotated = apply_rope(q[None].expand(20, hd), *(t[:20].double() for t in rope_tables(hd, 20)))
    assert torch.allclose(rotated.norm(dim=-1), q.norm().expand(20))


def _block_outputs(model, x):
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in model.blocks]
    with torch.no_grad():
        model.features(x)
    for h in hooks:
        h.remove()
    return outputs


def test_post_norm_blocks_output_unit_rms_and_pre_norm_residuals_do_not():
    x = tokens()
    torch.manual_seed(0)
    post = transformer(norm="post", norm_type="rmsnorm")
    for out in _block_outputs(post, x):
        rms = out.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    torch.manual_seed(0)
    pre = transformer(norm="pre", norm_type="rmsnorm")
    for out in _block_outputs(pre, x):  # the residual stream keeps the embeddings' scale (~0.02)
        rms = out.pow(2).mean(-1).sqrt()
        assert (rms - 1).abs().min() > 0.5
    assert pre.final_norm is not None and post.final_norm is None
    # the same weights in both arrangements give different outputs
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith("final_norm")}
    post.load_state_dict(state)
    assert not torch.allclose(pre(x), post(x), atol=1e-3)


def test_post_layernorm_blocks_output_zero_mean_unit_variance():
    x = tokens()
    for out in _block_outputs(transformer(norm="post", norm_type="layernorm"), x):
        assert torch.allclose(out.mean(-1), torch.zeros(out.shape[:2]), atol=1e-4)
        assert torch.allclose(out.var(-1, unbiased=False), torch.ones(out.shape[:2]), atol=1e-3)


@pytest.mark.parametrize("pos", ["absolute", "rope", "nope"])
def test_cache_continues_with_a_chunk(pos):
    """A chunk of several tokens after a cached prefix attends causally over cache + chunk."""
    model = transformer(pos=pos)
    seq = tokens(length=20)
    with torch.no_grad():
        full = model.features(seq)
        _, cache = model.prefill(seq[:, :5])
        chunk = model._run(seq[:, 5:12], cache)
        assert (chunk - full[:, 5:12]).abs().max() < 1e-4
        logits, cache = model.decode(seq[:, 12], cache)
        assert (logits - model.output_layer(full[:, 12])).abs().max() < 1e-4
        assert cache.length == 13


def test_cache_overflow_raises():
    model = transformer(context_length=8)
    assert model.max_context == 8
    with torch.no_grad():
        with pytest.raises(ValueError, match="context_length"):
            model.prefill(tokens(length=9))
        _, state = model.prefill(tokens(length=8))
        with pytest.raises(ValueError, match="re-prefill"):
            model.decode(tokens(length=1)[:, 0], state)
        with pytest.raises(ValueError):
            model.features(tokens(length=9))
        # without positions a longer window is fine; only the cache is bounded
        assert transformer(context_length=8, pos="nope").features(tokens(length=12)).shape == (2, 12, 32)


def test_tied_weights_round_trip(tmp_path):
    model = transformer()
    assert model.output_layer.weight is model.embedding.weight
    assert model.output_layer.bias is None
    with torch.no_grad():
        model.embedding.weight.add_(0.05)
    save_model(model, tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / WEIGHTS_FILE))
    assert ("embedding.weight" in stored) != ("output_layer.weight" in stored)  # stored once
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.output_layer.weight is loaded.embedding.weight
    assert torch.equal(loaded.embedding.weight, model.embedding.weight)
    assert torch.equal(loaded(tokens()), model(tokens()))
    assert loaded.num_parameters() == model.num_parameters()


def test_untied_has_its_own_output_layer():
    model = transformer(tie_embeddings=False)
    assert model.output_layer.weight is not model.embedding.weight
    assert model.num_parameters() == transformer().num_parameters() + V * 32


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = transformer(d_model=256, n_heads=4, n_layers=4)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (block.attn.proj, block.mlp.proj):
        assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
        assert torch.all(proj.bias == 0)
    assert model.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_flops_per_token_includes_attention():
    model = transformer()
    n = model.num_parameters(non_embedding=True) + V * 32
    assert model.flops_per_token() == 6 * n + 12 * 3 * 32 * 32
    assert model.flops_per_token(10) == 6 * n + 12 * 3 * 32 * 10


@pytest.mark.parametrize("field,value", [("n_heads", 3), ("norm", "middle"), ("pos", "alibi"),
                                         ("norm_type", "batchnorm"), ("n_layers", 0)])
def test_bad_fields_name_the_key(field, value):
    from picollm.errors import UserError

    with pytest.raises(UserError, match=f"model.{field}"):
        transformer(**{field: value})


def test_rope_needs_even_head_size():
    from picollm.errors import UserError

    with pytest.raises(UserError, match="even head size"):
        transformer(d_model=30, n_heads=2, pos="rope")
