"""Reading and checking request bodies: every mistake is one `ApiError` (HTTP 4xx) naming the field.

Checked by hand rather than by a schema so that each message says which field is wrong, what it was and
what is allowed, in the words of the OpenAI completions protocol where the field comes from there.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from picollm.generation import STRATEGIES
from picollm.serve.catalog import Catalog, ServedModel

MAX_N = 8
MAX_LOGPROBS = 20
MAX_STOPS = 16  # OpenAI allows 4; evaluation harnesses send more
MAX_SEED = 2**63 - 1
CHARS_PER_TOKEN_BOUND = 16  # a text over limit x 16 characters is refused before it is tokenized
IGNORED_FIELDS = {"user"}  # OpenAI fields that change nothing here
# OpenAI fields accepted only with the value that means "off" (the feature does not exist here)
OFF_FIELDS: dict[str, tuple[Any, ...]] = {"suffix": (None, ""), "best_of": (None, 1), "frequency_penalty": (None, 0),
                                           "presence_penalty": (None, 0), "logit_bias": (None, {})}


class ApiError(Exception):
    """A bad request: HTTP `status` with one message naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.kind = kind


@dataclass
class Limits:
    """What one request may ask for (the server's flags)."""

    max_tokens: int = 1024  # new tokens per completion
    max_prompt_tokens: int = 2048  # tokens of one prompt or scored text
    max_prompts: int = 32  # prompts in one completions request
    max_body_bytes: int = 1 << 20


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(f"the request body is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Fields:
    """Typed access to a request object's fields; each getter raises an ApiError naming the field."""

    def __init__(self, data: dict[str, Any], known: set[str]) -> None:
        self.data = data
        for name in data:
            if name not in known and name not in IGNORED_FIELDS and name not in OFF_FIELDS:
                raise ApiError(f"unknown field '{name}'; this endpoint takes: {', '.join(sorted(known))}", name)
        for name, off in OFF_FIELDS.items():
            if name in data and data[name] not in off:
                raise ApiError(f"'{name}' is not supported by this server; leave it out", name)

    def integer(self, name: str, default: int | None, low: int | None = None, high: int | None = None,
                why_high: str = "") -> int | None:
        value = self.data.get(name, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(f"'{name}' must be an integer, got {_show(value)}", name)
        if low is not None and value < low:
            raise ApiError(f"'{name}' must be at least {low}, got {value}", name)
        if high is not None and value > high:
            raise ApiError(f"'{name}' must be at most {high}{why_high}, got {value}", name)
        return value

    def number(self, name: str, default: float | None, low: float, high: float,
               low_open: bool = False) -> float | None:
        value = self.data.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ApiError(f"'{name}' must be a number, got {_show(value)}", name)
        if value < low or value > high or (low_open and value == low):
            span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise ApiError(f"'{name}' must be in {span}, got {value}", name)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ApiError(f"'{name}' must be true or false, got {_show(value)}", name)
        return value

    def string(self, name: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str:
        value = self.data.get(name, default)
        if not isinstance(value, str):
            what = "is required" if value is None else f"must be a string, got {_show(value)}"
            raise ApiError(f"'{name}' {what}", name)
        if choices is not None and value not in choices:
            raise ApiError(f"'{name}' must be one of {', '.join(choices)}, got {_show(value)}", name)
        _check_text(value, name)
        return value


def _check_text(text: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"'{name}' is not valid Unicode text (it holds an unpaired surrogate)", name) from None


def lookup_model(catalog: Catalog, name: Any, param: str = "model") -> ServedModel:
    if not isinstance(name, str):
        raise ApiError(f"'{param}' must be a model id (a string), got {_show(name)}", param)
    served = catalog.get(name)
    if served is None:
        loaded = ", ".join(catalog.models)
        raise ApiError(f"model '{name[:80]}' is not loaded here; the loaded models are: {loaded}", param,
                       status=404, kind="model_not_found")
    return served


def _random_seed() -> int:
    return secrets.randbits(63)


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass
class Prompt:
    """One prompt as the model reads it: `ids` (an eot first for text) and the part of them that is the
    prompt itself (`shown`: what echo returns; `context` = ids[:-len(shown)] is read but not shown)."""

    ids: list[int]
    shown: int  # how many of the trailing ids are the prompt's own tokens
    text: str | None  # the prompt's text, when it was given as text


def text_prompt(served: ServedModel, text: str, limits: Limits, param: str = "prompt") -> Prompt:
    """A text read as the start of a story, as `picollm generate` reads it: the end-of-text token first."""
    _check_text(text, param)
    limit = limits.max_prompt_tokens
    if len(text) > limit * CHARS_PER_TOKEN_BOUND:
        raise ApiError(f"'{param}' is {len(text):,} characters, far over the limit of {limit} tokens; "
                       "shorten it", param)
    ids = served.tokenizer.encode(text)
    if len(ids) > limit:
        raise ApiError(f"'{param}' is {len(ids):,} tokens for model '{served.id}'; the limit is {limit} "
                       "(the server's --max-prompt-tokens)", param)
    return Prompt([served.tokenizer.eot_id, *ids], len(ids), text)


def id_prompt(served: ServedModel, ids: list[Any], limits: Limits, param: str) -> Prompt:
    """A prompt given as token ids, read as it is."""
    vocab = int(served.model.config.vocab_size)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ApiError(f"'{param}' holds {_show(t)}, not a token id of model '{served.id}' "
                           f"(an integer in [0, {vocab}))", param)
    if not ids:
        raise ApiError(f"'{param}' is an empty list of token ids; give at least one", param)
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(f"'{param}' is {len(ids):,} tokens; the limit is {limits.max_prompt_tokens} "
                       "(the server's --max-prompt-tokens)", param)
    return Prompt(list(ids), len(ids), None)


def completion_prompts(served: ServedModel, value: Any, limits: Limits) -> list[Prompt]:
    """OpenAI's `prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [text_prompt(served, value, limits)]
    if not isinstance(value, list) or not value:
        raise ApiError("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id "
                       f"lists, got {_show(value)}", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [id_prompt(served, value, limits, "prompt")]
    if len(value) > limits.max_prompts:
        raise ApiError(f"'prompt' holds {len(value)} prompts; the limit is {limits.max_prompts} per request",
                       "prompt")
    prompts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            prompts.append(text_prompt(served, item, limits, f"prompt[{i}]"))
        elif isinstance(item, list):
            prompts.append(id_prompt(served, item, limits, f"prompt[{i}]"))
        else:
            raise ApiError(f"'prompt[{i}]' must be a string or a list of token ids, got {_show(item)}",
                           f"prompt[{i}]")
    return prompts


# ---------------------------------------------------------------------------------------------
# requests


@dataclass
class Sampling:
    """How to choose tokens, in `picollm.generation` terms."""

    strategy: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed}


@dataclass
class CompletionRequest:
    served: ServedModel
    prompts: list[Prompt]
    max_tokens: int
    n: int
    sampling: Sampling
    stop: list[str]
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool = False


COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
                     "stream", "stream_options", "logprobs", "echo"}


def parse_completion(data: dict[str, Any], catalog: Catalog, limits: Limits) -> CompletionRequest:
    f = Fields(data, COMPLETION_FIELDS)
    if "model" not in data:
        raise ApiError("'model' is required: one of the ids GET /v1/models lists", "model")
    served = lookup_model(catalog, data["model"])
    if "prompt" not in data:
        raise ApiError("'prompt' is required", "prompt")
    prompts = completion_prompts(served, data["prompt"], limits)
    echo = f.boolean("echo", False)
    max_tokens = f.integer("max_tokens", 16, 0, limits.max_tokens, " (the server's --max-tokens)")
    if max_tokens == 0 and not echo:
        raise ApiError("'max_tokens' must be at least 1 (0 is allowed with echo: true, to score the prompt)",
                       "max_tokens")
    n = f.integer("n", 1, 1, MAX_N)
    if len(prompts) * n > limits.max_prompts:
        raise ApiError(f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} completions; the limit is "
                       f"{limits.max_prompts} per request", "n")
    temperature = f.number("temperature", 1.0, 0.0, 2.0)
    top_p = f.number("top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = f.integer("top_k", None, -1)
    if top_k == 0 or top_k == -1:
        top_k = None  # "off", as vLLM spells it
    if top_k is not None and top_p < 1.0:
        raise ApiError("give 'top_p' or 'top_k', not both: one filter at a time", "top_k")
    seed = f.integer("seed", None, 0, MAX_SEED)
    if temperature == 0.0:
        sampling = Sampling("greedy")
    elif top_k is not None:
        sampling = Sampling("top-k", temperature, 1.0, top_k)
    elif top_p < 1.0:
        sampling = Sampling("top-p", temperature, top_p)
    else:
        sampling = Sampling("sample", temperature)
    sampling.seed = seed if seed is not None else _random_seed()
    stop = data.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS:
        stops = list(stop)
    else:
        raise ApiError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings, got {_show(stop)}",
                       "stop")
    for s in stops:
        _check_text(s, "stop")
    stream = f.boolean("stream", False)
    options = data.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError("'stream_options' may only hold include_usage", "stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    return CompletionRequest(served, prompts, max_tokens, n, sampling, stops,
                             f.integer("logprobs", None, 0, MAX_LOGPROBS), echo, stream, include_usage)


@dataclass
class GenerateRequest:
    """The page's side-by-side generation: one prompt, several models."""

    models: list[ServedModel]
    prompt: str
    max_tokens: int
    sampling: Sampling
    top_n: int = 10
    prompts: dict[str, Prompt] = field(default_factory=dict)


def _models(data: dict[str, Any], catalog: Catalog) -> list[ServedModel]:
    names = data.get("models")
    if not isinstance(names, list) or not names:
        raise ApiError("'models' must be a non-empty list of model ids", "models")
    if len(set(map(str, names))) != len(names):
        raise ApiError("'models' names a model twice", "models")
    return [lookup_model(catalog, name, f"models[{i}]") for i, name in enumerate(names)]


def parse_generate(data: dict[str, Any], catalog: Catalog, limits: Limits) -> GenerateRequest:
    f = Fields(data, {"models", "prompt", "strategy", "temperature", "top_p", "top_k", "max_tokens", "seed"})
    models = _models(data, catalog)
    prompt = f.string("prompt", "")
    sampling = Sampling(
        strategy=f.string("strategy", "greedy", STRATEGIES),
        temperature=f.number("temperature", 1.0, 0.0, 2.0, low_open=True),
        top_p=f.number("top_p", 0.9, 0.0, 1.0, low_open=True),
        top_k=f.integer("top_k", 50, 1),
        seed=f.integer("seed", 0, 0, MAX_SEED))
    max_tokens = f.integer("max_tokens", 64, 1, limits.max_tokens, " (the server's --max-tokens)")
    request = GenerateRequest(models, prompt, max_tokens, sampling)
    request.prompts = {m.id: text_prompt(m, prompt, limits) for m in models}
    return request


@dataclass
class ScoreRequest:
    """The page's scoring: one text, several models."""

    models: list[ServedModel]
    text: str
    top_n: int
    prompts: dict[str, Prompt] = field(default_factory=dict)


def parse_score(data: dict[str, Any], catalog: Catalog, limits: Limits) -> ScoreRequest:
    f = Fields(data, {"models", "text", "top_n"})
    models = _models(data, catalog)
    text = f.string("text")
    if not text:
        raise ApiError("'text' is empty: give a text to score", "text")
    request = ScoreRequest(models, text, f.integer("top_n", 10, 0, MAX_LOGPROBS))
    request.prompts = {m.id: text_prompt(m, text, limits, "text") for m in models}
    return request
