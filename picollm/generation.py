"""Text generation with any picollm model: greedy, nucleus (top-p), top-k and plain sampling.

Generation runs every prompt and every sample in one batch and uses each family's incremental state:
the prompt is run once through `prefill`, then each new token costs one `decode` step; the prefix is
never recomputed (`use_cache=False` does recompute it, as a reference and benchmark baseline).

Prompts of different lengths run in lockstep. The batch is prefilled with the first `m` tokens of
every row (`m` = the shortest prompt); from then on every step feeds one token per row through
`decode`: a row whose prompt is not used up yet is fed its next prompt token (what was sampled for it
is dropped), the others are fed what they sampled. So every row's state always holds the same number
of tokens, which works with any family's opaque state, and each prompt token still costs one pass.

Context limit (`model.max_context`, e.g. a Transformer's positions): a prompt longer than the context
is cut to its last `max_context` tokens, and when appending a token would make the state hold more than
`max_context` tokens, the state is rebuilt by prefilling the last `max_context - 1` tokens of each
row (the new token included): a sliding window. Once the window is full, steps alternate between a
re-prefill and a cheap decode, and the model always sees the last `max_context - 1` or
`max_context` tokens. Families without a limit (LSTM, k-gram) never re-prefill.

Stopping: a row stops when it has `max_new_tokens` new tokens or, with `stop_at_eot`, when it samples
the end-of-text token (which is not returned). Finished rows are fed eot until every row is done.

Determinism: sampling draws from a `torch.Generator` seeded with `seed` on the model's device, so the
same model, prompts and arguments give the same tokens. Greedy picks the lowest token id among tied
maxima. Samples of one call differ from each other; sampled tokens depend on the batch's composition
(greedy tokens do not, up to floating-point differences between batch sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from picollm.device import model_device
from picollm.errors import UserError

STRATEGIES = ("greedy", "top-p", "top-k", "sample")
MASS_TOLERANCE = 1e-6  # top-p: a cumulative mass this close below p counts as reaching it


# ---------------------------------------------------------------------------------------------
# filters


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al., 2019): probabilities [..., V] of the smallest set of most likely
    tokens whose probability mass reaches `p`, renormalised to sum to 1; every other token gets 0.

    Tokens are ranked by probability with a stable sort, so among equal probabilities the lower token
    id ranks first; a tie at the boundary keeps only as many of the tied tokens (lowest ids first) as
    are needed to reach `p`. A token is kept when the mass of the tokens ranked before it is below
    `p` (a mass within `MASS_TOLERANCE` = 1e-6 of `p` counts as reaching it, so that a boundary that
    is exact on paper, e.g. p = 0.4 with a top token of probability 0.4, is not undone by fp32
    rounding); the most likely token is always kept, so a tiny `p` is greedy. `p >= 1` keeps every
    token (the plain softmax), whatever the rounding of the cumulative sum.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < p - MASS_TOLERANCE
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Probabilities [..., V] of the `k` most likely tokens, renormalised; every other token gets 0.

    Ties at the k-th place keep the lowest token ids (stable ranking, as in `top_p_filter`).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if k >= probs.shape[-1]:
        return probs
    _, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order[..., :k], True)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# arguments


def check_generation_args(strategy: str, top_p: float, top_k: int, temperature: float,
                          max_new_tokens: int, num_samples: int = 1) -> None:
    """Raise a UserError naming the bad value and what is allowed."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown generation strategy '{strategy}'; use one of: {', '.join(STRATEGIES)}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise UserError(f"top-p must be in (0, 1], got {top_p!r} (1.0 keeps every token)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top-k must be an integer >= 1, got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise UserError(f"temperature must be a positive number, got {temperature!r} "
                        "(greedy decoding is the deterministic choice)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"num-samples must be an integer >= 1, got {num_samples!r}")


def _prompt_rows(prompt_ids: Any, vocab_size: int | None) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2 or prompt_ids.dtype.is_floating_point:
            raise UserError("prompt ids must be an integer tensor [B, T] or a list of lists of ints")
        rows = prompt_ids.tolist()
    else:
        if not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, (str, bytes)):
            raise UserError("prompt ids must be a list of lists of ints or an integer tensor [B, T]")
        rows = [list(r) for r in prompt_ids]
    if not rows:
        raise UserError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise UserError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text id)")
        for t in row:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (
                    vocab_size is not None and t >= vocab_size):
                raise UserError(f"prompt {i} holds token {t!r}, not an id in [0, {vocab_size}): "
                                "was it encoded with another tokenizer?")
    return rows


def _next_tokens(logits: torch.Tensor, strategy: str, top_p: float, top_k: int, temperature: float,
                 generator: torch.Generator) -> torch.Tensor:
    if strategy == "greedy":
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if strategy == "top-p":
        probs = top_p_filter(scaled, top_p)
    elif strategy == "top-k":
        probs = top_k_filter(scaled, top_k)
    else:
        probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise UserError("the model produced non-finite logits (NaN or inf); the checkpoint has diverged "
                        "or is damaged")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _last_logits(model: Any, window: torch.Tensor) -> torch.Tensor:
    """Recompute-from-scratch reference: logits [B, V] at the last position of `window` [B, T]."""
    return model.next_token_logits(model.features(window)[:, -1])


# ---------------------------------------------------------------------------------------------
# token level


@dataclass(frozen=True)
class Step:
    """One new token of one row, as `generate_steps` chooses it."""

    row: int
    token: int
    logits: torch.Tensor  # [V] the model's logits it was chosen from, before temperature and filters


def generate_steps(model: Any, prompt_ids: list[list[int]] | torch.Tensor, strategy: str = "greedy",
                   top_p: float = 0.9, top_k: int = 50, temperature: float = 1.0, max_new_tokens: int = 200,
                   num_samples: int = 1, seed: int = 0, stop_at_eot: bool = True, eot_id: int | None = None,
                   use_cache: bool = True) -> Iterator[Step]:
    """Continue token prompts, yielding each new token as it is chosen (see `generate_ids`).

    A generator, so that a caller can stream tokens, read the logits behind each (log-probabilities,
    alternatives) and stop early by closing it. Gradients are off around each model call only, not
    across a `yield`, so several generators can be interleaved in one thread.
    """
    check_generation_args(strategy, top_p, top_k, temperature, max_new_tokens, num_samples)
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    prompts = _prompt_rows(prompt_ids, vocab_size)
    if eot_id is None:
        eot_id = getattr(getattr(model, "tokenizer", None), "eot_id", None)
    if max_new_tokens == 0:
        return
    limit = getattr(model, "max_context", None)
    if limit is not None:
        prompts = [p[-limit:] for p in prompts]  # a prompt longer than the context: its last tokens
    rows = [p for p in prompts for _ in range(num_samples)]
    batch = len(rows)
    lengths = [len(r) for r in rows]
    shortest, longest = min(lengths), max(lengths)
    device = model_device(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    pad = eot_id if eot_id is not None else 0

    # every token each row will have seen: prompts, then one column per step
    total = longest + max_new_tokens
    seq = torch.full((batch, total), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        seq[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    seq = seq.to(device)

    new_tokens = [0] * batch
    done = [False] * batch
    was_training = model.training
    model.eval()
    try:
        cur = shortest  # tokens in every row's state
        state_len = shortest
        window = seq[:, :shortest]
        with torch.no_grad():
            if use_cache:
                logits, state = model.prefill(window)
            else:
                logits = _last_logits(model, window)
        while True:
            with torch.no_grad():
                chosen = _next_tokens(logits, strategy, top_p, top_k, temperature, generator).tolist()
            feed = [pad] * batch
            for i in range(batch):
                if cur < lengths[i]:
                    feed[i] = rows[i][cur]
                elif not done[i]:
                    tok = int(chosen[i])
                    if stop_at_eot and eot_id is not None and tok == eot_id:
                        done[i] = True
                        continue
                    new_tokens[i] += 1
                    feed[i] = tok
                    yield Step(i, tok, logits[i])
                    if new_tokens[i] >= max_new_tokens:
                        done[i] = True
            if all(done):
                break
            feed_t = torch.tensor(feed, dtype=torch.long)
            seq[:, cur] = feed_t.to(device)
            cur += 1
            overflow = limit is not None and state_len + 1 > limit
            state_len = max(1, limit - 1) if overflow else state_len + 1
            window = seq[:, cur - state_len:cur]
            with torch.no_grad():
                if not use_cache:
                    logits = _last_logits(model, window)
                elif overflow:
                    logits, state = model.prefill(window)
                else:
                    logits, state = model.decode(window[:, -1], state)
    finally:
        model.train(was_training)


def generate_ids(model: Any, prompt_ids: list[list[int]] | torch.Tensor, strategy: str = "greedy",
                 top_p: float = 0.9, top_k: int = 50, temperature: float = 1.0, max_new_tokens: int = 200,
                 num_samples: int = 1, seed: int = 0, stop_at_eot: bool = True, eot_id: int | None = None,
                 on_token: Callable[[int, int], None] | None = None,
                 use_cache: bool = True) -> list[list[int]]:
    """Continue token prompts; returns the new token ids of every row (prompts excluded).

    Rows: `num_samples` per prompt, prompt-major (prompt 0's samples, then prompt 1's, ...).
    `eot_id` defaults to the model's tokenizer's; the eot that stops a row is not returned.
    `on_token(row, token_id)` is called for every new token as it is chosen (streaming).
    `use_cache=False` recomputes the whole window at every step instead of using prefill/decode
    (same tokens; the reference for tests and the benchmark's baseline).
    """
    check_generation_args(strategy, top_p, top_k, temperature, max_new_tokens, num_samples)
    prompts = _prompt_rows(prompt_ids, getattr(getattr(model, "config", None), "vocab_size", None))
    out: list[list[int]] = [[] for _ in range(len(prompts) * num_samples)]
    for step in generate_steps(model, prompts, strategy=strategy, top_p=top_p, top_k=top_k,
                               temperature=temperature, max_new_tokens=max_new_tokens, num_samples=num_samples,
                               seed=seed, stop_at_eot=stop_at_eot, eot_id=eot_id, use_cache=use_cache):
        out[step.row].append(step.token)
        if on_token is not None:
            on_token(step.row, step.token)
    return out


# ---------------------------------------------------------------------------------------------
# text level


class _StreamDecoder:
    """Turns one row's growing token list into text pieces, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            piece = text[len(self.emitted):]
            self.emitted = text
            return piece
        return ""

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


def check_prompt_text(text: str, index: int = 0) -> None:
    """UserError if `text` is not valid Unicode: an unpaired surrogate, which is what invalid UTF-8
    bytes in a command-line argument become (Python's surrogateescape). No tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"prompt {index + 1} is not valid text: it holds the unpaired surrogate "
                        f"\\u{ord(text[exc.start]):04x} at character {exc.start} (invalid UTF-8 on the command "
                        "line?); pass UTF-8 text") from None


def encode_prompts(prompt: str | list[int] | list[str], tokenizer: Any,
                   add_eot: bool = True) -> list[list[int]]:
    """Prompt(s) -> token rows. Text is read as the start of a story: with `add_eot`, the stream's
    story separator (eot) is put before it, as every story in the training stream starts with one
    (so "" generates a story from scratch). A list of ints is one prompt, used as is."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    else:
        raise UserError("the prompt must be a string, a list of strings or a list of token ids, "
                        f"got {type(prompt).__name__}" + (" (empty)" if not prompt else ""))
    if tokenizer is None:
        raise UserError("this model has no tokenizer: pass tokenizer=..., or prompt token ids")
    for i, text in enumerate(texts):
        check_prompt_text(text, i)
    eot = getattr(tokenizer, "eot_id", None)
    rows = []
    for text in texts:
        ids = list(tokenizer.encode(text))
        if add_eot and eot is not None:
            ids = [eot] + ids
        if not ids:
            raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        rows.append(ids)
    return rows


def generate(model: Any, prompt: str | list[int] | list[str], strategy: str = "greedy", top_p: float = 0.9,
             top_k: int = 50, temperature: float = 1.0, max_new_tokens: int = 200, num_samples: int = 1,
             seed: int = 0, stop_at_eot: bool = True, on_token: Callable[[int, str], None] | None = None,
             tokenizer: Any = None, add_eot: bool = True, use_cache: bool = True) -> list[str]:
    """Continue a prompt (or several) with `model`; returns the continuations only, as text.

    `prompt`: a string, a list of strings (one batch) or a list of token ids. Results are
    prompt-major: `num_samples` continuations of the first prompt, then of the next. Strategies:
    "greedy" (argmax), "top-p" (nucleus, `top_p`), "top-k" (`top_k`), "sample" (full softmax); the
    sampling ones divide the logits by `temperature` first. `on_token(row, text_piece)` streams each
    row's text as it grows (an incomplete UTF-8 character is held back until it is complete).
    `tokenizer` defaults to `model.tokenizer`. See the module docstring for batching, the context
    window and determinism.
    """
    check_generation_args(strategy, top_p, top_k, temperature, max_new_tokens, num_samples)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    rows = encode_prompts(prompt, tok, add_eot=add_eot)
    if tok is None:
        raise UserError("this model has no tokenizer to decode its output: pass tokenizer=...")
    callback = None
    decoders: list[_StreamDecoder] = []
    if on_token is not None:
        decoders = [_StreamDecoder(tok) for _ in range(len(rows) * num_samples)]

        def callback(row: int, token: int) -> None:
            piece = decoders[row].push(token)
            if piece:
                on_token(row, piece)

    ids = generate_ids(model, rows, strategy=strategy, top_p=top_p, top_k=top_k, temperature=temperature,
                       max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed,
                       stop_at_eot=stop_at_eot, eot_id=getattr(tok, "eot_id", None), on_token=callback,
                       use_cache=use_cache)
    for row, decoder in enumerate(decoders):
        piece = decoder.flush()
        if piece:
            on_token(row, piece)
    return [tok.decode(r) for r in ids]
