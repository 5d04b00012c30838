"""The ASGI app: routes shaped like TEI's (and OpenAI's embeddings), limits, timing headers.

    request ─▶ admit (--max-concurrent, else 429) ─▶ body (--payload-limit, else 413) ─▶ JSON
    ─▶ fields ─▶ tokenize (worker thread) ─▶ Job ─▶ batcher ─▶ engine thread ─▶ results ─▶ JSON

Every refusal is an `HttpError`: a 4xx with `{"error": ..., "error_type": ...}`; a bug gives
the same shape with 500 and its traceback in the log. A request whose client goes away while
it waits is cancelled: its sequences still queued are not computed.

`Server` is the ASGI app itself, on the protocol directly: eight fixed routes, a JSON body in
and out, and a lifespan need no framework, and each layer a request passes on its way costs
it after the model run, when the core's caches are cold (a Starlette route in front of the
same handlers: ~0.1 ms more a light-load request, `tools/bench_http_floor.py`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from bertrt.serve.engine import InferenceEngine
from bertrt.serve.http.batcher import Batcher, Job, Reader
from bertrt.serve.http.errors import HttpError
from bertrt.serve.http.metrics import CONTENT_TYPE, ServerMetrics
from bertrt.serve.http.options import ServeOptions
from bertrt.serve.http.service import Encoded, ModelService

log = logging.getLogger("bertrt.serve")

#: The status a request gets when its client went away (nginx's; nobody reads it).
CLIENT_GONE = 499
#: A request whose texts hold at most this many characters in all is tokenized on the event
#: loop (~0.1 ms): handing it to a worker thread and back costs more than that on a busy
#: machine. Longer ones go to the tokenization workers, so the loop never stalls on them.
INLINE_TOKENIZE_CHARS = 2048

#: With streams, a request that finds the engine idle this long runs on the event loop's
#: thread (`Batcher.run_here`): the two thread hops it saves cost most on the cores an idle
#: server let go cold (and the wide backend, left to lone requests, keeps its threads warm).
INLINE_AFTER_MS = 5.0

#: Seconds between the metrics' flushes (`ServerMetrics.flush`; a scrape flushes too).
METRICS_FLUSH_S = 1.0

#: ASGI's receive and send.
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected while its request waited."""


class HttpRequest:
    """An HTTP request as the routes read it: its method, path, headers and body."""

    __slots__ = ("method", "path", "headers", "receive")

    def __init__(self, scope: dict[str, Any], receive: Receive) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        #: (lower-case name, value) pairs as the server received them.
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.receive = receive

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    async def body(self, limit: int) -> bytes:
        """The whole body, of at most `limit` bytes (--payload-limit).

        Raises:
            HttpError: payload_too_large, once the body passes `limit` bytes (or declares it).
            ClientGone: the client disconnected before it sent the whole body.
        """
        declared = self.header(b"content-length") or ""
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> HttpError:
    return HttpError("payload_too_large", f"the body is over this server's limit of {limit} "
                     "bytes (--payload-limit)")


class Reply:
    """A response: status, body and headers (besides its content type and length)."""

    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(self, body: bytes, status: int = 200,
                 headers: list[tuple[bytes, bytes]] | None = None,
                 content_type: bytes = b"application/json") -> None:
        self.status, self.body, self.content_type = status, body, content_type
        self.headers = headers or []

    async def send(self, send: Send, head: bool = False) -> None:
        """Send it; `head`: the headers only (a HEAD request)."""
        headers = [(b"content-type", self.content_type),
                   (b"content-length", str(len(self.body)).encode("latin-1")), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


def json_reply(content: Any, status: int = 200,
               headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    """`content` as JSON by orjson: numpy arrays written directly (float32 as the shortest
    text that reads back to the same float32), several times faster than `json` on
    embeddings."""
    return Reply(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers)


def error_response(error: HttpError) -> Reply:
    return json_reply(error.body(), error.status)


Handler = Callable[[HttpRequest], Awaitable[Reply]]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _texts(body: dict[str, Any], name: str, limit: int) -> tuple[list[str], bool]:
    """The texts of field `name` (a string or a list of strings), and whether it was one."""
    if name not in body:
        raise HttpError("validation", f"missing field {name!r}")
    value = body[name]
    if isinstance(value, str):
        return [value], True
    if not isinstance(value, list):
        raise HttpError("validation", f"{name}: expected a string or a list of strings, got "
                        f"{_json_type(value)}")
    _check_batch(name, value, limit)
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise HttpError("validation", f"{name}[{i}]: expected a string, got "
                            f"{_json_type(text)}")
    return value, False


def _check_batch(name: str, value: list[Any], limit: int) -> None:
    if not value:
        raise HttpError("empty", f"{name}: an empty batch (send at least one input)")
    if len(value) > limit:
        raise HttpError("batch_too_large", f"{name}: {len(value)} inputs, over this server's "
                        f"limit of {limit} per request (--max-client-batch)")


def _pairs(body: dict[str, Any], limit: int
           ) -> tuple[list[str], list[str | None] | None, bool]:
    """/predict's inputs as TEI reads them: "text", ["text", "pair"], or a batch
    [["text"], ["text", "pair"], ...]. Returns texts, pairs (None: no pairs) and whether
    one input was sent."""
    shapes = 'a string, a pair ["text", "pair"], or a batch [["text"], ["text", "pair"], ...]'
    if "inputs" not in body:
        raise HttpError("validation", "missing field 'inputs'")
    value = body["inputs"]
    if isinstance(value, str):
        return [value], None, True
    if not isinstance(value, list):
        raise HttpError("validation", f"inputs: expected {shapes}, got {_json_type(value)}")
    if len(value) == 2 and all(isinstance(v, str) for v in value):
        return [value[0]], [value[1]], True
    if value and not all(isinstance(v, list) for v in value):
        raise HttpError("validation", f"inputs: expected {shapes}")
    _check_batch("inputs", value, limit)
    texts: list[str] = []
    pairs: list[str | None] = []
    for i, item in enumerate(value):
        if not 1 <= len(item) <= 2 or not all(isinstance(v, str) for v in item):
            raise HttpError("validation", f"inputs[{i}]: expected [\"text\"] or [\"text\", "
                            "\"pair\"]")
        texts.append(item[0])
        pairs.append(item[1] if len(item) == 2 else None)
    return texts, (pairs if any(p is not None for p in pairs) else None), False


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HttpError("validation", f"{name}: expected true or false, got {_json_type(value)}")
    return value


async def _wait_gone(receive: Receive) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _resolve(future: asyncio.Future[Job], job: Job) -> None:
    if not future.done():
        future.set_result(job)


class Server:
    """The ASGI app serving one model: its routes, the batcher, the limits, the metrics.

    Args:
        engine: The engine to serve (the caller closes it).
        options: Limits and batcher knobs (`host` and `port` are not read here).
    """

    def __init__(self, engine: InferenceEngine, options: ServeOptions | None = None) -> None:
        self.options = options = options or ServeOptions()
        self.service = ModelService(engine, options.pooling)
        self.metrics = ServerMetrics()
        self.max_batch_tokens = options.max_batch_tokens or engine.max_batch_tokens
        self.batcher: Batcher | None = None
        self.in_flight = 0
        self._pool: ThreadPoolExecutor | None = None
        #: path -> (methods, endpoint)
        self.routes: dict[str, tuple[tuple[str, ...], Handler]] = {
            path: (("POST",), self._endpoint(path, handler)) for path, handler in [
                ("/embed", self.embed), ("/v1/embeddings", self.openai_embeddings),
                ("/predict", self.predict), ("/tag", self.tag), ("/tokenize", self.tokenize)]}
        self.routes.update({
            path: (("GET", "HEAD"), self._endpoint(path, handler, admit=False))
            for path, handler in [("/health", self.health), ("/info", self.info),
                                  ("/metrics", self.metrics_route)]})

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """ASGI: the lifespan, and HTTP requests by path and method."""
        if scope["type"] == "lifespan":
            await self._lifespan_protocol(receive, send)
            return
        if scope["type"] != "http":  # a websocket: refused
            await send({"type": "websocket.close", "code": 1003})
            return
        request = HttpRequest(scope, receive)
        route = self.routes.get(request.path)
        if route is None:
            reply = self._refuse(HttpError("not_found", f"{request.path}: no such route (see "
                                                        "GET /info)"))
        elif request.method not in route[0]:
            reply = self._refuse(HttpError("method_not_allowed", f"{request.method} "
                                           f"{request.path}: method not allowed"))
            reply.headers.append((b"allow", ", ".join(route[0]).encode("latin-1")))
        else:
            reply = await route[1](request)
        await reply.send(send, head=request.method == "HEAD")

    def _refuse(self, error: HttpError) -> Reply:
        self.metrics.request("other", error.status)
        return error_response(error)

    # ------------------------------------------------------------------ life
    async def _lifespan_protocol(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except Exception as exc:
            log.exception("the server's %s failed", "shutdown" if started else "startup")
            await send({"type": f"lifespan.{'shutdown' if started else 'startup'}.failed",
                        "message": f"{type(exc).__name__}: {exc}"})
            return
        await send({"type": "lifespan.shutdown.complete"})

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """The engine's threads and the tokenization workers, running while it is open
        (`__call__` opens it for an ASGI server's lifespan)."""
        self._pool = ThreadPoolExecutor(self.options.tokenization_workers,
                                        thread_name_prefix="bertrt-tokenize")
        streamed = self.service.engine.streams > 1
        self.batcher = Batcher(self.service.run, packed=self.service.engine.packed,
                               max_batch_tokens=self.max_batch_tokens,
                               max_batch_requests=self.options.max_batch_requests,
                               max_wait_ms=self.options.max_wait_ms,
                               max_batch_ms=self.options.max_batch_ms, metrics=self.metrics,
                               narrow=self.service.run_narrow if streamed else None,
                               streams=self.service.engine.streams,
                               inline_after_ms=INLINE_AFTER_MS if streamed else None)
        batcher = self.batcher
        self.metrics.watch(in_flight=lambda: self.in_flight, queued=lambda: batcher.queued)
        flusher = asyncio.create_task(self._flush_metrics())
        try:
            yield
        finally:  # the server has answered every request it accepted by now
            flusher.cancel()
            self.batcher.close()
            self._pool.shutdown(wait=True)
            self.metrics.flush()

    async def _flush_metrics(self) -> None:
        """Apply the metrics' recorded updates every `METRICS_FLUSH_S`, between requests."""
        while True:
            await asyncio.sleep(METRICS_FLUSH_S)
            self.metrics.flush()

    # ------------------------------------------------------------------ plumbing
    def _endpoint(self, route: str, handler: Handler, admit: bool = True) -> Handler:
        """`handler` with admission (429 past --max-concurrent), errors as JSON, metrics."""

        async def endpoint(request: HttpRequest) -> Reply:
            admitted = False
            try:
                if admit:
                    if self.in_flight >= self.options.max_concurrent:
                        raise HttpError("overloaded", f"{self.in_flight} requests in flight, "
                                        f"this server's limit (--max-concurrent "
                                        f"{self.options.max_concurrent}); retry later")
                    self.in_flight += 1
                    admitted = True
                response = await handler(request)
            except HttpError as exc:
                response = error_response(exc)
            except ClientGone:
                response = Reply(b"", CLIENT_GONE)
            except Exception as exc:  # a bug: answer in the same shape, keep the trace
                log.exception("%s failed", route)
                response = error_response(HttpError(
                    "internal", f"{route}: {type(exc).__name__}: {exc}"))
            finally:
                if admitted:
                    self.in_flight -= 1
            self.metrics.request(route, response.status)
            return response

        return endpoint

    async def _body(self, request: HttpRequest) -> dict[str, Any]:
        """The JSON object of the body, read up to --payload-limit bytes."""
        raw = await request.body(self.options.payload_limit)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:  # invalid UTF-8 too
            raise HttpError("invalid_json", f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise HttpError("validation", f"the body must be a JSON object, got "
                            f"{_json_type(body)}")
        return body

    async def _in_worker(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._pool is None:
            raise HttpError("unavailable", "the server's workers are not running (its lifespan "
                            "has not started)")
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: fn(*args, **kwargs))

    async def _encode(self, texts: list[str], pairs: list[str | None] | None, body: dict,
                      offsets: bool = False) -> tuple[Encoded, float]:
        truncate = _flag(body, "truncate", self.options.auto_truncate)
        start = time.perf_counter()
        if sum(map(len, texts)) + sum(len(p or "") for p in pairs or ()) <= INLINE_TOKENIZE_CHARS:
            encoded = self.service.encode(texts, pairs, truncate=truncate, offsets=offsets)
        else:
            encoded = await self._in_worker(self.service.encode, texts, pairs,
                                            truncate=truncate, offsets=offsets)
        self.metrics.tokenized(encoded.tokens, encoded.truncated)
        return encoded, time.perf_counter() - start

    async def _infer(self, request: HttpRequest, encoded: Encoded, read: Reader) -> Job:
        """Queue the request's sequences and wait for them (or for the client to leave)."""
        if self.batcher is None or not self.batcher.alive:
            raise HttpError("unavailable", "the engine is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Job] = loop.create_future()
        here = threading.get_ident()

        def done(job: Job) -> None:  # on the finisher thread, or here (`run_here`)
            if threading.get_ident() == here:
                _resolve(future, job)
                return
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_resolve, future, job)

        job = Job(encoded.requests, read, done)
        if not self.batcher.run_here(job):  # an idle engine runs it here, at once
            self.batcher.submit(job)
            gone = asyncio.ensure_future(_wait_gone(request.receive))
            try:
                await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                self.batcher.cancel(job)
                raise
            finally:
                gone.cancel()
            if not future.done():
                self.batcher.cancel(job)
                raise ClientGone
        if job.error is not None:
            raise job.error
        return job

    def _respond(self, content: Any, start: float, tokenize_s: float, job: Job | None,
                 tokens: int, characters: int) -> Reply:
        """The result, with per-stage times (milliseconds) and counts in the headers."""
        queue_s = job.queue_s if job else 0.0
        inference_s = job.inference_s if job else 0.0
        total_s = time.perf_counter() - start
        ran = {"queue": queue_s, "inference": inference_s} if job is not None else {}
        self.metrics.observe_stages(tokenize=tokenize_s, total=total_s, **ran)
        headers = [(b"x-compute-type", self.service.engine.backend_name.encode("latin-1")),
                   (b"x-compute-tokens", b"%d" % tokens),
                   (b"x-compute-characters", b"%d" % characters),
                   (b"x-tokenization-time", b"%.3f" % (tokenize_s * 1e3)),
                   (b"x-queue-time", b"%.3f" % (queue_s * 1e3)),
                   (b"x-inference-time", b"%.3f" % (inference_s * 1e3)),
                   (b"x-total-time", b"%.3f" % (total_s * 1e3)),
                   (b"x-batches", b"%d" % (job.batches if job else 0))]
        return json_reply(content, headers=headers)

    # ------------------------------------------------------------------ routes
    async def embed(self, request: HttpRequest) -> Reply:
        """TEI's /embed: `inputs` (str | [str]), `normalize` (default true), `truncate`
        -> [[float]]."""
        start = time.perf_counter()
        self.service.require("/embed")
        body = await self._body(request)
        texts, _ = _texts(body, "inputs", self.options.max_client_batch)
        normalize = _flag(body, "normalize", True)
        encoded, tokenize_s = await self._encode(texts, None, body)
        job = await self._infer(request, encoded, self.service.read_pooled)
        vectors = self.service.embeddings(job.results, normalize)
        return self._respond(vectors, start, tokenize_s, job, encoded.tokens,
                             sum(map(len, texts)))

    async def openai_embeddings(self, request: HttpRequest) -> Reply:
        """OpenAI's embeddings: `input` (str | [str]), `model`, `encoding_format`
        (float | base64) -> {"object": "list", "data": [...], "model", "usage"}."""
        start = time.perf_counter()
        self.service.require("/v1/embeddings")
        body = await self._body(request)
        texts, _ = _texts(body, "input", self.options.max_client_batch)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise HttpError("validation", f"encoding_format: expected \"float\" or "
                            f"\"base64\", got {encoding!r}")
        hidden = self.service.engine.hidden_size
        if body.get("dimensions") not in (None, hidden):
            raise HttpError("validation", f"dimensions: this model gives {hidden}, got "
                            f"{body['dimensions']!r}")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise HttpError("validation", f"model: expected a string, got {_json_type(model)}")
        encoded, tokenize_s = await self._encode(texts, None, {})
        job = await self._infer(request, encoded, self.service.read_pooled)
        vectors = self.service.embeddings(job.results, normalize=True)
        if encoding == "base64":  # little-endian float32, as OpenAI's clients decode it
            values: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                                 for v in vectors]
        else:
            values = list(vectors)
        data = [{"object": "embedding", "index": i, "embedding": v}
                for i, v in enumerate(values)]
        usage = {"prompt_tokens": encoded.tokens, "total_tokens": encoded.tokens}
        content = {"object": "list", "data": data,
                   "model": model or self.service.engine.source, "usage": usage}
        return self._respond(content, start, tokenize_s, job, encoded.tokens,
                             sum(map(len, texts)))

    async def predict(self, request: HttpRequest) -> Reply:
        """TEI's /predict: a text, a pair, or a batch of either; `raw_scores`, `truncate` ->
        every label's {label, score}, best first (a batch: one such list per input)."""
        start = time.perf_counter()
        self.service.require("/predict")
        body = await self._body(request)
        texts, pairs, single = _pairs(body, self.options.max_client_batch)
        raw = _flag(body, "raw_scores", False)
        encoded, tokenize_s = await self._encode(texts, pairs, body)
        job = await self._infer(request, encoded, self.service.read_logits)
        scores = self.service.scores(job.results, raw)
        characters = sum(map(len, texts)) + sum(len(p or "") for p in pairs or ())
        return self._respond(scores[0] if single else scores, start, tokenize_s, job,
                             encoded.tokens, characters)

    async def tag(self, request: HttpRequest) -> Reply:
        """/tag: `inputs` (str | [str]), `truncate` -> per text its entities {entity,
        start, end, text, score} with character offsets (a string: one list)."""
        start = time.perf_counter()
        self.service.require("/tag")
        body = await self._body(request)
        texts, single = _texts(body, "inputs", self.options.max_client_batch)
        encoded, tokenize_s = await self._encode(texts, None, body, offsets=True)
        job = await self._infer(request, encoded, self.service.read_token_logits)
        found = self.service.entities(job.results, encoded, texts)
        return self._respond(found[0] if single else found, start, tokenize_s, job, encoded.tokens,
                             sum(map(len, texts)))

    async def tokenize(self, request: HttpRequest) -> Reply:
        """TEI's /tokenize: `inputs` (str | [str]), `add_special_tokens` (default true) ->
        per text [{id, text, special, start, stop}]."""
        start = time.perf_counter()
        body = await self._body(request)
        texts, _ = _texts(body, "inputs", self.options.max_client_batch)
        special = _flag(body, "add_special_tokens", True)
        tokens = await self._in_worker(self.service.tokens, texts, special)
        tokenize_s = time.perf_counter() - start
        return self._respond(tokens, start, tokenize_s, None, sum(map(len, tokens)),
                             sum(map(len, texts)))

    async def health(self, request: HttpRequest) -> Reply:
        if self.batcher is None or not self.batcher.alive:
            raise HttpError("unavailable", "the engine is not running")
        return json_reply({"status": "ok"})

    async def info(self, request: HttpRequest) -> Reply:
        from importlib.metadata import PackageNotFoundError, version

        try:
            bertrt_version = version("bertrt")
        except PackageNotFoundError:  # a source tree
            bertrt_version = "unknown"
        limits = {"max_batch_tokens": self.max_batch_tokens,
                  "max_batch_requests": self.options.max_batch_requests,
                  "max_batch_ms": self.options.max_batch_ms,
                  "streams": self.service.engine.streams,
                  "max_wait_ms": self.options.max_wait_ms,
                  "max_concurrent_requests": self.options.max_concurrent,
                  "max_client_batch_size": self.options.max_client_batch,
                  "payload_limit": self.options.payload_limit,
                  "auto_truncate": self.options.auto_truncate,
                  "tokenization_workers": self.options.tokenization_workers}
        return json_reply({**self.service.info(), **limits, "version": bertrt_version})

    async def metrics_route(self, request: HttpRequest) -> Reply:
        return Reply(self.metrics.exposition(), content_type=CONTENT_TYPE.encode("latin-1"))


def create_app(engine: InferenceEngine, options: ServeOptions | None = None) -> Server:
    """The ASGI app serving `engine` (its batcher starts and stops with the app's lifespan).

    >>> app = create_app(InferenceEngine("model-dir", threads=2))
    >>> # uvicorn.run(app, host="127.0.0.1", port=8080), or bertrt.serve.http.serve(...)
    """
    return Server(engine, options)
