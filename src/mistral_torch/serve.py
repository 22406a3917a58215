"""An OpenAI-compatible HTTP server with continuous batching, and a chat page.

    mistral-torch serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...

    POST /v1/completions        text completion (prompt: text, ids, or a list of them)
    POST /v1/chat/completions   chat through the instruct template (`Tokenizer.encode_chat`)
    GET  /v1/models             the one model served
    GET  /health                liveness, running and queued requests (no API key needed)
    GET  /                      a chat page (static/index.html: plain HTML + JS, no build step)

Both POST routes stream server-sent events in OpenAI's chunk format, ending with `data: [DONE]`,
when the request says `"stream": true`.

Two halves, joined by one thread-safe queue:

    Engine   one thread that owns the model. Every iteration it (1) drops the rows that
             finished or whose client went away, (2) decodes one token for every running row as
             one batch, (3) admits waiting requests into the free rows. Requests therefore join
             the running batch at the next step and leave it as soon as they finish
             (continuous batching). The waiting queue is bounded: `submit` refuses at once
             (429 when full, 503 when shutting down) instead of letting a client hang.
    App      FastAPI routes: validate the request, turn it into `Job`s, submit them, and relay
             the engine's events to the client as JSON or server-sent events. A client that
             disconnects cancels its jobs; the engine frees their rows before its next step.

The batch design (exact: a row's greedy tokens equal those of its prompt decoded alone)
--------------------------------------------------------------------------------------
The running batch is one `RollingKVCache` with one row per request. Each row keeps its own
absolute positions (`next_pos`, `slot_pos`), so rows of different lengths decode together as
one (B, 1) step: each query sees only its own row's keys, through the cache's mask.

Joining: the newcomers are prefilled together in a fresh cache of their own (left-padded, the
padding at position -1 is never stored nor attended), exactly as `TokenGenerator` prefills a
batch. Their cache rows are then appended to the running cache (`RollingKVCache.append_rows`).
That is exact because a row's slots depend only on that row: with a sliding window both caches
hold `window` slots written at `pos % window`; without one a cache never wraps (slot =
position), so the smaller cache is padded with empty slots (-1) to the larger capacity first.
Leaving: the rows that remain are selected (`RollingKVCache.select_rows`), as `TokenGenerator`
drops rows.

Sampling is per row: greedy rows share one argmax; a sampling row uses its own
`GenerationConfig` and its own `torch.Generator` seeded from the request's `seed`, so a seeded
request gives the same text whatever else runs beside it.
"""

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Literal, Sequence, Union

import torch

from .cache import RollingKVCache
from .generate import GenerationConfig, StopStrings, context_limit, sample_next
from .model import Transformer

if TYPE_CHECKING:
    from .tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("mistral_torch.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024


# ================================================================ engine: events and jobs
@dataclass
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New text of choice `index` (possibly "" while held back) and the token(s) behind it."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Done:
    """Choice `index` finished: finish_reason is "stop" (EOS or a stop string) or "length"."""

    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """Choice `index` could not be completed (engine error or shutdown)."""

    index: int
    message: str
    status: int = 500


Event = Union[Delta, Done, Failed]


@dataclass(eq=False)
class Job:
    """One prompt to complete, and where its events go.

    prompt:   token ids (BOS and chat template already applied).
    config:   sampling and stopping (max_new_tokens, temperature, top_p, stop, seed, ...).
    emit:     called from the engine thread with each `Event` of this job.
    context:  ids the detokenizer continues from (a text prompt's ids; [] for a fresh reply).
    logprobs: None for no logprobs, else how many alternatives to report per token.
    """

    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    index: int = 0
    context: Sequence[int] = ()
    logprobs: int | None = None
    cancelled: bool = False  # set by the client side; the engine drops the job before its next step


class ServerBusy(Exception):
    """A job that cannot be admitted: the queue is full (429) or the server is stopping (503)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Row:
    """Decoding state of one running job (one row of the batch)."""

    def __init__(self, job: Job, tokenizer: "Tokenizer", limit: int, device: torch.device, vocab: int) -> None:
        cfg = job.config
        self.job = job
        self.max_new = min(cfg.max_new_tokens, limit - len(job.prompt))
        self.stop_ids = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else {tokenizer.eos_id})
        self.decoder: StreamDecoder = tokenizer.stream_decoder(job.context)
        self.stopper = StopStrings(cfg.stop)
        self.n_out = 0
        self.finished = False
        self.generator: torch.Generator | None = None
        if cfg.temperature > 0:
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seen: torch.Tensor | None = None  # (1, V) for the repetition penalty only
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(job.prompt, device=device)] = True

    @property
    def greedy(self) -> bool:
        return self.generator is None and self.seen is None


# ---------------------------------------------------------------- the engine
class Engine:
    """Continuous batching over one model: see the module docstring.

    Use it from a server (`start()` runs `step()` in a thread until `stop()`) or drive it by
    hand in tests: `submit(jobs)`, then `step()` until `idle`.
    """

    def __init__(self, model: Transformer, tokenizer: "Tokenizer", max_batch_size: int = 16,
                 max_queue: int = 64, prefill_chunk: int = 512) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size} and {max_queue}")
        if model.args.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.args.vocab_size}: they do not belong together")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.limit = context_limit(model)
        self.device = model.device
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.rows: list[_Row] = []
        self._admitting: list[Job] = []  # taken from the queue, being prefilled (not yet rows)
        self._cache: RollingKVCache | None = None
        self._last: torch.Tensor | None = None  # (rows,) last token of each row
        self._anchor = tokenizer.encode("a", bos=False)[-1:]  # decoded before a token to keep its leading space
        self._anchor_text = tokenizer.decode(self._anchor)
        self.steps = 0  # decode/prefill iterations run (for tests and /health)

    # ------------------------------------------------------------ client side (any thread)
    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` (all or none); raises `ServerBusy` at once when they cannot wait."""
        with self._cond:
            if self._stopping:
                raise ServerBusy("the server is shutting down", 503)
            self._pending = deque(j for j in self._pending if not j.cancelled)
            running = self._running()
            waiting = len(self._pending) + len(jobs) - (self.max_batch_size - running)  # jobs left without a row
            if waiting > self.max_queue:
                raise ServerBusy(f"server busy: {running} requests running and {len(self._pending)} "
                                 f"waiting (max batch size {self.max_batch_size}, queue {self.max_queue}); "
                                 "retry later", 429)
            self._pending.extend(jobs)
            self._cond.notify()

    @property
    def idle(self) -> bool:
        return not self.rows and not self._pending and not self._admitting

    def _running(self) -> int:
        """Rows in use (call with the lock held): running rows, and jobs being admitted."""
        return (sum(not r.finished and not r.job.cancelled for r in self.rows)
                + sum(not j.cancelled for j in self._admitting))

    def counts(self) -> tuple[int, int]:
        """(running rows, waiting jobs)."""
        with self._cond:
            return self._running(), sum(not j.cancelled for j in self._pending)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="mistral-torch-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; jobs still waiting or running get `Failed` (503)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all("the server is shutting down", 503)

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.rows and not self._pending:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # keep serving: fail what was running, start afresh
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}", 500)

    def _fail_all(self, message: str, status: int) -> None:
        with self._cond:
            jobs = [r.job for r in self.rows if not r.finished] + self._admitting + list(self._pending)
            self._pending.clear()
            self._admitting = []
            self.rows, self._cache, self._last = [], None, None
        for job in jobs:
            job.emit(Failed(job.index, message, status))

    def step(self) -> None:
        """One iteration: drop finished rows, decode one token for the batch, admit waiting jobs."""
        with torch.inference_mode():
            self._drop_finished()
            with self._cond:
                new = []
                while self._pending and len(self.rows) + len(new) < self.max_batch_size:
                    job = self._pending.popleft()
                    if not job.cancelled:
                        new.append(job)
                self._admitting = new
            if self.rows:
                logits, self._cache = self.model(self._last[:, None], cache=self._cache)
                self._last = self._sample_and_emit(self.rows, logits[:, -1])
            if new:
                self._admit(new)
            self.steps += 1

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finished and not r.job.cancelled]
        if len(keep) == len(self.rows):
            return
        with self._cond:
            if not keep:
                self.rows, self._cache, self._last = [], None, None
                return
            idx = torch.tensor(keep, device=self.device)
            self._cache.select_rows(idx)
            self._last = self._last.index_select(0, idx)
            self.rows = [self.rows[i] for i in keep]

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together in a cache of their own, sample their first tokens, join the batch."""
        model = self.model
        rows = [_Row(j, self.tokenizer, self.limit, self.device, model.args.vocab_size) for j in jobs]
        B, T = len(jobs), max(len(j.prompt) for j in jobs)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.full((B, T), -1, dtype=torch.long)  # -1: padding, never stored or attended
        for b, j in enumerate(jobs):
            tokens[b, T - len(j.prompt):] = torch.tensor(j.prompt)
            positions[b, T - len(j.prompt):] = torch.arange(len(j.prompt))
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        capacity = None  # a window's worth of slots; without a window, just what these rows need
        if model.args.sliding_window is None:
            capacity = max(len(j.prompt) + r.max_new for j, r in zip(jobs, rows))
        cache = model.new_cache(B, capacity=capacity)
        for s in range(0, T, self.prefill_chunk):  # the model chunks further, by the window
            logits, cache = model(tokens[:, s:s + self.prefill_chunk], cache=cache,
                                  positions=positions[:, s:s + self.prefill_chunk], last_logits_only=True)
        first = self._sample_and_emit(rows, logits[:, -1])
        with self._cond:
            if self._cache is None:
                self._cache, self._last = cache, first
            else:
                self._cache.append_rows(cache)
                self._last = torch.cat([self._last, first])
            self.rows = self.rows + rows
            self._admitting = []

    def _sample_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Next token of every row (B,) from last-position logits (B, V); emit their events."""
        logits = logits.float()  # once, for the argmax (~5x slower over bf16 on CPU) and the logprobs
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if not row.greedy:
                gens = [row.generator] if row.generator is not None else None
                tokens[i] = sample_next(logits[i:i + 1], row.job.config, row.seen, gens)[0]
            if row.seen is not None:
                row.seen[0, tokens[i]] = True
        logprobs = None
        if any(r.job.logprobs is not None for r in rows):
            logprobs = torch.log_softmax(logits, dim=-1)
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if not row.job.cancelled:
                self._emit(row, token, None if logprobs is None else logprobs[i])
        return tokens

    def _emit(self, row: _Row, token: int, logprobs: torch.Tensor | None) -> None:
        """Detokenize, apply stop rules, and send this row's new text (as `stream_batch` does)."""
        job = row.job
        row.n_out += 1
        reason = "stop" if token in row.stop_ids else "length" if row.n_out >= row.max_new else None
        text = "" if reason == "stop" else row.decoder.add(token)  # a stopping token adds no text
        if reason is not None:
            text += row.decoder.flush()
        piece, hit = row.stopper.feed(text)
        if hit:
            reason = "stop"
        elif reason is not None:
            piece += row.stopper.flush()
        info = None
        if job.logprobs is not None and logprobs is not None:
            info = [self._token_logprob(token, logprobs, job.logprobs)]
        job.emit(Delta(job.index, piece, [token], info))
        if reason is not None:
            row.finished = True
            job.emit(Done(job.index, reason, len(job.prompt), row.n_out))

    def _token_text(self, token: int) -> str:
        """A token's text with its leading space (decoded after an anchor token, then cut)."""
        return self.tokenizer.decode(self._anchor + [token])[len(self._anchor_text):]

    def _token_logprob(self, token: int, logprobs: torch.Tensor, k: int) -> TokenLogprob:
        top = []
        if k > 0:
            values, ids = logprobs.topk(k)
            top = [(self._token_text(t), v) for t, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(self._token_text(token), float(logprobs[token]), top)


# ================================================================ HTTP: errors and limits
class APIError(Exception):
    """An error answered as OpenAI's error JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    e = APIError(status, message, param, code, type)
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


class _Guard:
    """ASGI middleware in front of every route: API key (401) and request body size (413).

    The body is read here, up to `max_body_bytes`, and replayed to the app, so an oversized
    body is refused whether or not it declares its Content-Length.
    """

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await _send_json(send, 401, error_body(
                    401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"),
                    {"www-authenticate": "Bearer"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = error_body(413, f"request body is larger than the limit of {self.max_body_bytes} bytes",
                               code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _send_json(send, 413, too_large, {"connection": "close"})
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _send_json(send, 413, too_large, {"connection": "close"})
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as usual

        await self.app(scope, replay, send)


async def _send_json(send: Callable, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# ================================================================ HTTP: request bodies
def _request_models() -> tuple[type, type]:
    """The pydantic request models (built on first use: pydantic is a `serve` dependency)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Options(BaseModel):
        model_config = ConfigDict(extra="allow")  # unknown fields are accepted and ignored

        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        n: int = Field(1, ge=1)
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        user: str | None = None
        # extensions (as in vLLM / llama.cpp): GenerationConfig's other samplers
        top_k: int = Field(0, ge=0)
        min_p: float = Field(0.0, ge=0, le=1)
        repetition_penalty: float = Field(1.0, gt=0)
        ignore_eos: bool = False

    class CompletionRequest(Options):
        prompt: Union[str, list[str], list[int], list[list[int]]]
        logprobs: int | None = Field(None, ge=0, le=5)
        echo: bool = False
        suffix: str | None = None

    class Part(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant"]
        content: Union[str, list[Part]]

    class ChatRequest(Options):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20)

    return CompletionRequest, ChatRequest


# ================================================================ HTTP: the app
class _Relay:
    """The async side of one request's jobs: the engine thread's events arrive on a queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue, self.jobs = loop, asyncio.Queue(), []

    def emit(self, event: Event) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """Every event of every job until all are done; leaving early cancels the jobs."""
        remaining = len(self.jobs)
        try:
            while remaining:
                event = await self.queue.get()
                if isinstance(event, (Done, Failed)):
                    remaining -= 1
                yield event
        finally:
            self.cancel()


def create_app(model: Transformer, tokenizer: "Tokenizer", model_name: str = "mistral-torch", *,
               api_key: str | None = None, max_batch_size: int = 16, max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, engine: Engine | None = None) -> Any:
    """The ASGI app (FastAPI behind the API-key / body-size guard) serving `model`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    CompletionRequest, ChatRequest = _request_models()
    engine = engine or Engine(model, tokenizer, max_batch_size, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mistral-torch", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code, exc.type), exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    # ------------------------------------------------------------ helpers
    async def parse(request: Request, cls: type) -> Any:
        """The request body as `cls`; 400 with the first problem (and its field as `param`) if not."""
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = [str(p) for p in first["loc"]]
            param = loc[0] if loc else None  # the top-level field, as OpenAI names it
            message = f"{'.'.join(loc)}: {first['msg']}" if loc else first["msg"]
            raise APIError(400, message, param, code="invalid_value") from None

    def options(req: Any, max_tokens: int | None, default_max: int | None) -> GenerationConfig:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", name)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            config = GenerationConfig(
                max_new_tokens=max_tokens or default_max or engine.limit, temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                stop=[s for s in stop if s], seed=None if req.seed is None else req.seed % 2**63,
                ignore_eos=req.ignore_eos)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return config

    def check_prompt(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        if len(ids) >= engine.limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens long, but this model's context is "
                                f"{engine.limit} tokens (max_seq_len; the prompt plus at least one new "
                                "token must fit)", param, code="context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", param)

    def submit(relay: _Relay, prompts: list[tuple[list[int], list[int]]], config: GenerationConfig,
               logprobs: int | None) -> None:
        relay.jobs = [Job(ids, config, relay.emit, i, ctx, logprobs) for i, (ids, ctx) in enumerate(prompts)]
        try:
            engine.submit(relay.jobs)
        except ServerBusy as exc:
            raise APIError(exc.status, str(exc), code="server_busy",
                           type="rate_limit_error" if exc.status == 429 else "server_error") from None

    async def collect(request: Request, relay: _Relay) -> list[list[Event]] | None:
        """All events per choice, or None when the client went away first (its jobs are cancelled)."""
        per_choice: list[list[Event]] = [[] for _ in relay.jobs]

        async def gather() -> None:
            async for event in relay.events():
                per_choice[event.index].append(event)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                relay.cancel()
        if not work.done() or work.cancelled():
            return None
        work.result()
        for events in per_choice:
            failed = [e for e in events if isinstance(e, Failed)]
            if failed:
                raise APIError(failed[0].status, failed[0].message)
        return per_choice

    def usage(dones: list[Done]) -> dict[str, int]:
        p, c = sum(d.prompt_tokens for d in dones), sum(d.completion_tokens for d in dones)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def completion_logprobs(items: list[TokenLogprob], start: int = 0) -> dict[str, list]:
        offsets, at = [], start
        for t in items:
            offsets.append(at)
            at += len(t.token)
        return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [dict(t.top) for t in items], "text_offset": offsets}

    def chat_logprobs(items: list[TokenLogprob]) -> dict[str, list]:
        entry = lambda tok, lp: {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}  # noqa: E731
        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, b) for a, b in t.top]}
                            for t in items]}

    def stream_response(relay: _Relay, chunks: Callable[[Event], list[dict]],
                        tail: Callable[[list[Done]], list[dict]], head: Sequence[dict] = ()) -> StreamingResponse:
        """Server-sent events: `head`, the chunks of every event, `tail` (usage), then [DONE]."""
        async def body() -> AsyncIterator[str]:
            dones: list[Done] = []
            for chunk in head:
                yield sse(chunk)
            async for event in relay.events():
                if isinstance(event, Failed):
                    yield sse(error_body(event.status, event.message))
                    break
                if isinstance(event, Done):
                    dones.append(event)
                for chunk in chunks(event):
                    yield sse(chunk)
            else:
                for chunk in tail(dones):
                    yield sse(chunk)
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    def include_usage(req: Any) -> bool:
        return bool((req.stream_options or {}).get("include_usage"))

    # ------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        running, waiting = engine.counts()
        status = 503 if engine._stopping else 200
        return JSONResponse({"status": "ok" if status == 200 else "shutting down", "model": model_name,
                             "running": running, "waiting": waiting, "max_batch_size": engine.max_batch_size,
                             "max_queue": engine.max_queue, "context_length": engine.limit}, status)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mistral-torch",
                "max_model_len": engine.limit}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           "model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await parse(request, CompletionRequest)
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        raw = req.prompt
        items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items:
            raise APIError(400, "the prompt is empty", "prompt")
        prompts = []
        for item in items:  # text gets BOS and is decoded as its continuation; ids are used as given
            ids = tokenizer.encode(item, bos=True) if isinstance(item, str) and item else list(item)
            check_prompt(ids, "prompt")
            prompts.append((ids, ids if isinstance(item, str) else []))
        config = options(req, req.max_tokens, 16)  # OpenAI's default max_tokens for completions
        relay = _Relay(asyncio.get_running_loop())
        submit(relay, prompts, config, req.logprobs)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, **extra}

        if req.stream:
            offsets = [0] * len(prompts)

            def chunks(event: Event) -> list[dict]:
                if isinstance(event, Delta):
                    if not event.text and not event.logprobs:
                        return []  # text held back (an incomplete character or a possible stop string)
                    lp = completion_logprobs(event.logprobs, offsets[event.index]) if event.logprobs else None
                    offsets[event.index] += sum(len(t.token) for t in event.logprobs or [])
                    return [chunk([{"text": event.text, "index": event.index, "logprobs": lp, "finish_reason": None}])]
                return [chunk([{"text": "", "index": event.index, "logprobs": None,
                                "finish_reason": event.finish_reason}])]

            def tail(dones: list[Done]) -> list[dict]:
                return [chunk([], usage=usage(dones))] if include_usage(req) else []

            return stream_response(relay, chunks, tail)
        per_choice = await collect(request, relay)
        if per_choice is None:
            return JSONResponse({}, 499)
        choices, dones = [], []
        for i, events in enumerate(per_choice):
            deltas = [e for e in events if isinstance(e, Delta)]
            done = next(e for e in events if isinstance(e, Done))
            dones.append(done)
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs([t for d in deltas for t in d.logprobs or []])
            choices.append({"text": "".join(d.text for d in deltas), "index": i, "logprobs": lp,
                            "finish_reason": done.finish_reason})
        return chunk(choices, usage=usage(dones))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = await parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in req.messages]
        try:
            ids = tokenizer.encode_chat(messages)
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        check_prompt(ids, "messages")
        config = options(req, req.max_completion_tokens or req.max_tokens, None)
        relay = _Relay(asyncio.get_running_loop())
        submit(relay, [(ids, [])], config, (req.top_logprobs or 0) if req.logprobs else None)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(obj: str, choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices, **extra}

        if req.stream:
            def chunks(event: Event) -> list[dict]:
                out = []
                if isinstance(event, Delta):
                    if not event.text and not event.logprobs:
                        return []
                    lp = chat_logprobs(event.logprobs) if event.logprobs else None
                    out.append({"index": 0, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None})
                else:
                    out.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason})
                return [chunk("chat.completion.chunk", [c]) for c in out]

            def tail(dones: list[Done]) -> list[dict]:
                return [chunk("chat.completion.chunk", [], usage=usage(dones))] if include_usage(req) else []

            role = chunk("chat.completion.chunk", [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}])
            return stream_response(relay, chunks, tail, head=[role])  # OpenAI's first chunk names the role
        per_choice = await collect(request, relay)
        if per_choice is None:
            return JSONResponse({}, 499)
        events = per_choice[0]
        deltas = [e for e in events if isinstance(e, Delta)]
        done = next(e for e in events if isinstance(e, Done))
        lp = chat_logprobs([t for d in deltas for t in d.logprobs or []]) if req.logprobs else None
        message = {"role": "assistant", "content": "".join(d.text for d in deltas)}
        return chunk("chat.completion", [{"index": 0, "message": message, "logprobs": lp,
                                          "finish_reason": done.finish_reason}], usage=usage([done]))

    return _Guard(app, api_key, max_body_bytes)


# ================================================================ running it
def serve(model: Transformer, tokenizer: "Tokenizer", model_name: str = "mistral-torch", host: str = "127.0.0.1",
          port: int = 8000, *, api_key: str | None = None, max_batch_size: int = 16, max_queue: int = 64,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_timeout: float = 30.0,
          access_log: bool = False) -> None:
    """Serve until SIGINT/SIGTERM. Shutdown is graceful: no new connections are accepted, requests
    in flight finish (for at most `shutdown_timeout` seconds), then the engine stops."""
    import uvicorn

    app = create_app(model, tokenizer, model_name, api_key=api_key, max_batch_size=max_batch_size,
                     max_queue=max_queue, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler found at
        # start: make that one a no-op, so a graceful stop exits with status 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
