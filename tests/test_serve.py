"""serve: a real uvicorn server on 127.0.0.1 with a tiny random model, driven by the official openai client."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from stillhouse.config import validate
from stillhouse.errors import StillhouseError
from stillhouse.stages import serve


def _workspace(root: Path, tiny_model_dir: Path, **serve_cfg):
    shutil.copytree(tiny_model_dir, root / "export" / "model")
    return validate({"serve": serve_cfg}, workspace=root, source="test")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """One server for most tests: keys required, a 50 ms batch window so concurrent requests meet."""
    cfg = _workspace(tmp_path_factory.mktemp("serve"), tiny_model_dir, batch_window_ms=50, max_batch_size=8, max_tokens=32,
                     max_prompt_chars=500)
    key = serve.new_api_key(cfg)
    log_path = cfg.workspace / "serve" / "requests.jsonl"
    app = serve.create_app(cfg.workspace / "export" / "model", cfg, api_key_hashes=serve.load_api_key_hashes(cfg), log_path=log_path)
    with serve.serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        yield {"url": url, "key": key, "client": client, "cfg": cfg, "log": log_path}


def _log_rows(path: Path, min_rows: int) -> list[dict]:
    """The request log; streamed requests are logged just after their last byte, so wait a little (bounded)."""
    for _ in range(100):
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(rows) >= min_rows:
            return rows
        time.sleep(0.02)
    raise AssertionError(f"{path}: expected at least {min_rows} rows")


def test_chat_completion(server, tokenizer):
    from stillhouse.records import encode_prompt

    messages = [{"role": "system", "content": "You classify requests."}, {"role": "user", "content": "turn on the light"}]
    r = server["client"].chat.completions.create(model="student", messages=messages, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == "student"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # the prompt went through the same chat template as training
    assert r.usage.prompt_tokens == len(encode_prompt(tokenizer, messages))
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # temperature > 0 samples: still a well-formed answer
    s = server["client"].chat.completions.create(model="student", messages=messages, max_tokens=6, temperature=1.5)
    assert s.usage.completion_tokens <= 6 and s.choices[0].finish_reason in ("stop", "length")


def test_greedy_completion_matches_the_eval_decoder(server, tokenizer, tiny_model_dir):
    """temperature=0 serves exactly what records.generate (used by eval) produces for the same prompt."""
    from stillhouse.models import load_model, resolve_model
    from stillhouse.records import generate

    prompt = "Once upon a time"
    r = server["client"].completions.create(model="student", prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = generate(load_model(resolve_model(str(tiny_model_dir))), tokenizer, [ids], max_new_tokens=8)[0]
    assert expected  # the check means something only if there is text
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"


def test_streaming(server):
    client = server["client"]
    prompt = "Once upon a time"
    full = client.completions.create(model="student", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="student", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"

    stream = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "tell me a story"}],
                                            max_tokens=10, temperature=1.0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 10

    # the raw wire format: server-sent events ending with `data: [DONE]`
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {server['key']}"},
                      json={"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_detokenizer_streams_exact_text(tokenizer):
    """Deltas concatenate to the final text, even through multi-byte characters split across tokens."""
    text = "Grüße aus Tōkyō: 東京タワー 🚀 and a trailing space "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = serve._Detokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text.strip()
    assert not any("\ufffd" in d for d in deltas)


def test_models_and_health(server):
    client = server["client"]
    assert [m.id for m in client.models.list().data] == ["student"]
    assert client.models.retrieve("student").id == "student"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = httpx.get(f"{server['url']}/health", timeout=10)  # no key needed for liveness
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_auth(server):
    url = f"{server['url']}/v1"
    bad = openai.OpenAI(base_url=url, api_key="sh-not-a-real-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="student", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # no Authorization header at all (the openai client refuses to send none, so plain httpx)
    for headers in ({}, {"Authorization": server["key"]}, {"Authorization": f"Basic {server['key']}"}):
        r = httpx.post(f"{url}/chat/completions", headers=headers, timeout=30,
                       json={"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # only the hash is stored
    stored = (server["cfg"].workspace / "serve" / "api_keys.json").read_text()
    assert server["key"] not in stored and hashlib.sha256(server["key"].encode()).hexdigest() in stored


def test_bad_requests_get_clear_4xx(server):
    headers = {"Authorization": f"Bearer {server['key']}"}
    chat = f"{server['url']}/v1/chat/completions"

    def post(**kw):
        r = httpx.post(chat, headers={**headers, "content-type": "application/json"}, timeout=30, **kw)
        return r.status_code, r.json()["error"]

    status, err = post(content=b"{not json")
    assert status == 400 and err["code"] == "invalid_json"
    status, err = post(json={"model": "student"})
    assert status == 400 and err["param"] == "messages" and err["code"] == "missing_field"
    status, err = post(json={"model": "student", "messages": [{"role": "tool", "content": "x"}]})
    assert status == 400 and err["param"].startswith("messages.0.role")
    status, err = post(json={"model": "student", "messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]})
    assert status == 400 and err["param"] == "stop"
    status, err = post(content=json.dumps({"model": "student", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode())
    assert status == 413 and err["code"] == "request_too_large"
    r = httpx.get(f"{server['url']}/v1/nothing-here", headers=headers, timeout=30)
    assert r.status_code == 404 and "error" in r.json()

    client = server["client"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "student" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="student", messages=[{"role": "user", "content": "x" * 501}], max_tokens=2)
    assert e.value.body["code"] == "prompt_too_long" and "max_prompt_chars" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="student", messages=[{"role": "user", "content": "hi"}], max_tokens=33)
    assert "serve.max_tokens" in e.value.body["message"]


def test_concurrent_requests_share_batches(server):
    """Concurrent requests of different lengths and temperatures are decoded together, and every greedy row
    (left-padded, next to sampling rows) still gets exactly the answer it gets alone."""
    client = server["client"]
    prompts = ["Once upon a time", "The quick brown fox jumps over the lazy dog because", "hi", "In 1999, the company",
               "Dear Sir or Madam, I am writing to", "x"]

    def ask(prompt: str, temperature: float):
        return client.completions.create(model="student", prompt=prompt, max_tokens=6, temperature=temperature)

    alone = [ask(p, 0).choices[0].text for p in prompts]
    before = httpx.get(f"{server['url']}/health", timeout=10).json()
    jobs = [(p, 0.0) for p in prompts] + [(p, 1.0) for p in prompts[:2]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: ask(*job), jobs))
    assert [r.choices[0].text for r in results[: len(prompts)]] == alone
    assert all(r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6 for r in results)
    after = httpx.get(f"{server['url']}/health", timeout=10).json()
    assert after["requests"] - before["requests"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # some requests shared forward passes
    assert after["largest_batch"] >= 2 and after["in_flight"] == 0


def test_request_log_is_masked(server):
    email = "jane.doe@example.com"
    client = server["client"]
    n = len(_log_rows(server["log"], 0))
    r = client.chat.completions.create(model="student", messages=[{"role": "user", "content": f"mail {email} about it"}],
                                       max_tokens=3, temperature=0)
    list(client.chat.completions.create(model="student", messages=[{"role": "user", "content": f"or {email}"}],
                                        max_tokens=3, stream=True))
    rows = _log_rows(server["log"], n + 2)[n:]
    assert email not in server["log"].read_text()
    chat_row = rows[0]
    assert chat_row["status"] == 200 and chat_row["endpoint"] == "/v1/chat/completions"
    assert chat_row["prompt_tokens"] == r.usage.prompt_tokens and chat_row["completion_tokens"] == r.usage.completion_tokens
    assert chat_row["latency_ms"] > 0 and "[EMAIL]" in chat_row["messages"][0]["content"] and "output" in chat_row
    assert rows[1]["stream"] is True and rows[1]["status"] == 200
    # monitor reads these lines back
    from stillhouse.stages.monitor import _input_text, _request_messages

    assert _input_text(_request_messages(chat_row)) == "mail [EMAIL] about it"


def test_concurrency_cap_returns_429(tmp_path, tiny_model_dir):
    """One request in flight (waiting 0.6 s in the batch window) is the cap: a second one gets 429, then all is free again."""
    cfg = _workspace(tmp_path, tiny_model_dir, max_concurrent_requests=1, batch_window_ms=600)
    app = serve.create_app(cfg.workspace / "export" / "model", cfg, api_key_hashes=None, log_path=None)
    with serve.serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(r=client.completions.create(model="student", prompt="hi", max_tokens=2)))
        thread.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health", timeout=10).json()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)  # bounded: until the first request is in flight
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="student", prompt="hi", max_tokens=2)
        thread.join(30)
        assert first["r"].usage.completion_tokens <= 2
        assert httpx.get(f"{url}/health", timeout=10).json()["in_flight"] == 0


def test_run_refuses_unsafe_or_missing_setup(tmp_path, tiny_model_dir):
    empty = validate({}, workspace=tmp_path / "empty", source="test")
    with pytest.raises(StillhouseError, match="stillhouse .*export"):
        serve.run(empty)
    cfg = _workspace(tmp_path / "ws", tiny_model_dir)
    with pytest.raises(StillhouseError, match="refused on host 0.0.0.0"):
        serve.run(cfg, host="0.0.0.0", no_auth=True)
    with pytest.raises(StillhouseError, match="--new-key"):
        serve.run(cfg)  # no keys created yet


def test_smoke(tmp_path, tiny_model_dir):
    cfg = _workspace(tmp_path, tiny_model_dir)
    manifest = serve.smoke(cfg)
    smoke = json.loads((tmp_path / "serve" / "smoke.json").read_text())
    assert smoke["status"] == 200 and smoke["usage"]["completion_tokens"] >= 1
    assert manifest["stage"] == "serve" and manifest["smoke"] == smoke
    assert "export/model/model.safetensors" in manifest["inputs"]
    assert (tmp_path / "serve" / "manifest.json").exists()
    assert not (tmp_path / "serve" / "api_keys.json").exists()  # the smoke key lives only in memory
    assert serve.smoke(cfg)["finished_at"] == manifest["finished_at"]  # unchanged export: skipped


def test_port_in_use_is_one_clear_line(tmp_path, tiny_model_dir):
    """Another program listens on the port: `stillhouse serve` stops at once with exit 2 and says so (before loading
    the model), instead of uvicorn's traceback after it."""
    import socket
    import subprocess
    import sys

    import yaml

    _workspace(tmp_path, tiny_model_dir)
    (tmp_path / "stillhouse.yaml").write_text(yaml.safe_dump({"project": "port-test"}))
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        p = subprocess.run([sys.executable, "-m", "stillhouse", "-w", str(tmp_path), "serve", "--no-auth", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    finally:
        other.close()
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"127.0.0.1:{port} is already in use" in p.stderr and "--port" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    with pytest.raises(StillhouseError, match="not a valid address|not an address of this machine"):
        serve.bind_socket("192.0.2.1", 0)  # TEST-NET-1: never this machine's
