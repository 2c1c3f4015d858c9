"""The work of each request, run in a worker thread (see engine.py): generation token by token with
each token's log-probability and alternatives, scoring a text, and OpenAI-style completions.

Generation is `picollm.generation.generate_steps` (the model's prefill/decode cache, the library's
sampling); scoring is `picollm.evaluation.token_logprobs` (the evaluation's windows). Each function
reports through `job.emit` and calls `job.check()` between tokens, so a cancelled request stops within
one token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from picollm.errors import UserError
from picollm.evaluation import token_logprobs
from picollm.generation import generate_steps
from picollm.serve.catalog import ServedModel
from picollm.serve.engine import Cancelled, Job
from picollm.serve.protocol import CompletionRequest, GenerateRequest, Prompt, ScoreRequest
from picollm.serve.text import PieceDecoder, StopScanner, token_label, token_pieces

log = logging.getLogger("picollm.serve")
LN2 = math.log(2)


def alternatives(tokenizer: Any, log_p: torch.Tensor, n: int) -> list[tuple[str, int, float]]:
    """The `n` most likely tokens of one position: (label, id, log-probability), most likely first."""
    if n <= 0:
        return []
    values, ids = log_p.topk(min(n, log_p.shape[-1]))
    return [(token_label(tokenizer, int(i)), int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]


@dataclass
class TokenOut:
    """One token of a response: its piece of the text, its log-probability and the alternatives."""

    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[str, int, float]] = field(default_factory=list)


def step_token(tokenizer: Any, decoder: PieceDecoder, token: int, logits: torch.Tensor, top_n: int) -> TokenOut:
    log_p = torch.log_softmax(logits.float(), dim=-1)  # the model's own distribution (temperature 1)
    return TokenOut(token, decoder.push(token), float(log_p[token]), alternatives(tokenizer, log_p, top_n))


# ---------------------------------------------------------------------------------------------
# scoring


def score_prompt(served: ServedModel, prompt: Prompt, top_n: int, job: Job) -> list[TokenOut]:
    """The prompt's own tokens (the last `prompt.shown` ids) with their pieces of text and, after the
    first id of the stream, their log-probabilities; the first id of a stream has none."""
    ids = prompt.ids
    scores = token_logprobs(served.model, ids, top_n=top_n, before_window=job.check) if len(ids) >= 2 else None
    tokenizer = served.tokenizer
    first = len(ids) - prompt.shown
    pieces = token_pieces(tokenizer, ids[first:])
    out = []
    for k, (token, piece) in enumerate(zip(ids[first:], pieces)):
        t = first + k  # position in the stream; logprobs[t - 1] predicts it
        if t == 0 or scores is None:
            out.append(TokenOut(token, piece))
            continue
        top = [(token_label(tokenizer, int(i)), int(i), float(v))
               for i, v in zip(scores.top_ids[t - 1].tolist(), scores.top_logprobs[t - 1].tolist())]
        out.append(TokenOut(token, piece, float(scores.logprobs[t - 1]), top))
    return out


def run_score(request: ScoreRequest, job: Job) -> None:
    """One result per model: every token's surprisal, and the text's NLL, perplexity and bits per byte."""
    n_bytes = len(request.text.encode("utf-8"))
    results = []
    for served in request.models:
        job.check()
        try:
            tokens = score_prompt(served, request.prompts[served.id], request.top_n, job)
        except Exception as exc:  # this model's failure is its own entry; the others are still scored
            results.append({"model": served.id, "error": _describe(served, exc)})
            continue
        total = -sum(t.logprob for t in tokens if t.logprob is not None)
        offset = 0
        rows = []
        for t in tokens:
            rows.append({"id": t.id, "text": t.text, "offset": offset, "logprob": t.logprob,
                         "bits": -t.logprob / LN2, "top": [[label, lp, i] for label, i, lp in t.top]})
            offset += len(t.text)
        results.append({"model": served.id, "tokens": rows, "num_tokens": len(rows), "nll": total,
                        "bits": total / LN2, "nll_per_token": total / len(rows),
                        "perplexity": math.exp(min(total / len(rows), 700)),
                        "bits_per_byte": total / LN2 / n_bytes, "bytes": n_bytes})
    job.emit({"results": results})


# ---------------------------------------------------------------------------------------------
# the page's side-by-side generation


def run_generate(request: GenerateRequest, job: Job) -> None:
    """Every model continues the prompt, one token each in turn, so that their columns fill together.
    Events: {"model", "token": {...}}, then {"model", "done": "stop" | "length"} or {"model", "error"}."""
    streams: dict[str, tuple[ServedModel, Any, PieceDecoder]] = {}
    counts = dict.fromkeys((m.id for m in request.models), 0)
    try:
        for served in request.models:
            steps = generate_steps(served.model, [request.prompts[served.id].ids], max_new_tokens=request.max_tokens,
                                   eot_id=served.tokenizer.eot_id, **request.sampling.kwargs())
            streams[served.id] = (served, steps, PieceDecoder(served.tokenizer))
        while streams:
            for model_id in list(streams):
                job.check()
                served, steps, decoder = streams[model_id]
                try:
                    step = next(steps)
                except StopIteration:
                    del streams[model_id]
                    tail = decoder.flush()
                    reason = "length" if counts[model_id] >= request.max_tokens else "stop"
                    job.emit({"model": model_id, "done": reason, "tail": tail})
                    continue
                except Exception as exc:  # this model stops; the others go on
                    del streams[model_id]
                    job.emit({"model": model_id, "error": _describe(served, exc)})
                    continue
                counts[model_id] += 1
                t = step_token(served.tokenizer, decoder, step.token, step.logits, request.top_n)
                job.emit({"model": model_id, "token": {"id": t.id, "text": t.text, "logprob": t.logprob,
                                                       "top": [[label, lp, i] for label, i, lp in t.top]}})
    finally:
        for _, steps, _ in streams.values():
            steps.close()


def _describe(served: ServedModel, exc: BaseException) -> str:
    if isinstance(exc, Cancelled):
        raise exc
    if isinstance(exc, UserError):
        return f"model '{served.id}': {exc}"
    log.error("model '%s' failed", served.id, exc_info=exc)
    return f"model '{served.id}' failed: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------
# OpenAI completions


class _Row:
    """One completion: holds tokens back while their text could still become a stop sequence."""

    def __init__(self, decoder: PieceDecoder, stops: list[str]) -> None:
        self.decoder = decoder
        self.scanner = StopScanner(stops)
        self.pending: list[tuple[TokenOut, int]] = []  # (token, where its text ends in the row's text)
        self.count = 0
        self.finish: str | None = None

    def add(self, token: TokenOut) -> list[TokenOut]:
        """Take a new token; return the tokens whose text is now final."""
        self.count += 1
        self.pending.append((token, len(self.scanner.text) + len(token.text)))
        safe, stopped = self.scanner.feed(token.text)
        if stopped:
            self.finish = "stop"
            out = []
            for t, end in self.pending:  # the tokens before the stop sequence, the last one cut at it
                start = end - len(t.text)
                if start < safe:
                    t.text = t.text[:safe - start]
                    out.append(t)
            self.pending = []
            return out
        out = []
        while self.pending and self.pending[0][1] <= safe:
            out.append(self.pending.pop(0)[0])
        return out

    def close(self, reason: str) -> tuple[list[TokenOut], str]:
        """The end of generation: the tokens still held back, and text of a last incomplete character."""
        self.finish = self.finish or reason
        out = [t for t, _ in self.pending]
        self.pending = []
        return out, self.decoder.flush()


def run_completion(request: CompletionRequest, job: Job) -> None:
    """Events: {"echo": prompt index, "tokens": [...]} per prompt with echo; {"row", "tokens": [...]} as a
    completion's text becomes final; {"row", "finish": reason, "tail": text} at its end."""
    served = request.served
    tokenizer = served.tokenizer
    top_n = request.logprobs or 0
    if request.echo:
        for index, prompt in enumerate(request.prompts):
            job.check()
            if request.logprobs is not None:
                tokens = score_prompt(served, prompt, top_n, job)
            else:
                own = prompt.ids[len(prompt.ids) - prompt.shown:]
                tokens = [TokenOut(t, piece) for t, piece in zip(own, token_pieces(tokenizer, own))]
            job.emit({"echo": index, "tokens": tokens})
    rows = [_Row(PieceDecoder(tokenizer), request.stop) for _ in range(len(request.prompts) * request.n)]
    if request.max_tokens > 0:
        steps = generate_steps(served.model, [p.ids for p in request.prompts], num_samples=request.n,
                               max_new_tokens=request.max_tokens, eot_id=tokenizer.eot_id,
                               **request.sampling.kwargs())
        try:
            for step in steps:
                job.check()
                row = rows[step.row]
                if row.finish is not None:
                    continue  # stopped by a stop sequence; the batch goes on for the other rows
                token = step_token(tokenizer, row.decoder, step.token, step.logits, top_n)
                final = row.add(token)
                if final:
                    job.emit({"row": step.row, "tokens": final})
                if row.finish is not None:
                    job.emit({"row": step.row, "finish": row.finish, "tail": ""})
                    if all(r.finish is not None for r in rows):
                        break
        finally:
            steps.close()
    for index, row in enumerate(rows):
        if row.finish is None:
            held, tail = row.close("length" if row.count >= request.max_tokens else "stop")
            if held:
                job.emit({"row": index, "tokens": held})
            job.emit({"row": index, "finish": row.finish, "tail": tail})
