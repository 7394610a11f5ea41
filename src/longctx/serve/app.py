"""The HTTP side of ``longctx serve``: a FastAPI app over an ``Engine``.

Routes (all but ``/health`` need a key when the server has keys):

=========================================  ===============================================================
``GET /health``                            status, model, strategy, jobs queued; never waits for the model
``GET /v1/models``                         the one model (for OpenAI clients)
``POST /v1/documents``                     JSON ``{"text", "name"?, "format"?}`` or a multipart ``file``:
                                           tokenized, prefilled once, kept (``201``)
``GET /v1/documents[/{id}]``               your documents / one of them
``DELETE /v1/documents/{id}``              gone, with its cache
``POST /v1/documents/{id}/query``          ``{"question", "max_tokens"?, ...}``: continues a copy of the
                                           document's cache; ``usage`` says what was processed and reused
``POST /v1/chat/completions``              OpenAI's chat API, streamed (server-sent events) or not; a
                                           conversation over the budget is fitted by Task 6's
                                           ``AdaptiveContextManager``
=========================================  ===============================================================

Errors are JSON, ``{"error": {"message", "type"}}``: ``400`` bad values,
``401`` no or a wrong key, ``404`` not yours or not there, ``413`` a body,
document or token count over its limit, ``422`` malformed JSON or fields,
``429`` over the rate (with ``Retry-After``), ``500`` without a trace (it is
logged on the server).
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longctx.serve.engine import Answer, DocumentGone, Engine, OverLimit
from longctx.serve.security import Keys, RateLimiter

log = logging.getLogger("longctx.serve")


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    max_document_tokens: int = 131072
    max_new_tokens: int = 512
    context_budget: int | None = None  # chat: the model's max_position_embeddings when None


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    name: str = Field(default="", max_length=200)
    format: str | None = None  # "raw" or "chat" (default: "chat" when the tokenizer has a template)


class Sampling(BaseModel):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # greedy by default
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None


class QueryIn(Sampling):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    reuse_cache: bool = True  # False: prefill document + question from scratch (to measure the saving)


class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatIn(Sampling):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: dict | None = None


def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status, headers=headers)


class Guard:
    """ASGI middleware in front of ``/v1``: the key (``401``), the rate (``429``) and the body
    size (``413``, from ``Content-Length`` or while the body arrives), before any route runs."""

    def __init__(self, app, keys: Keys, limiter: RateLimiter | None, max_body_bytes: int):
        self.app, self.keys, self.limiter, self.max_body = app, keys, limiter, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        presented = headers.get("x-api-key")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if presented is None and scheme.lower() == "bearer":
            presented = token.strip()
        key = self.keys.identify(presented)
        if key is None:
            return await error(401, "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                               "authentication_error", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        wait = self.limiter.take(key) if self.limiter else 0.0
        if wait > 0:
            return await error(429, f"rate limit reached: retry in {wait:.1f} s", "rate_limit_error",
                               {"Retry-After": str(math.ceil(wait))})(scope, receive, send)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            return await error(413, f"the body is over {self.max_body} bytes", "request_too_large")(
                scope, receive, send)
        scope.setdefault("state", {})["key"] = key
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # a chunked body without Content-Length
                raise HTTPException(413, f"the body is over {self.max_body} bytes")
            return message
        return await self.app(scope, counted, send)


def create_app(engine: Engine, keys: Keys | None = None, limiter: RateLimiter | None = None,
               limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    budget = limits.context_budget or engine.max_position_embeddings
    model_name = engine.name
    app = FastAPI(title="longctx serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, keys=keys or Keys(None), limiter=limiter, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kinds = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}
        return error(e.status_code, str(e.detail), kinds.get(e.status_code, "invalid_request_error"), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
        return error(422, problems, "invalid_request_error")

    @app.exception_handler(DocumentGone)
    async def gone(request, e: DocumentGone):
        return error(404, str(e), "not_found_error")

    @app.exception_handler(OverLimit)
    async def over(request, e: OverLimit):
        return error(413, str(e), "request_too_large")

    @app.exception_handler(ValueError)
    async def bad_value(request, e: ValueError):
        return error(400, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return error(500, "internal server error (logged on the server)", "server_error")

    def max_tokens(body: Sampling) -> int:
        n = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(256, limits.max_new_tokens)
        if n > limits.max_new_tokens:
            raise HTTPException(413, f"max_tokens={n} is over this server's limit of {limits.max_new_tokens}")
        return n

    def sampling(body: Sampling) -> tuple[dict, list[str]]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}, [s for s in stop if s]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.health()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "longctx"}]}

    @app.post("/v1/documents", status_code=201)
    async def upload(request: Request):
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestValidationError([{"loc": ("body", "file"), "msg": "a file field is required"}])
            try:
                text = (await upload.read()).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestValidationError([{"loc": ("body", "file"), "msg": "the file is not UTF-8 text"}])
            fields = {"text": text, "name": form.get("name") or upload.filename or ""}
            if form.get("format"):
                fields["format"] = form.get("format")
        else:
            try:
                fields = await request.json()
            except json.JSONDecodeError as e:
                raise RequestValidationError([{"loc": ("body",), "msg": f"malformed JSON: {e}"}]) from None
        try:
            body = DocumentIn.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        doc = await engine.upload(request.state.key, body.name, body.text, body.format, limits.max_document_tokens)
        return doc.public()

    @app.get("/v1/documents")
    async def documents(request: Request):
        return {"object": "list", "data": [d.public() for d in engine.documents_of(request.state.key)]}

    @app.get("/v1/documents/{doc_id}")
    async def document(request: Request, doc_id: str):
        return engine.document(request.state.key, doc_id).public()

    @app.delete("/v1/documents/{doc_id}")
    async def delete(request: Request, doc_id: str):
        await engine.delete(request.state.key, doc_id)
        return {"id": doc_id, "deleted": True}

    @app.post("/v1/documents/{doc_id}/query")
    async def query(request: Request, doc_id: str, body: QueryIn):
        n = max_tokens(body)
        options, stop = sampling(body)
        answer = await engine.ask(request.state.key, doc_id, body.question, n, options, stop, body.reuse_cache)
        return {"document": doc_id, "answer": answer.text, "finish_reason": answer.finish_reason,
                "seconds": answer.seconds,
                "usage": {"prompt_tokens": answer.prompt_tokens, "cached_tokens": answer.cached_tokens,
                          "completion_tokens": answer.completion_tokens}}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatIn):
        n = max_tokens(body)
        if n >= budget:
            raise HTTPException(413, f"max_tokens={n} leaves no room in this server's context budget of {budget}")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] != "user":
            raise HTTPException(400, "the last message must be the user's")
        ids = await engine.chat_ids(messages, budget, n)
        options, stop = sampling(body)
        made, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        base = {"id": cid, "created": made, "model": model_name}
        if not body.stream:
            answer = await engine.complete(ids, n, options, stop)
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                 "finish_reason": answer.finish_reason}],
                    "usage": usage(answer)}
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def event(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            return f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

        async def events():
            queue = engine.completion_stream(ids, n, options, stop)
            try:
                yield event({"role": "assistant", "content": ""})
                while (item := await queue.get()) is not None:
                    if isinstance(item, Exception):
                        log.error("streamed generation failed", exc_info=item)
                        yield f"data: {json.dumps({'error': {'message': 'internal server error', 'type': 'server_error'}})}\n\n"
                        return
                    if isinstance(item, Answer):
                        yield event({}, item.finish_reason)
                        if include_usage:
                            yield event(None, usage=usage(item))
                    else:
                        yield event({"content": item})
                yield "data: [DONE]\n\n"
            finally:
                queue.cancelled.set()  # a client that left stops the generation at its next token
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


__all__ = ["Limits", "create_app"]
