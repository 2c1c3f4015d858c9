"""Evaluation: negative log-likelihood, perplexity and bits per byte on a token stream, and per-token
log-probabilities. (The diversity of generations is `picollm.diversity_eval`; its names are re-exported here.)

Protocol (see docs/evaluation.md):

- The split is one packed token stream, each story `[eot] + encode(story)`. The stream's N tokens
  give N - 1 next-token predictions (every token but the first is a target).
- It is cut into non-overlapping windows of `context_length` inputs: window i reads tokens
  [i*C, i*C + C) and predicts tokens [i*C + 1, i*C + C + 1); the last window is shorter. Every target
  is counted exactly once, and each window starts from an empty state (the prediction at window
  position t reads t + 1 tokens; an LSTM starts from zeros), cut as the training loader cuts them.
- nll = total NLL / number of targets (nats per token); ppl = exp(nll);
  bpb = total NLL / ln 2 / bytes, where bytes = the UTF-8 bytes of the stories' text plus 1 per story
  for its separator (the data pipeline's `num_bytes(split)`). bpb does not depend on the tokenizer, so
  it compares models with different tokenizers; nll and ppl do not.
- `max_windows` evaluates only the first `max_windows` windows (a fixed subset, the same at every
  call: what the trainer uses during training). Their byte count is estimated as
  bytes x (targets evaluated / all targets), i.e. the split's mean bytes per token.

The loss is `picollm.loss.linear_cross_entropy` over the model's features and output layer (what
`model_loss` computes), a chunk of rows at a time, so the [B, T, V] logits are never held at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picollm import rundir
from picollm.checkpoint import load
from picollm.config import load_run_config
from picollm.data.packing import tokenize_chunk
from picollm.data.prepare import prepare
from picollm.data.prepared import SPLITS, token_dtype
from picollm.data.sources import iter_stories
from picollm.device import DTYPE_CHOICES, autocast, model_device, resolve_device, resolve_dtype
from picollm.diversity_eval import diversity_eval, parse_strategies, story_prompts
from picollm.errors import UserError
from picollm.loss import model_loss

__all__ = ["EvalResult", "TokenLogprobs", "evaluate", "evaluate_tokens", "token_logprobs", "prepared_for_run",
           "stream_from_file", "diversity_eval", "parse_strategies", "story_prompts"]  # the last three: re-exported


@dataclass
class EvalResult:
    nll: float  # mean NLL per target token, nats
    ppl: float  # exp(nll)
    bpb: float | None  # total NLL in bits / bytes; None when the byte count is unknown
    tokens: int  # target tokens evaluated
    bytes: float | None  # bytes those targets stand for (scaled for a subset)
    windows: int = 0  # windows evaluated
    dtype: str = "fp32"  # the autocast dtype it ran in ("auto" resolved)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# helpers


def _ppl(nll: float) -> float:
    return math.exp(nll) if nll < 709 else float("inf")


# ---------------------------------------------------------------------------------------------
# NLL / perplexity / bits per byte


def _nll_sum(model: Any, inputs: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> float:
    """Summed NLL of `targets`, the output layer applied a chunk of rows at a time (`model_loss`).

    It runs under `torch.no_grad()`, where `linear_cross_entropy` computes the loss only (no gradients
    in its forward pass, which it computes only when autograd is on and an input requires grad)."""
    return float(model_loss(model, inputs, targets, chunk_tokens, reduction="sum"))


def evaluate_tokens(model: Any, tokens: np.ndarray, context_length: int, batch_size: int = 32,
                    num_bytes: int | None = None, max_windows: int | None = None, device: Any = None,
                    dtype: str = "auto", chunk_tokens: int = 4096) -> EvalResult:
    """NLL, perplexity and bits per byte of `model` on a packed 1-D token stream (see the module doc).

    `num_bytes`: the bytes the whole stream stands for (None: bpb is None). `max_windows`: evaluate
    the first windows only, bytes scaled by the share of targets evaluated. `device`: where to run
    (default: the model's device; the model is moved there). `dtype`: auto, fp32, bf16 or fp16 (autocast;
    auto = bf16 where the hardware runs it natively, else fp32).
    The model is put in eval mode and its training mode restored afterwards.
    """
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise UserError(f"context length must be an integer >= 1, got {context_length!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise UserError(f"max windows must be an integer >= 1, got {max_windows!r}")
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if num_bytes is not None and num_bytes <= 0:
        raise UserError(f"num_bytes must be positive, got {num_bytes!r}")
    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    if tokens.ndim != 1:
        raise UserError(f"expected a 1-D token stream, got shape {tokens.shape}")
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise UserError(f"the token stream has {len(tokens)} token(s); evaluation needs at least 2")
    limit = getattr(model, "max_context", None)
    if limit is not None and context_length > limit:
        raise UserError(f"context length {context_length} is longer than the model's {limit} positions")
    C = context_length
    windows = math.ceil(n_targets / C)
    if max_windows is not None:
        windows = min(windows, max_windows)
    end = min(windows * C, n_targets)  # targets evaluated: positions 1..end
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        top = int(tokens[:end + 1].max())
        if top >= vocab:
            raise UserError(f"the data holds token id {top} but the model has {vocab} tokens: it was "
                            "tokenized with another tokenizer")

    run_device = resolve_device(device) or model_device(model)
    dtype = resolve_dtype(dtype, run_device)
    if model_device(model) != run_device:
        model.to(run_device)
    was_training = model.training
    model.eval()
    total = 0.0
    full = end // C  # windows of C targets
    try:
        with torch.no_grad(), autocast(run_device, dtype):
            for first in range(0, full, batch_size):
                b = min(batch_size, full - first)
                chunk = np.asarray(tokens[first * C:(first + b) * C + 1], dtype=np.int64)
                seq = torch.from_numpy(chunk).to(run_device)
                x = seq[:-1].view(b, C)
                y = seq[1:].view(b, C)
                total += _nll_sum(model, x, y, chunk_tokens)
            if end > full * C:  # the last, shorter window
                chunk = np.asarray(tokens[full * C:end + 1], dtype=np.int64)
                seq = torch.from_numpy(chunk).to(run_device)
                total += _nll_sum(model, seq[None, :-1], seq[None, 1:], chunk_tokens)
    finally:
        model.train(was_training)
    nll = total / end
    used_bytes = None if num_bytes is None else num_bytes * (end / n_targets)
    bpb = None if used_bytes is None else total / math.log(2) / used_bytes
    return EvalResult(nll=nll, ppl=_ppl(nll), bpb=bpb, tokens=end, bytes=used_bytes, windows=windows,
                      dtype=dtype)


@dataclass
class TokenLogprobs:
    """Log-probabilities (nats) of every token of a stream but the first, each given the tokens before it
    in its evaluation window (see `token_logprobs`)."""

    logprobs: torch.Tensor  # [N - 1] float32: log p(tokens[t] | its window), t = 1 .. N-1
    top_ids: torch.Tensor  # [N - 1, top_n] int64: the most likely tokens at each position, most likely first
    top_logprobs: torch.Tensor  # [N - 1, top_n] float32: their log-probabilities


def token_logprobs(model: Any, tokens: Any, context_length: int | None = None, top_n: int = 0,
                   max_logits: int = 2**24, before_window: Callable[[], None] | None = None) -> TokenLogprobs:
    """Per-token log-probabilities of a 1-D token stream, cut into windows exactly as `evaluate_tokens`
    cuts it (non-overlapping windows of `context_length` inputs, each from an empty state), so that
    `-logprobs.mean()` is `evaluate_tokens(model, tokens, context_length).nll` in fp32; and, with
    `top_n`, the `top_n` most likely tokens at each position.

    For scoring a text token by token (the server's echo and scoring endpoints), not a whole split:
    the output layer runs in fp32 on blocks of at most `max_logits` logits, and a token's log-probability
    and its position's alternatives come from the same log-softmax, so the chosen token's value equals
    its entry among the alternatives. `before_window()` is called before each window (a server raises
    from it to stop a request whose client has gone).
    """
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(-1)
    if len(ids) < 2:
        raise UserError(f"the token stream has {len(ids)} token(s); log-probabilities need at least 2")
    C = _context_of(model, context_length)
    limit = getattr(model, "max_context", None)
    if limit is not None and C > limit:
        raise UserError(f"context length {C} is longer than the model's {limit} positions")
    vocab = int(model.output_layer.weight.shape[0])
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise UserError(f"the stream holds token ids outside [0, {vocab}): it was tokenized with another tokenizer")
    top_n = min(top_n, vocab)
    device = model_device(model)
    layer = model.output_layer
    rows = max(1, max_logits // vocab)
    n = len(ids) - 1
    logprobs = torch.empty(n, dtype=torch.float32)
    top_ids = torch.empty(n, top_n, dtype=torch.long)
    top_values = torch.empty(n, top_n, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, n, C):
                if before_window is not None:
                    before_window()
                window = ids[first:min(first + C, n) + 1].to(device)
                hidden = model.features(window[None, :-1])[0]
                targets = window[1:]
                for a in range(0, len(targets), rows):
                    logits = torch.nn.functional.linear(hidden[a:a + rows].float(), layer.weight.float(),
                                                        None if layer.bias is None else layer.bias.float())
                    log_p = torch.log_softmax(logits, dim=-1)
                    at = slice(first + a, first + a + len(log_p))
                    logprobs[at] = log_p.gather(1, targets[a:a + rows, None])[:, 0].cpu()
                    if top_n:
                        values, best = log_p.topk(top_n, dim=-1)
                        top_values[at], top_ids[at] = values.cpu(), best.cpu()
    finally:
        model.train(was_training)
    return TokenLogprobs(logprobs, top_ids, top_values)


# ---------------------------------------------------------------------------------------------
# run data and text files


def prepared_for_run(run_dir: str | Path, progress: bool = False) -> Any:
    """The prepared data of a run (cached by `prepare`), from its config.yaml's data section."""
    config = load_run_config(Path(run_dir) / rundir.CONFIG)
    return prepare(config.data, progress=progress)


def stream_from_file(path: str | Path, tokenizer: Any, text_field: str = "text", format: str | None = None,
                     encoding_errors: str = "strict") -> tuple[np.ndarray, int, np.ndarray]:
    """Read stories from a file as `prepare` does and lay them out as a prepared split.

    Returns (tokens, bytes, story offsets): tokens = the stories' `[eot] + encode(story)`
    concatenated, bytes = UTF-8 bytes of the (stripped) stories + 1 per story, offsets = the index
    of each story's eot. The whole file is tokenized in memory: meant for evaluation-sized files.
    """
    if tokenizer is None:
        raise UserError("the model has no tokenizer to encode the evaluation text with")
    dtype = token_dtype(tokenizer.vocab_size)
    streams: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    num_bytes = 0
    batch: list[str] = []

    def flush() -> None:
        stream, story_lengths = tokenize_chunk(tokenizer, batch, dtype)
        streams.append(stream)
        lengths.append(story_lengths)
        batch.clear()

    for story in iter_stories(str(path), text_field, format, encoding_errors):
        batch.append(story)
        num_bytes += len(story.encode("utf-8")) + 1
        if len(batch) >= 1024:
            flush()
    if batch:
        flush()
    if not streams:
        raise UserError(f"{path} holds no stories")
    all_lengths = np.concatenate(lengths)
    offsets = np.cumsum(all_lengths) - all_lengths
    return np.concatenate(streams), num_bytes, offsets.astype(np.int64)


def _load_if_path(model: Any, device: Any) -> Any:
    if isinstance(model, (str, Path)):
        return load(model, device=resolve_device(device) or "cpu")
    return model


def _context_of(model: Any, context_length: int | None) -> int:
    if context_length is not None:
        return context_length
    config = getattr(model, "config", None)
    if config is None or getattr(config, "context_length", None) is None:
        raise UserError("pass context_length: the model has no config.context_length")
    return int(config.context_length)


def _check_tokenizers(model: Any, prepared: Any) -> None:
    mine = getattr(getattr(model, "tokenizer", None), "name", None)
    theirs = getattr(getattr(prepared, "tokenizer", None), "name", None)
    if mine is not None and theirs is not None and mine != theirs:
        raise UserError(f"the model uses tokenizer '{mine}' but the data was prepared with '{theirs}'")


def evaluate(model: Any, split: str = "test", data: str | Path | None = None, prepared: Any = None,
             batch_size: int = 32, max_windows: int | None = None, device: Any = None, dtype: str = "auto",
             chunk_tokens: int = 4096, context_length: int | None = None, text_field: str = "text",
             format: str | None = None, encoding_errors: str = "strict") -> EvalResult:
    """`picollm.evaluate`: NLL, perplexity and bits per byte of a model on a split or a text file.

    `model`: a LanguageModel or a run/checkpoint path (loaded). The tokens come from, in order:
    `data` (any file `prepare` reads: stories tokenized with the model's own tokenizer, laid out as a
    prepared split), `prepared` (a PreparedData: its `split`), or, for a model loaded from a run
    directory, that run's prepared `split`. `context_length` defaults to the model's.
    """
    source_path = model if isinstance(model, (str, Path)) else None
    model = _load_if_path(model, device)
    C = _context_of(model, context_length)
    kwargs = dict(batch_size=batch_size, max_windows=max_windows, device=device, dtype=dtype,
                  chunk_tokens=chunk_tokens)
    if data is not None:
        tokens, num_bytes, _ = stream_from_file(data, getattr(model, "tokenizer", None), text_field, format,
                                                encoding_errors)
        return evaluate_tokens(model, tokens, C, num_bytes=num_bytes, **kwargs)
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if prepared is None:
        where = source_path or getattr(model, "checkpoint_path", None)
        run_dir = rundir.find_run_dir(where) if where is not None else None
        if run_dir is None:
            raise UserError("no data to evaluate on: pass data=PATH (a text file) or prepared=..., or a "
                            "model from a run directory (its config.yaml names the data)")
        prepared = prepared_for_run(run_dir)
    _check_tokenizers(model, prepared)
    tokens = prepared.tokens(split)
    if len(tokens) < 2:
        raise UserError(f"the {split} split is empty; prepare the data with a larger {split} ratio")
    return evaluate_tokens(model, tokens, C, num_bytes=prepared.num_bytes(split), **kwargs)
