"""The web application: the playground page, the OpenAI-compatible API and the page's own endpoints.

Routes (docs/serve.md has a curl example of each):

    GET  /                      the playground page (static files under /static/)
    GET  /health                liveness, loaded models, queue use; never waits for a model
    GET  /v1/models             the model ids, OpenAI's list shape (and /v1/models/{id})
    POST /v1/completions        OpenAI completions: text or token prompts, n, stop, seed, stream, logprobs, echo
    GET  /api/models            the models table: family, size, parameters, tokenizer, val/test metrics
    POST /api/generate          side-by-side generation, streamed as server-sent events
    POST /api/score             per-token surprisal, NLL, perplexity and bits per byte of a text
    GET  /studies/{n}/report    the report of a study directory given on the command line

Every bad request is a 4xx with one message naming the field ({"error": {"message", "type", "param"}});
a full queue is 503 with Retry-After; a model that fails is a 500 for that request only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from picollm.errors import UserError
from picollm.serve import inference
from picollm.serve.catalog import Catalog
from picollm.serve.engine import Busy, Engine, Failure, Job
from picollm.serve.guard import Guard, error_body
from picollm.serve.openai_api import build_completion, model_card, sse, stream_completion
from picollm.serve.protocol import ApiError, Limits, parse_completion, parse_generate, parse_json, parse_score

log = logging.getLogger("picollm.serve")
STATIC = resources.files("picollm.serve") / "static"
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
RETRY_AFTER_S = 1


@dataclass
class Settings:
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    allowed_hosts: set[str] = field(default_factory=set)
    workers: int = 2
    queue_size: int = 16


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The body as a JSON object; 415 unless it says it is JSON, 413 past the size limit."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(f"Content-Type must be application/json, got '{kind or 'none'}'", status=415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise ApiError(f"the request body is over {limits.max_body_bytes:,} bytes", status=413)
    return parse_json(bytes(body))


def _failure_message(failure: Failure, model_id: str) -> tuple[int, str, str]:
    if isinstance(failure.error, UserError):
        return 400, f"model '{model_id}': {failure.error}", "invalid_request_error"
    return 500, f"model '{model_id}' failed: {type(failure.error).__name__}: {failure.error}", "server_error"


async def collect(job: Job, request: Request) -> list[Any]:
    """All of a job's events; a client that disconnects meanwhile cancels the job."""
    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return [event async for event in job.events()]
    finally:
        watcher.cancel()


def create_app(catalog: Catalog, settings: Settings | None = None, engine: Engine | None = None) -> Any:
    """The ASGI application serving `catalog` (a FastAPI app inside the `Guard` middleware)."""
    settings = settings or Settings()
    limits = settings.limits
    engine = engine or Engine(settings.workers, settings.queue_size)
    app = FastAPI(title="picollm", docs_url=None, redoc_url=None, openapi_url=None)  # the docs UI loads a CDN
    app.state.catalog = catalog
    app.state.engine = engine
    app.router.on_shutdown.append(engine.shutdown)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        retry = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        return _error(exc.status, exc.message, exc.kind, exc.param, retry)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("path", "query", "body"))
        return _error(400, f"'{where}': {first.get('msg', 'invalid value')}", param=where or None)

    def submit(work: Any) -> Job:
        try:
            return engine.submit(work)
        except Busy:
            raise ApiError(f"the server is busy ({engine.capacity} requests running or queued); retry shortly",
                           status=503, kind="server_busy") from None

    # --- pages -----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/studies/{index}/report", include_in_schema=False)
    async def report(index: int) -> FileResponse:
        study = catalog.studies[index] if 0 <= index < len(catalog.studies) else None
        if study is None or study.report is None:
            raise ApiError(f"no study report {index}: GET /api/models lists the studies and their reports", "index",
                           status=404)
        return FileResponse(str(study.report), media_type="text/html",
                            headers={"Content-Security-Policy": REPORT_POLICY})

    # --- status ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(catalog.models),
                "queue": {"active": engine.active, "capacity": engine.capacity, "workers": engine.workers},
                "jobs": dict(engine.stats)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in catalog.models]}

    @app.get("/v1/models/{model_id}")
    async def one_model(model_id: str) -> dict[str, Any]:
        if model_id not in catalog.models:
            raise ApiError(f"model '{model_id[:80]}' is not loaded here; the loaded models are: "
                           f"{', '.join(catalog.models)}", "model", status=404, kind="model_not_found")
        return model_card(model_id)

    @app.get("/api/models")
    async def models_table() -> dict[str, Any]:
        return {
            "models": [{"id": m.id, "source": m.source, "study": None if m.study is None else m.study.index, **m.info}
                       for m in catalog.models.values()],
            "studies": [{"index": s.index, "title": s.title,
                         "report": f"/studies/{s.index}/report" if s.report is not None else None}
                        for s in catalog.studies],
            "limits": {"max_tokens": limits.max_tokens, "max_prompt_tokens": limits.max_prompt_tokens},
        }

    # --- OpenAI completions ----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        parsed = parse_completion(await read_json(request, limits), catalog, limits)
        job = submit(lambda job: inference.run_completion(parsed, job))
        model_id = parsed.served.id
        if parsed.stream:
            async def events() -> Any:
                async for event in job.events():
                    if isinstance(event, Failure):
                        _, message, kind = _failure_message(event, model_id)
                        yield {"error": {"message": message, "type": kind, "param": None, "code": None}}
                        return
                    yield event

            return StreamingResponse(stream_completion(parsed, events()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        events = await collect(job, request)
        if events and isinstance(events[-1], Failure):
            status, message, kind = _failure_message(events[-1], model_id)
            return _error(status, message, kind)
        return build_completion(parsed, events)

    # --- the page's endpoints --------------------------------------------------------------------
    @app.post("/api/generate")
    async def generate(request: Request) -> StreamingResponse:
        parsed = parse_generate(await read_json(request, limits), catalog, limits)
        job = submit(lambda job: inference.run_generate(parsed, job))

        async def stream() -> Any:
            async for event in job.events():
                if isinstance(event, Failure):
                    yield sse({"error": _failure_message(event, ", ".join(m.id for m in parsed.models))[1]})
                    return
                yield sse(event)
            yield sse({"done": True})

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/score")
    async def score(request: Request) -> Any:
        parsed = parse_score(await read_json(request, limits), catalog, limits)
        job = submit(lambda job: inference.run_score(parsed, job))
        events = await collect(job, request)
        if events and isinstance(events[-1], Failure):
            status, message, kind = _failure_message(events[-1], ", ".join(m.id for m in parsed.models))
            return _error(status, message, kind)
        return events[-1] if events else _error(499, "the client went away")

    return Guard(app, settings.api_key, settings.allowed_hosts, limits.max_body_bytes)
