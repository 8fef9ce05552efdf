"""The OpenAI-compatible server (FastAPI + uvicorn): one process, one model, the page at ``/``.

    from speechlm.serving.server import create_app, serve
    app = create_app(SpeechLMPipeline.from_run("runs/tiny"), ServerConfig(max_batch=8))
    serve(app, cfg)                                          # or: tools/serve.py --run runs/tiny

Routes:

* ``POST /v1/chat/completions``: OpenAI's chat completions with an ``input_audio`` part (the format:
  :mod:`speechlm.serving.protocol`); ``stream: true`` answers as server-sent ``chat.completion.chunk`` events
  ending with ``data: [DONE]``. The response's ``speechlm`` field holds the extras (transcript, tokens,
  timings, speech_s / no_speech, the cascade's answer, the boundary picture when asked).
* ``GET /v1/models``, ``GET /v1/models/{id}``: the one model.
* ``WS /v1/audio/stream``: speech in while it is recorded (:mod:`speechlm.serving.streaming`).
* ``GET /``: the page; ``GET /api/info``: what the page shows (run, limits, cascade on/off).

Requests go through the batching scheduler (:mod:`speechlm.serving.scheduler`). Errors are OpenAI's error JSON:
400 bad request (bad JSON, base64, audio, format, too long a clip, max_tokens over the cap), 401 missing or wrong
API key (when one is set), 404 unknown model or path, 413 too large an upload, 429 (with Retry-After) when the
queue is full, 504 when an answer takes longer than ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from speechlm.inference import DEFAULT_PROMPT, SpeechLMPipeline
from speechlm.serving.config import ServerConfig
from speechlm.serving.engine import PipelineEngine, Transcriber
from speechlm.serving.protocol import APIError, ChatRequest, chunk, completion, parse_chat_request, usage
from speechlm.serving.scheduler import Job, QueueFull, Scheduler

log = logging.getLogger("speechlm.serving")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def create_app(model: SpeechLMPipeline | Any, cfg: ServerConfig | None = None, *, cascade: Transcriber | None = None,
               run: str = ""):
    """The FastAPI app around ``model``: a :class:`SpeechLMPipeline` (wrapped in a :class:`PipelineEngine`) or
    an engine (anything with ``run_batch(jobs)`` and ``info()``, e.g. a fake in tests)."""
    from contextlib import asynccontextmanager

    from speechlm.serving import page, streaming

    cfg = cfg or ServerConfig()
    engine = PipelineEngine(model, cascade, run) if isinstance(model, SpeechLMPipeline) else model
    scheduler = Scheduler(engine, cfg.max_batch, cfg.max_wait_ms, cfg.queue_size)
    sessions = streaming.SessionLimit(cfg.stream_max_sessions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="speechlm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.cfg, app.state.engine, app.state.scheduler = cfg, engine, scheduler

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}", kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return _error_response(APIError(400, f"bad request: {e.errors()}"))

    def check_key(auth: str | None) -> None:
        if not cfg.api_key:
            return
        given = (auth or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ---------------------------------------------------------------------------------------- /v1
    def model_card() -> dict[str, Any]:
        return {"id": cfg.model_name, "object": "model", "created": int(app_started), "owned_by": "speechlm"}

    app_started = time.time()

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        check_key(request.headers.get("authorization"))
        if model_id != cfg.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", "invalid_request_error", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request.headers.get("authorization"))
        limit = cfg.max_upload_bytes * 4 // 3 + 64 * 1024  # base64 and the JSON around it
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise APIError(400, "bad Content-Length") from None
        if declared > limit:
            raise APIError(413, f"the request is {declared / 1048576:.1f} MB; this server takes audio up to "
                                f"{cfg.max_upload_bytes / 1048576:g} MB", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"the request is {len(raw) / 1048576:.1f} MB; this server takes audio up to "
                                f"{cfg.max_upload_bytes / 1048576:g} MB", code="request_too_large")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"the request body is not JSON ({e})") from None
        req = await asyncio.to_thread(parse_chat_request, body, cfg)  # base64 + audio decoding off the loop
        job = Job(req, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry after {cfg.retry_after_s} s", "rate_limit_error",
                           "queue_full", headers={"Retry-After": str(cfg.retry_after_s)}) from None
        deadline = job.arrived + cfg.request_timeout_s
        if req.stream:
            return StreamingResponse(_stream(job, req, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        try:
            while True:
                kind, value = await _next_event(job, deadline)
                if kind == "done":
                    return JSONResponse(await _finish(req, value, completion_args=True))
                if kind == "error":
                    raise _as_api_error(value)
        finally:
            job.cancelled.set()  # a no-op once done; stops the decoding of an abandoned request

    async def _finish(req: ChatRequest, payload: dict[str, Any], completion_args: bool) -> dict[str, Any]:
        extras = payload["extras"]
        if req.picture:
            png = await asyncio.to_thread(page.boundary_png, payload["wave"], engine_rate(), payload["tokens"])
            extras["picture"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        if not completion_args:
            return extras
        return completion(req, cfg.model_name, payload["answer"], payload["finish_reason"], payload["prompt_tokens"],
                          payload["completion_tokens"], extras)

    def engine_rate() -> int:
        return int(engine.info().get("sample_rate", 16000))

    async def _stream(job: Job, req: ChatRequest, deadline: float) -> AsyncIterator[bytes]:
        model = cfg.model_name
        try:
            yield _sse(chunk(req, model, {"role": "assistant", "content": ""}))
            while True:
                try:
                    kind, value = await _next_event(job, deadline)
                except APIError as e:
                    yield _sse(e.body())
                    break
                if kind == "piece":
                    yield _sse(chunk(req, model, {"content": value}))
                elif kind == "error":
                    yield _sse(_as_api_error(value).body())
                    break
                else:
                    extras = await _finish(req, value, completion_args=False)
                    yield _sse(chunk(req, model, {}, value["finish_reason"], {"speechlm": extras}))
                    if req.include_usage:
                        yield _sse(chunk(req, model, with_choice=False,
                                         extra={"usage": usage(value["prompt_tokens"], value["completion_tokens"])}))
                    break
            yield b"data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    # ---------------------------------------------------------------------------------------- streaming in
    @app.websocket("/v1/audio/stream")
    async def audio_stream(ws: WebSocket):
        await streaming.serve_session(ws, engine, scheduler, cfg, sessions,
                                      lambda: check_key(ws.headers.get("authorization")
                                                        or ("Bearer " + ws.query_params.get("api_key", ""))))

    # ---------------------------------------------------------------------------------------- the page
    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page.PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    async def info():
        return {**engine.info(), "model": cfg.model_name, "max_mb": round(cfg.max_upload_bytes / 1048576, 3),
                "max_seconds": cfg.max_audio_s, "max_new_tokens": cfg.max_tokens, "default_prompt": DEFAULT_PROMPT,
                "api_key_required": bool(cfg.api_key), "max_batch": cfg.max_batch}

    return app


async def _next_event(job: Job, deadline: float) -> tuple[str, Any]:
    left = deadline - time.perf_counter()
    try:
        if left <= 0:
            raise TimeoutError
        return await asyncio.wait_for(job.events.get(), left)
    except TimeoutError:
        job.cancelled.set()
        raise APIError(504, f"the answer took longer than the server's request timeout "
                            f"({deadline - job.arrived:g} s)", "timeout_error", "request_timeout") from None


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(503, str(e), "server_error", "shutting_down")
    return APIError(500, f"internal error: {e}", "server_error")


# ------------------------------------------------------------------------------------------ running it
class BackgroundServer:
    """uvicorn serving an app from a thread (tests, benchmarks): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws="websockets-sansio")
        self.server = uvicorn.Server(self.config)
        self.thread = None
        self.url = ""

    def __enter__(self) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)


def serve(app: Any, cfg: ServerConfig) -> None:
    """Serve ``app`` on ``cfg.host:cfg.port`` until Ctrl-C."""
    import uvicorn

    log.info("speechlm server on http://%s:%d (Ctrl-C to stop)", cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", ws="websockets-sansio")
