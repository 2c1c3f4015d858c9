"""Next-token cross-entropy without holding the full [tokens, vocab] logits.

At the GPT-2 vocabulary the output layer dominates a small model: a batch of 64 x 256 tokens has
16,384 x 50,257 logits (3.3 GB in fp32, more again for their gradient). `linear_cross_entropy`
computes the output layer and the loss a block of rows at a time and, when gradients are needed,
computes them in the same pass (softmax - one-hot is the logits' gradient), so each block's logits
exist once and are never recomputed or stored for backward. The plain path
(`output_layer` + `F.cross_entropy`) is kept as the reference and gives the same loss and gradients.

What makes it fast (docs/performance.md has the measurements):

- one logits buffer per call, reused by every block, and on the CPU kept between calls (a fresh
  multi-megabyte tensor per block pays a page fault per 4 KiB on first touch); `release_workspace()`
  frees it;
- on the CPU a block is at most `CPU_BLOCK_BYTES` of fp32 logits (about 1,300 rows at the GPT-2
  vocabulary), which bounds the memory whatever `chunk_tokens` says; `chunk_tokens` is the upper
  bound everywhere;
- the softmax is PyTorch's fused kernel, in place; the log-sum-exp comes from the row maxima of the
  logits and of the probabilities (lse = max l - log max p, and max p >= 1/V never underflows), so
  no `logsumexp` (which allocates and makes several passes); the 1/N of a mean is folded into the
  gradient matmuls;
- a bias rides in the matmuls as one more input column (so its gradient comes out of the
  weight-gradient matmul, not from a column sum over the logits);
- under autocast (bf16/fp16) the three matmuls run in the autocast dtype while the softmax, the
  loss and the weight-gradient accumulation stay in fp32 (what autocast does for the plain path);
- without autograd (evaluation, `torch.no_grad()`) only the loss is computed: no softmax
  gradient, no gradient matmuls.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest block of fp32 logits on the CPU (1335 rows at vocab 50257; at 4096, all of a default
# 4096-row chunk), and the smallest: small blocks pay a parallel region and its barrier per op and
# block, large ones only hold more memory (docs/performance.md, "Blocks sized for 2 threads").
CPU_BLOCK_BYTES = 256 * 2**20
MIN_BLOCK_ROWS = 512

_local = threading.local()


def release_workspace() -> None:
    """Free the logits buffers this thread keeps between calls on the CPU."""
    _local.__dict__.pop("buffers", None)


def _workspace(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A [rows, cols] scratch tensor. On the CPU it is kept (per thread) and reused by the next call:
    large fresh allocations go straight to mmap and pay their page faults every time. Elsewhere the
    caching allocator already does this."""
    if device.type != "cpu" or torch.compiler.is_compiling():  # compiled code plans its own memory
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < rows * cols:
        buffers.pop((name, dtype), None)  # free the old one before taking the new one
        buf = torch.empty(rows * cols, dtype=dtype)
        buffers[(name, dtype)] = buf
    return buf[:rows * cols].view(rows, cols)


def block_rows(n: int, vocab: int, chunk_tokens: int, device: torch.device) -> int:
    """Rows of logits per block: `chunk_tokens`, capped on the CPU by `CPU_BLOCK_BYTES`."""
    rows = chunk_tokens
    if device.type == "cpu":
        rows = min(rows, max(MIN_BLOCK_ROWS, CPU_BLOCK_BYTES // (4 * vocab)))
    return max(1, min(rows, n))


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's when it is on for this device, else the hidden states'."""
    kind = hidden.device.type
    if kind in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _blocks(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, rows: int,
            compute_dtype: torch.dtype, scale: float, need: tuple[bool, bool, bool]):
    """The loop over row blocks. Returns per-row losses and (when `need` asks) the gradients of
    `scale * sum(losses)` w.r.t. hidden, weight and bias."""
    need_h, need_w, need_b = need
    n, d = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and loss never below fp32
    low = compute_dtype != acc
    w = weight.to(compute_dtype)
    h = hidden.to(compute_dtype)
    if bias is not None:
        # the bias as one more input column, logits = [h, 1] @ [w, b].T: the weight-gradient matmul
        # then yields the bias gradient as its last column, with no extra pass to add the bias to
        # every logit or to sum the gradient's columns
        w_in = torch.cat([w, bias.to(compute_dtype)[:, None]], dim=1)
        h_in = torch.cat([h, h.new_ones(n, 1)], dim=1)
    else:
        w_in, h_in = w, h
    wt = w_in.t()
    grads = need_h or need_w or need_b

    losses = torch.empty(n, dtype=acc, device=device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_wb = torch.zeros(w_in.shape, dtype=acc, device=device) if (need_w or need_b) else None
    logits_buf = _workspace("logits", rows, V, acc, device)
    low_buf = _workspace("logits_low", rows, V, compute_dtype, device) if low else None

    for start in range(0, n, rows):
        end = min(start + rows, n)
        c = end - start
        L = logits_buf[:c]
        hb, tb = h_in[start:end], targets[start:end]
        if low:
            Lo = low_buf[:c]
            torch.mm(hb, wt, out=Lo)
            L.copy_(Lo)
        else:
            torch.mm(hb, wt, out=L)

        if not grads:
            torch.log_softmax(L, 1, out=L)
            torch.neg(L.gather(1, tb[:, None]).squeeze(1), out=losses[start:end])
            continue

        target_logit = L.gather(1, tb[:, None]).squeeze(1)
        top = L.amax(dim=1)
        torch.softmax(L, 1, out=L)
        # lse = max logit - log(max p): max p >= 1/V never underflows (two cheap passes instead of
        # a logsumexp; `amax`, not `max(dim)`, which also computes indices: docs/performance.md)
        lse = top - L.amax(dim=1).log()
        torch.sub(lse, target_logit, out=losses[start:end])
        # d loss / d logits = softmax - onehot (times `scale`, folded into the matmuls below)
        L[torch.arange(c, device=device), tb] -= 1.0
        G = L
        if low:
            G = Lo
            G.copy_(L)
        if need_h:
            out = grad_h[start:end]
            if out.dtype == G.dtype:
                torch.mm(G, w, out=out)
                if scale != 1.0:
                    out.mul_(scale)
            else:
                out.copy_(torch.mm(G, w).mul_(scale))
        if grad_wb is not None:
            if low:  # bf16/fp16 product, accumulated across blocks in fp32
                grad_wb.add_(torch.mm(G.t(), hb), alpha=scale)
            else:
                grad_wb.addmm_(G.t(), hb, alpha=scale)
    if bias is None:
        grad_w, grad_b = grad_wb, None
    else:  # split the bias column off (copies, so nothing aliases grad_wb)
        grad_w = grad_wb[:, :d].contiguous() if need_w else None
        grad_b = grad_wb[:, d].contiguous() if need_b else None
    return losses, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                rows: int, scale: float, compute_dtype: torch.dtype) -> Tensor:
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with _no_autocast(hidden.device.type):
            losses, grad_h, grad_w, grad_b = _blocks(hidden, weight, bias, targets, rows, compute_dtype,
                                                     scale, need)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
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
        return out_h, out_w, out_b, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         chunk_tokens: int = 4096, reduction: str = "mean") -> Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, a block of rows at a time.

    hidden [..., D], weight [V, D], targets [...] (int64). reduction: "mean", "sum" or "none"
    (per-token losses in fp32; no gradient). chunk_tokens: the most rows of logits held at once
    (the CPU caps it further, see `block_rows`); <= 0 takes the plain path. Under autocast the
    matmuls run in the autocast dtype and the softmax in fp32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_tokens <= 0:
        logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    n = hidden.shape[0]
    rows = block_rows(n, weight.shape[0], chunk_tokens, hidden.device)
    compute_dtype = _compute_dtype(hidden)
    scale = 1.0 / n if reduction == "mean" else 1.0
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if reduction == "none" or not wants_grad:
        with torch.no_grad(), _no_autocast(hidden.device.type):
            losses, *_ = _blocks(hidden, weight, bias, targets, rows, compute_dtype, scale,
                                 (False, False, False))
        return losses if reduction == "none" else losses.sum() * scale
    losses = _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, scale, compute_dtype)
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
