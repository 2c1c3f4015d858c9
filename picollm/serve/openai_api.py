"""The OpenAI completions protocol's response shapes, built from `inference.run_completion`'s events.

A choice's `logprobs` is the legacy completions object: `tokens` (each token's piece of the text),
`token_logprobs`, `top_logprobs` (a {token: log-probability} object per token) and `text_offset`.
With echo, the prompt's tokens come first; the first token of a prompt given as token ids has no
log-probability (null), as nothing comes before it; a text prompt is read after an end-of-text token,
so its first token has one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from picollm.serve.inference import TokenOut
from picollm.serve.protocol import CompletionRequest


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "picollm"}


class Logprobs:
    """A choice's logprobs object, grown token by token."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.data: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, tokens: list[TokenOut]) -> Logprobs:
        for t in tokens:
            self.data["tokens"].append(t.text)
            self.data["token_logprobs"].append(t.logprob)
            top: dict[str, float] | None = None
            if t.logprob is not None:
                top = {}
                for label, _, lp in t.top:
                    top.setdefault(label, lp)  # two ids with the same text: the likelier one
            self.data["top_logprobs"].append(top)
            self.data["text_offset"].append(self.offset)
            self.offset += len(t.text)
        return self


def _text(tokens: list[TokenOut]) -> str:
    return "".join(t.text for t in tokens)


def build_completion(request: CompletionRequest, events: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    n = request.n
    choices = [{"text": "", "index": i, "logprobs": Logprobs() if request.logprobs is not None else None,
                "finish_reason": None} for i in range(len(request.prompts) * n)]
    completion_tokens = 0
    for event in events:
        if "echo" in event:
            for i in range(event["echo"] * n, event["echo"] * n + n):
                choices[i]["text"] += _text(event["tokens"])
                if choices[i]["logprobs"] is not None:
                    choices[i]["logprobs"].add(event["tokens"])
        elif "tokens" in event:
            choice = choices[event["row"]]
            choice["text"] += _text(event["tokens"])
            completion_tokens += len(event["tokens"])
            if choice["logprobs"] is not None:
                choice["logprobs"].add(event["tokens"])
        elif "finish" in event:
            choice = choices[event["row"]]
            choice["text"] += event["tail"]
            choice["finish_reason"] = event["finish"]
    for choice in choices:
        if choice["logprobs"] is not None:
            choice["logprobs"] = choice["logprobs"].data
    return {"id": completion_id(), "object": "text_completion", "created": int(time.time()),
            "model": request.served.id, "choices": choices, "usage": usage(request, completion_tokens)}


def usage(request: CompletionRequest, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(p.ids) for p in request.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_completion(request: CompletionRequest, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per group of final tokens of a choice, a last chunk per choice with its
    finish_reason, a usage chunk when stream_options.include_usage asks, then `data: [DONE]`."""
    cid, created, model = completion_id(), int(time.time()), request.served.id
    n = request.n
    offsets = [Logprobs() for _ in range(len(request.prompts) * n)]  # text offsets per choice
    completion_tokens = 0

    def chunk(index: int, text: str, tokens: list[TokenOut] | None, finish: str | None = None) -> str:
        logprobs = None
        if request.logprobs is not None and tokens is not None:
            part = Logprobs(offsets[index].offset).add(tokens)
            offsets[index].offset = part.offset
            logprobs = part.data
        else:
            offsets[index].offset += len(text)
        return sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]})

    async for event in events:
        if "error" in event:
            yield sse({"error": event["error"]})
            return
        if "echo" in event:
            for i in range(event["echo"] * n, event["echo"] * n + n):
                yield chunk(i, _text(event["tokens"]), event["tokens"])
        elif "tokens" in event:
            completion_tokens += len(event["tokens"])
            yield chunk(event["row"], _text(event["tokens"]), event["tokens"])
        elif "finish" in event:
            yield chunk(event["row"], event["tail"], None, event["finish"])
    if request.include_usage:
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": usage(request, completion_tokens)})
    yield "data: [DONE]\n\n"
