"""serve: the exported student behind an OpenAI-compatible HTTP API.

    POST /v1/chat/completions   messages, max_tokens, temperature (0 = greedy), stream (SSE, ends `data: [DONE]`)
    POST /v1/completions        prompt (one string), same options
    GET  /v1/models             the one model, named `serve.model_name`
    GET  /health                liveness and batching counters (no key needed)

How a request flows: the handler checks the key, the JSON and the limits, renders the prompt with the same chat
template as training (`records.encode_prompt`) and puts a `_Job` on the batcher's queue. One worker thread takes
whatever arrived within `serve.batch_window_ms` (up to `serve.max_batch_size`) and decodes it as one left-padded
`model.generate` call (KV cache on), so concurrent requests share forward passes. Per-row temperatures, per-row
token limits and per-row streaming are small hooks into that one call (`_RowTemperature`, `_RowControl`). Tokens
flow back to the event loop through an asyncio queue per job.

Safety: API keys (Bearer) are required unless `no_auth`, which is refused unless the server binds to loopback;
only the sha256 of each key is stored (`serve/api_keys.json`). Every completion request is logged to
`serve/requests.jsonl` with its text passed through `stillhouse.pii.mask` first: raw inputs are never written.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`request: Request`)
# at run time, and Request is imported inside create_app, where the string form could not be resolved.
import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import queue
import secrets
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stillhouse.config import Config
from stillhouse.errors import GateError, StillhouseError
from stillhouse.records import encode_prompt, end_of_turn_id
from stillhouse.workspace import StageRun, atomic_write_json, stage_dir

NEW_KEY_COMMAND = "stillhouse serve --new-key"
# Request fields we do not implement. Refusing them is more honest than silently ignoring them: a client that
# sends `stop` or `tools` would otherwise get answers that look right and are not.
_UNSUPPORTED = ("stop", "tools", "functions", "logprobs", "top_logprobs", "echo", "suffix")


# ------------------------------------------------------------------------------------------------- API keys


def _keys_path(cfg: Config) -> Path:
    return stage_dir(cfg.workspace, "serve") / "api_keys.json"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _key_entries(cfg: Config) -> list[dict]:
    path = _keys_path(cfg)
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["keys"]
        if not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries):
            raise TypeError
        return entries
    except (ValueError, KeyError, TypeError):
        raise StillhouseError(
            f'{path}: not a stillhouse key file ({{"keys": [{{"sha256": ...}}]}}); delete it and create a key with `{NEW_KEY_COMMAND}`'
        ) from None


def load_api_key_hashes(cfg: Config) -> list[str]:
    """The sha256 of every key in `serve/api_keys.json` ([] when there is none yet)."""
    return [e["sha256"] for e in _key_entries(cfg)]


def new_api_key(cfg: Config) -> str:
    """Create an API key, store only its sha256 in `serve/api_keys.json`, and return the key (shown once)."""
    key = "sh-" + secrets.token_urlsafe(32)  # 256 random bits
    entries = _key_entries(cfg) + [{"sha256": _sha256(key), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    path = _keys_path(cfg)
    atomic_write_json(path, {"keys": entries})
    path.chmod(0o600)  # hashes are not secrets, but nobody else needs to read or edit this file
    return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _export_model_dir(cfg: Config) -> Path:
    model_dir = stage_dir(cfg.workspace, "export") / "model"
    if not (model_dir / "config.json").exists():
        raise StillhouseError(f"{model_dir} not found; run `stillhouse -w {cfg.workspace} export` first")
    return model_dir


# -------------------------------------------------------------------------------------------------- batcher


class _Job:
    """One request's generation. The worker thread fills it; the event loop reads `events`:
    ("token", id) ..., then exactly one ("end", finish_reason) or ("error", message)."""

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, on_done):
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.on_done = on_done  # frees the request's concurrency slot, on the event loop
        self.cancelled = False  # set by the HTTP side when the client went away: the row stops early
        self.tokens: list[int] = []  # written by the worker only
        self.finish_reason: str | None = None

    def _send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is gone (server shut down): nobody is listening

    def add_token(self, token_id: int) -> None:
        self.tokens.append(token_id)
        self._send("token", token_id)

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self._send(*(("error", error) if error else ("end", reason)))
        try:
            self.loop.call_soon_threadsafe(self.on_done)
        except RuntimeError:
            pass

    async def iter_events(self):
        while True:
            event = await self.events.get()
            yield event
            if event[0] != "token":
                return


class _RowControl:
    """Per-row bookkeeping inside one batched `model.generate` call. It is both the streamer (generate hands it
    the prompt, then one new token per row per step) and a stopping criterion (which rows are done)."""

    def __init__(self, jobs: list[_Job], prompt_width: int, stop_ids: set[int]):
        self.jobs = jobs
        self.prompt_width = prompt_width
        self.stop_ids = stop_ids

    # streamer interface
    def put(self, value) -> None:
        if value.dim() == 2:
            return  # the prompt (B, T), sent once before the first step
        for job, token_id in zip(self.jobs, value.tolist()):
            if job.finish_reason is not None:
                continue  # finished rows receive padding
            if token_id in self.stop_ids:
                job.finish("stop")
                continue
            job.add_token(token_id)
            if len(job.tokens) >= job.max_new_tokens:
                job.finish("length")

    def end(self) -> None:
        for job in self.jobs:
            job.finish("length")  # no-op for rows that already finished

    # stopping-criteria interface: called with all ids so far, before `put` sees the newest token
    def __call__(self, input_ids, scores, **kwargs):
        import torch

        generated = input_ids.shape[1] - self.prompt_width
        last = input_ids[:, -1].tolist()
        done = [job.cancelled or generated >= job.max_new_tokens or last[row] in self.stop_ids
                for row, job in enumerate(self.jobs)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowTemperature:
    """A logits processor with one temperature per row; 0 keeps only the argmax, so that row decodes greedily
    even though the batch samples."""

    def __init__(self, temperatures):
        self.temperatures = temperatures  # (B,)

    def __call__(self, input_ids, scores):
        import torch

        t = self.temperatures.to(scores.device)
        scaled = scores / t.clamp(min=1e-6)[:, None]
        only_best = torch.full_like(scores, float("-inf")).scatter_(1, scores.argmax(-1, keepdim=True), 0.0)
        return torch.where((t == 0)[:, None], only_best, scaled)


class _Batcher:
    """One worker thread that decodes queued jobs in batches: concurrent requests share forward passes."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, batch_window_ms: float):
        self.model = model
        self.device = next(model.parameters()).device
        self.stop_ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
        self.max_batch_size = max_batch_size
        self.window_s = batch_window_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="stillhouse-batcher", daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.queue.put(None)
        if self.thread is not None:
            self.thread.join(timeout_s)

    def submit(self, job: _Job) -> None:
        self.queue.put(job)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self.queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch_size:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            for job in batch:
                if job.cancelled:
                    job.finish("cancelled")
            batch = [job for job in batch if not job.cancelled]
            if batch:
                try:
                    self._decode(batch)
                except Exception as e:  # a failed batch must not kill the worker: report it to each request
                    for job in batch:
                        job.finish("error", error=f"generation failed: {type(e).__name__}: {e}")
        while not self.queue.empty():  # shutting down: fail what is still waiting
            job = self.queue.get_nowait()
            if job is not None:
                job.finish("error", error="the server is shutting down")

    def _decode(self, batch: list[_Job]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        width = max(len(job.prompt_ids) for job in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, job in enumerate(batch):  # left padding: every row's next token is at the same position
            ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids):] = 1
        temperatures = torch.tensor([job.temperature for job in batch], dtype=torch.float32)
        control = _RowControl(batch, width, self.stop_ids)
        if bool((temperatures > 0).any()):
            # top_k=0 / top_p=1: the model's generation_config must not add warpers the request did not ask for
            sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                            logits_processor=LogitsProcessorList([_RowTemperature(temperatures)]))
        else:
            sampling = dict(do_sample=False)
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        # On CPU the weights are fp32 and matmuls run in bf16 autocast, exactly as records.generate does for
        # eval: the served answers are the answers eval measured.
        on_cpu = self.device.type == "cpu"
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=on_cpu):
            self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max(job.max_new_tokens for job in batch),
                eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id,
                streamer=control, stopping_criteria=StoppingCriteriaList([control]), **sampling,
            )
        control.end()


class _Detokenizer:
    """Token ids -> text deltas whose concatenation equals the final (stripped) text, like records.generate.
    Holds back text while the last token ends in an incomplete UTF-8 character and trailing whitespace."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        visible = self.text()
        if visible.endswith("\ufffd") or not visible.startswith(self.sent):
            return ""
        delta, self.sent = visible[len(self.sent):], visible
        return delta

    def flush(self) -> str:
        visible = self.text()
        delta = visible[len(self.sent):] if visible.startswith(self.sent) else ""
        self.sent = visible
        return delta


# ------------------------------------------------------------------------------------------------ requests


class _ApiError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.headers = headers or {}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields; see _UNSUPPORTED

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = Field(1, ge=1, le=1, description="one choice per request")
    best_of: int | None = Field(None, ge=1, le=1)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)


class _CompletionRequest(_Request):
    prompt: str | list[str]


def _parse(model_cls: type[BaseModel], body: dict):
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise _ApiError(400, f"'{where}': {err['msg']}", param=where,
                        code="missing_field" if err["type"] == "missing" else "invalid_value") from None


class _Service:
    """Everything a request needs: model, limits, keys, the batcher and the request log."""

    def __init__(self, model_dir: Path, cfg: Config, api_key_hashes: list[str] | None, log_path: Path | None):
        import torch

        from stillhouse.models import load_model, load_tokenizer, resolve_model

        src = resolve_model(str(model_dir))
        on_gpu = torch.cuda.is_available()
        self.tokenizer = load_tokenizer(src)
        self.model = load_model(src, dtype="bf16" if on_gpu else "fp32").to("cuda" if on_gpu else "cpu")
        self.cfg = cfg.serve
        self.model_created = int(Path(model_dir).stat().st_mtime)
        self.context_tokens = getattr(self.model.config, "max_position_embeddings", None)
        self.key_hashes = api_key_hashes
        self.log_path = Path(log_path) if log_path else None
        self.log_lock = threading.Lock()
        self.in_flight = 0  # touched only on the event loop
        self.batcher = _Batcher(self.model, self.tokenizer, max_batch_size=self.cfg.max_batch_size,
                                batch_window_ms=self.cfg.batch_window_ms)

    # --- checks
    def check_key(self, authorization: str | None) -> None:
        if self.key_hashes is None:
            return
        scheme, _, key = (authorization or "").partition(" ")
        digest = _sha256(key.strip()) if scheme.lower() == "bearer" else ""
        # compare_digest for every stored hash: timing says nothing about which key is close
        if not digest or not any([hmac.compare_digest(digest, h) for h in self.key_hashes]):
            raise _ApiError(401, f"missing or invalid API key: send `Authorization: Bearer <key>`; an administrator creates keys with `{NEW_KEY_COMMAND}`",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise _ApiError(404, f"model '{name}' does not exist; this server serves '{self.cfg.model_name}'",
                            param="model", code="model_not_found")

    def check_options(self, body: dict, req: _Request) -> tuple[int, float]:
        """(max new tokens, temperature) for a request, or a 400 that says which option is wrong."""
        for key in _UNSUPPORTED:
            if body.get(key):
                raise _ApiError(400, f"'{key}' is not supported by this server; remove it (the model stops at its end-of-turn token)",
                                param=key, code="unsupported_parameter")
        max_new = req.max_completion_tokens or req.max_tokens or self.cfg.max_tokens
        if max_new > self.cfg.max_tokens:
            raise _ApiError(400, f"max_tokens={max_new} is above this server's limit of {self.cfg.max_tokens} (serve.max_tokens)",
                            param="max_tokens", code="max_tokens_too_large")
        # OpenAI's default temperature is 1; 0 means greedy (deterministic) decoding
        return max_new, 1.0 if req.temperature is None else req.temperature

    def check_prompt(self, chars: int, prompt_ids: list[int], max_new: int, param: str) -> None:
        if chars > self.cfg.max_prompt_chars:
            raise _ApiError(400, f"the prompt is {chars} characters; this server accepts at most {self.cfg.max_prompt_chars} (serve.max_prompt_chars)",
                            param=param, code="prompt_too_long")
        if self.context_tokens and len(prompt_ids) + max_new > self.context_tokens:
            raise _ApiError(400, f"the prompt is {len(prompt_ids)} tokens; with max_tokens={max_new} it exceeds the model's context of {self.context_tokens} tokens",
                            param="max_tokens", code="context_length_exceeded")

    # --- generation
    def submit(self, prompt_ids: list[int], max_new: int, temperature: float) -> _Job:
        if self.in_flight >= self.cfg.max_concurrent_requests:
            raise _ApiError(429, f"{self.in_flight} requests are already in flight (serve.max_concurrent_requests); retry shortly",
                            type_="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += 1
        job = _Job(prompt_ids, max_new, temperature, on_done=self._release)
        self.batcher.submit(job)
        return job

    def _release(self) -> None:
        self.in_flight -= 1

    # --- request log
    def log(self, row: dict, *, messages: list[dict] | None = None, prompt: str | None = None,
            output: str | None = None) -> None:
        """Append one line to the request log. Texts pass through `pii.mask` first: raw text is never written."""
        if self.log_path is None:
            return
        from stillhouse.pii import mask

        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **row}
        if messages is not None:
            row["messages"] = [{"role": m["role"], "content": mask(m["content"])[0]} for m in messages]
        if prompt is not None:
            row["prompt"] = mask(prompt)[0]
        if output is not None:
            row["output"] = mask(output)[0]
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.log_lock:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # owner-only: masked text is still business text; O_APPEND writes a whole line at a time
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


def _error_body(err: _ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(model_dir: Path, cfg: Config, *, api_key_hashes: list[str] | None, log_path: Path | None) -> "FastAPI":  # noqa: F821
    """The FastAPI app serving the model in `model_dir`. `api_key_hashes=None` turns authentication off;
    `log_path=None` turns the request log off. The batcher thread starts and stops with the app (lifespan)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    svc = _Service(Path(model_dir), cfg, api_key_hashes, log_path)
    name = cfg.serve.model_name

    @asynccontextmanager
    async def lifespan(app):
        svc.batcher.start()
        yield
        await asyncio.to_thread(svc.batcher.stop)

    async def authorize(request: Request) -> None:
        request.state.started = time.perf_counter()
        svc.check_key(request.headers.get("authorization"))

    app = FastAPI(title="stillhouse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc  # for tests and operators poking at a live app

    def _latency_ms(request: Request) -> float:
        return round((time.perf_counter() - getattr(request.state, "started", time.perf_counter())) * 1000, 1)

    @app.exception_handler(_ApiError)
    async def api_error(request: Request, err: _ApiError):
        if request.url.path.startswith("/v1/"):
            svc.log({"endpoint": request.url.path, "status": err.status, "error": err.code, "latency_ms": _latency_ms(request)})
        return JSONResponse(_error_body(err), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = _ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code="not_found" if exc.status_code == 404 else "bad_request")
        return JSONResponse(_error_body(err), status_code=exc.status_code)

    async def read_body(request: Request) -> dict:
        # the prompt limit is in characters; JSON escaping can at most multiply that by 6 (\uXXXX), plus slack
        max_bytes = 6 * cfg.serve.max_prompt_chars + 65536
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else None
        if size is None or size <= max_bytes:  # a body declared too large is refused before it is read
            raw = await request.body()
            size = len(raw)
        if size > max_bytes:
            raise _ApiError(413, f"the request body is {size} bytes; at most {max_bytes} are accepted (serve.max_prompt_chars)", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def answer(request: Request, kind: str, req: _Request, prompt_ids: list[int], max_new: int,
                     temperature: float, log_text: dict):
        """Run one request through the batcher and answer as JSON or as an SSE stream."""
        job = svc.submit(prompt_ids, max_new, temperature)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created, "model": name}

        def usage() -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(job.tokens),
                    "total_tokens": len(prompt_ids) + len(job.tokens)}

        def log(status: int, text: str, stream: bool) -> None:
            svc.log({"endpoint": request.url.path, "model": name, "status": status, "stream": stream,
                     "latency_ms": _latency_ms(request), "prompt_tokens": len(prompt_ids),
                     "completion_tokens": len(job.tokens), "finish_reason": job.finish_reason}, output=text, **log_text)

        if not req.stream:
            detok = _Detokenizer(svc.tokenizer)
            try:
                async for event, value in job.iter_events():
                    if event == "token":
                        detok.ids.append(value)
                    elif event == "error":
                        raise _ApiError(500, value, type_="server_error", code="generation_failed")
            finally:
                job.cancelled = True  # no-op when finished; stops the row if this handler was cancelled
            text = detok.text()
            await asyncio.to_thread(log, 200, text, False)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": job.finish_reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
            return {**head, "choices": [choice], "usage": usage()}

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        chunk_head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(text: str | None, reason: str | None = None, role: bool = False) -> str:
            if kind == "chat":
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse({**chunk_head, "choices": [choice]})

        async def events():
            detok = _Detokenizer(svc.tokenizer)
            status = 499  # client closed the connection before the end, unless set below
            try:
                if kind == "chat":
                    yield chunk("", role=True)
                async for event, value in job.iter_events():
                    if event == "token":
                        if delta := detok.push(value):
                            yield chunk(delta)
                    elif event == "error":
                        status = 500
                        yield _sse(_error_body(_ApiError(500, value, type_="server_error", code="generation_failed")))
                    else:
                        if tail := detok.flush():
                            yield chunk(tail)
                        yield chunk(None, reason=value)
                        status = 200
                if include_usage:
                    yield _sse({**chunk_head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True
                log(status, detok.text(), True)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "in_flight": svc.in_flight, **svc.batcher.stats}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": svc.model_created, "owned_by": "stillhouse"}]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str):
        svc.check_model(model_id)
        return {"id": name, "object": "model", "created": svc.model_created, "owned_by": "stillhouse"}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        body = await read_body(request)
        req = _parse(_ChatRequest, body)
        svc.check_model(req.model)
        max_new, temperature = svc.check_options(body, req)
        messages = [m.plain() for m in req.messages]
        prompt_ids = encode_prompt(svc.tokenizer, messages)  # the chat template training used
        svc.check_prompt(sum(len(m["content"]) for m in messages), prompt_ids, max_new, "messages")
        return await answer(request, "chat", req, prompt_ids, max_new, temperature, {"messages": messages})

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        body = await read_body(request)
        req = _parse(_CompletionRequest, body)
        svc.check_model(req.model)
        max_new, temperature = svc.check_options(body, req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise _ApiError(400, f"'prompt' holds {len(prompts)} prompts; send one prompt per request", param="prompt", code="invalid_value")
        prompt_ids = svc.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise _ApiError(400, "'prompt' is empty", param="prompt", code="invalid_value")
        svc.check_prompt(len(prompts[0]), prompt_ids, max_new, "prompt")
        return await answer(request, "text", req, prompt_ids, max_new, temperature, {"prompt": prompts[0]})

    return app


# ----------------------------------------------------------------------------------------------- commands


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", timeout_s: float = 60.0):
    """Run `app` with uvicorn on a free port of `host` in a background thread; yields the base URL
    (`http://127.0.0.1:PORT`) and stops the server on exit. For `smoke` and tests."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))  # port 0: the kernel picks a free port, no race with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="stillhouse-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start within {timeout_s:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def run(cfg: Config, *, host: str | None = None, port: int | None = None, no_auth: bool = False) -> None:
    """Serve export/model until Ctrl-C. Keys are required unless `no_auth` (refused unless host is loopback)."""
    import uvicorn

    from stillhouse.ui import console

    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else port
    no_auth = no_auth or cfg.serve.no_auth
    if no_auth and not _is_loopback(host):
        raise StillhouseError(
            f"serve: running without API keys is refused on host {host}, which other machines can reach; "
            f"bind to 127.0.0.1, or create a key with `{NEW_KEY_COMMAND}` and drop --no-auth"
        )
    model_dir = _export_model_dir(cfg)
    hashes = None if no_auth else load_api_key_hashes(cfg)
    if hashes == []:
        raise StillhouseError(f"{_keys_path(cfg)}: no API keys yet; create one with `{NEW_KEY_COMMAND}` (or use --no-auth on 127.0.0.1)")
    sock = bind_socket(host, port)  # before loading the model: a taken port fails in a second, not after the load
    try:
        app = create_app(model_dir, cfg, api_key_hashes=hashes, log_path=stage_dir(cfg.workspace, "serve") / "requests.jsonl")
        console.print(f"serve: '{cfg.serve.model_name}' on http://{host}:{port}/v1 "
                      f"({'no authentication' if no_auth else f'{len(hashes)} API key(s)'}); Ctrl-C stops")
        if not _is_loopback(host):
            console.print("serve: plain HTTP: put a TLS reverse proxy in front when clients are on other machines")
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()


def bind_socket(host: str, port: int):
    """A listening-ready TCP socket bound to host:port, or one clear StillhouseError when the port is taken, the
    address is not this machine's, or the port needs privileges."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart right after a stop
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "is already in use (another `stillhouse serve`, or another program); stop it or "
                                  "choose another port with --port N (or --set serve.port=N)",
                errno.EACCES: "needs privileges (ports below 1024); choose a port above 1024 with --port N",
                errno.EADDRNOTAVAIL: "is not an address of this machine; check --host / serve.host"}
        raise StillhouseError(f"serve: {host}:{port} {hint.get(e.errno, f'cannot be bound ({e.strerror})')}") from None
    except socket.gaierror as e:
        sock.close()
        raise StillhouseError(f"serve: host {host!r} is not a valid address ({e.strerror}); check --host / serve.host") from None
    return sock


def smoke(cfg: Config, traffic: int = 0) -> dict:
    """Start the real server on a free loopback port, send one chat completion over HTTP, stop it.
    With `traffic` > 0, also send that many test-split prompts concurrently (they share batches), so the request
    log holds enough for `stillhouse monitor`. Writes serve/smoke.json and the serve manifest; skipped when
    export/model is unchanged."""
    import httpx

    from stillhouse.pii import mask
    from stillhouse.ui import console

    model_dir = _export_model_dir(cfg)
    test_path = cfg.workspace / "data" / "test.jsonl"
    inputs = [model_dir] + ([test_path] if test_path.exists() else [])
    stage = StageRun(cfg, "serve", inputs=inputs, params={"serve": cfg.serve.model_dump(), "smoke": True, "traffic": traffic})
    if stage.previous:
        console.print("serve: smoke test up to date, skipped")
        return stage.previous

    # A real prompt from the task when there is one, so the smoke answer says something about the model.
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    records: list[dict] = []
    if test_path.exists():
        from stillhouse.records import prompt_messages
        from stillhouse.workspace import read_jsonl

        records = read_jsonl(test_path)
        if records:
            messages = prompt_messages(records[0])
    key = "sh-smoke-" + secrets.token_urlsafe(16)  # lives only in this process; never written
    app = create_app(model_dir, cfg, api_key_hashes=[_sha256(key)], log_path=stage.dir / "requests.jsonl")
    max_tokens = min(32, cfg.serve.max_tokens)
    with serve_in_thread(app) as base_url:
        started = time.perf_counter()
        r = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                       json={"model": cfg.serve.model_name, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        traffic_ok = 0
        if traffic and records:
            from concurrent.futures import ThreadPoolExecutor

            from stillhouse.records import prompt_messages

            def send(rec: dict) -> int:
                return httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  timeout=300, json={"model": cfg.serve.model_name, "messages": prompt_messages(rec),
                                                     "max_tokens": max_tokens, "temperature": 0}).status_code

            # production traffic of a single-purpose student: prompts of the test split's main task, seeded sample
            import random
            from collections import Counter

            main_task = Counter(r["task"] for r in records).most_common(1)[0][0]
            pool_records = [r for r in records if r["task"] == main_task]
            rng = random.Random(0)
            batch = [rng.choice(pool_records) for _ in range(traffic)]
            with ThreadPoolExecutor(max_workers=min(8, traffic)) as pool:
                traffic_ok = sum(code == 200 for code in pool.map(send, batch))
            if traffic_ok != traffic:
                raise GateError(f"serve: {traffic - traffic_ok} of {traffic} concurrent requests failed; see {stage.dir / 'requests.jsonl'}")
    if r.status_code != 200:
        raise GateError(f"serve: the smoke request failed with HTTP {r.status_code}: {r.text[:300]}")
    body = r.json()
    result = {
        "endpoint": "/v1/chat/completions",
        "status": r.status_code,
        "latency_ms": latency_ms,
        "prompt": [{"role": m["role"], "content": mask(m["content"])[0]} for m in messages],
        "response": mask(body["choices"][0]["message"]["content"])[0],
        "finish_reason": body["choices"][0]["finish_reason"],
        "usage": body["usage"],
    }
    atomic_write_json(stage.dir / "smoke.json", result)
    console.print(f"serve: smoke request answered in {latency_ms:.0f} ms ({body['usage']['completion_tokens']} tokens)")
    return stage.finish(metrics={"smoke_latency_ms": latency_ms, "completion_tokens": body["usage"]["completion_tokens"],
                                 "traffic_requests_ok": traffic_ok},
                        smoke=result)
