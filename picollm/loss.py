"""Next-token cross-entropy without holding the full [tokens, vocab] logits.

At the GPT-2 vocabulary the output layer dominates a small model: a batch of 64 x 256 tokens has
16,384 x 50,257 logits (3.3 GB in fp32, more again for their gradient). `linear_cross_entropy`
computes the output layer and the loss a chunk of rows at a time and, when gradients are needed,
computes them in the same pass (softmax - one-hot is the logits' gradient), so each chunk's logits
exist once and are never recomputed or stored for backward. The plain path
(`output_layer` + `F.cross_entropy`) is kept as the reference and gives the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_tokens: int, scale: float) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
            bias is not None and ctx.needs_input_grad[2])
        n = hidden.shape[0]
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # softmax never below fp32
        losses = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        w = weight.to(hidden.dtype)
        for start in range(0, n, chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            t = targets[start:start + chunk_tokens]
            logits = h @ w.t()
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
            logits = logits.to(acc_dtype)
            lse = torch.logsumexp(logits, dim=-1)
            losses[start:start + chunk_tokens] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if need_h or need_w or need_b:
                # d loss / d logits = (softmax - onehot) * scale, computed in place on the chunk
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_logits.mul_(scale)
                g = grad_logits.to(hidden.dtype)
                if need_h:
                    grad_hidden[start:start + chunk_tokens] = g @ w
                if need_w:
                    grad_weight.addmm_(grad_logits.t(), h.to(acc_dtype))
                if need_b:
                    grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # the loss is reduced as sum(losses) * scale before this function's caller sees it, so the
        # incoming gradient is the same for every row: `scale` was folded in during forward
        g = grad_losses[0]
        out_h = grad_hidden * g.to(grad_hidden.dtype) if grad_hidden is not None else None
        out_w = (grad_weight * g).to(ctx.weight_dtype) if grad_weight is not None else None
        out_b = (grad_bias * g).to(ctx.bias_dtype) if grad_bias is not None else None
        return out_h, out_w, out_b, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         chunk_tokens: int = 4096, reduction: str = "mean") -> Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, a chunk of rows at a time.

    hidden [..., D], weight [V, D], targets [...] (int64). reduction: "mean", "sum" or "none"
    (per-token losses in fp32; no gradient). chunk_tokens <= 0 takes the plain path.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_tokens <= 0:
        logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    if reduction == "none":
        with torch.no_grad():
            return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, 1.0)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    scale = 1.0 / targets.numel() if reduction == "mean" else 1.0
    losses = _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, scale)
    # sum * scale: the per-row gradient was computed with `scale` already, see backward
    return _ScaledSum.apply(losses, scale)


class _ScaledSum(torch.autograd.Function):
    """sum(losses) * scale whose backward hands back the raw upstream gradient for every row.

    `_LinearCrossEntropy` folded `scale` into its stored gradients, so passing `scale` on again
    here would apply it twice.
    """

    @staticmethod
    def forward(ctx, losses: Tensor, scale: float) -> Tensor:
        ctx.n = losses.shape[0]
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.expand(ctx.n), None


def model_loss(model: torch.nn.Module, inputs: Tensor, targets: Tensor, chunk_tokens: int = 4096,
               reduction: str = "mean") -> Tensor:
    """Next-token loss of any picollm model: its features through its output layer, chunked."""
    hidden = model.features(inputs)
    layer = model.output_layer
    return linear_cross_entropy(hidden, layer.weight, targets, layer.bias, chunk_tokens, reduction)
