"""The OpenAI-compatible HTTP server (FastAPI): routes, API key, and OpenAI-style errors.

``create_app(serving, api_key)`` builds the app; ``glake serve`` (:func:`glake.serve.api.cli.serve`)
builds the engine thread and runs the app under uvicorn. Every refusal is a 4xx with
``{"error": {"message", "type", "param", "code"}}``: malformed JSON or a field of the wrong type
or range (400), an unknown model (404), a prompt or ``max_tokens`` past the context (400), a
missing or wrong API key (401). ``POST /sleep?level=1`` / ``POST /wake_up`` / ``GET /is_sleeping`` are
vLLM's sleep mode (:meth:`glake.serve.LLMEngine.sleep`): a sleep with requests in flight is a 409, and
a request to a sleeping server wakes it.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Optional, Type, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from glake.errors import InvalidArgumentError, OutOfMemoryError
from glake.serve.api.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from glake.serve.api.serving import OpenAIServing

M = TypeVar("M", bound=BaseModel)


class AbortingStream(StreamingResponse):
    """A streaming response that always closes its generator (whose ``finally`` aborts the request),
    whether the stream ended, the client disconnected, or sending failed."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def parse_body(raw: bytes, model: Type[M]) -> M:
    """The request object of a JSON body, whatever its content type.

    Raises
    ------
    APIError
        400: not JSON, not an object, or a field of the wrong type or out of its range (``param`` names it).
    """
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        param = ".".join(loc) or None
        raise APIError(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")),
                       param=loc[0] if loc else None) from e


def create_app(serving: OpenAIServing, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app of the server.

    Parameters
    ----------
    serving
        The endpoints' logic over the engine thread.
    api_key
        When set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (``/health`` and ``/metrics`` do not).

    Returns
    -------
    FastAPI
        The app (run it with uvicorn).
    """
    app = FastAPI(title="glake serve", docs_url=None, redoc_url=None)
    app.state.serving = serving

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, do not hang
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error"),
                            status_code=500)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization")
        if not auth:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    @app.get("/health")
    async def health() -> Response:
        if not serving.engine.alive:
            return JSONResponse(error_body("the engine thread is not running", "internal_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> Any:
        return {"object": "list", "data": [{"id": serving.model_name, "object": "model", "created": serving.created,
                                            "owned_by": "glake", "max_model_len": serving.engine.max_model_len}]}

    @app.post("/sleep", dependencies=[Depends(check_key)])
    async def sleep(level: int = 1) -> Any:
        why = serving.engine.sleep_refusal(level)
        if why:
            raise APIError(400, why, param="level")
        try:
            done = await serving.engine.sleep(level)
        except InvalidArgumentError as e:
            raise APIError(409, str(e), code="busy") from e
        return {"status": "sleeping", **done}

    @app.post("/wake_up", dependencies=[Depends(check_key)])
    async def wake_up() -> Any:
        try:
            devices = await serving.engine.wake_up()
        except OutOfMemoryError as e:
            raise APIError(503, f"cannot wake up yet: {e}", code="out_of_memory") from e
        return {"status": "awake", "devices_resumed": devices}

    @app.get("/is_sleeping", dependencies=[Depends(check_key)])
    async def is_sleeping() -> Any:
        return {"is_sleeping": serving.engine.sleeping}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Any:
        req = parse_body(await request.body(), CompletionRequest)
        out = await serving.completion(req)
        return AbortingStream(out, media_type="text/event-stream") if req.stream else await out

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Any:
        req = parse_body(await request.body(), ChatCompletionRequest)
        out = await serving.chat(req)
        return AbortingStream(out, media_type="text/event-stream") if req.stream else await out

    return app
