"""`mistral-torch serve`: the continuous-batching engine in process, then the real server.

The server tests start `python -m mistral_torch.cli serve` (uvicorn) in a subprocess on a free
loopback port, serving a tiny random model saved with Mistral's v1 tokenizer, and talk to it with
the official `openai` client (raw HTTP only where the client cannot express the request).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from mistral_torch import Transformer
from mistral_torch.generate import GenerationConfig, generate, generate_ids
from mistral_torch.tokenizer import Tokenizer, _data_dir

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mistral_torch.serve import Delta, Done, Engine, Failed, Job, ServerBusy  # noqa: E402

API_KEY = "test-key"


def served_model(**overrides) -> Transformer:
    """A tiny random model over the v1 vocabulary (32000). A wider init (std 0.05) keeps the top
    two logits apart, so greedy comparisons across batch shapes are not decided by rounding."""
    args = dict(vocab_size=32000, sliding_window=16, max_seq_len=2048)
    args.update(overrides)
    return Transformer(tiny_args(**args)).init_weights(std=0.05, seed=0).eval()


def save_served_model(folder: Path, **overrides) -> Path:
    from mistral_torch.checkpoint import save_model

    return save_model(served_model(**overrides), folder, extra_files=[_data_dir() / "tokenizer.model.v1"])


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_name("v1")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, busy CPU a second thread makes these tiny ops 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================ the engine, in process
class Collector:
    """Events of many jobs, by job index."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}

    def __call__(self, event) -> None:
        self.events.setdefault(event.index, []).append(event)

    def tokens(self, i: int) -> list[int]:
        return [t for e in self.events[i] if isinstance(e, Delta) for t in e.token_ids]

    def text(self, i: int) -> str:
        return "".join(e.text for e in self.events[i] if isinstance(e, Delta))

    def done(self, i: int) -> Done | None:
        return next((e for e in self.events.get(i, []) if isinstance(e, (Done, Failed))), None)


@pytest.mark.parametrize("window,long,compiled", [(8, 30, False), (None, 30, False), (300, 290, False),
                                                 (None, 290, False), (8, 30, True)],
                         ids=["window8", "no-window", "window300-long", "no-window-long", "window8-compiled"])
def test_engine_joins_and_leaves_exactly(tokenizer, window, long, compiled):
    """Jobs joining a running batch at arbitrary steps and leaving when done each decode exactly
    the tokens of their prompt decoded alone. Window 8 wraps the rolling cache many times;
    without a window the batch cache grows as longer jobs join; prompts longer than 256 make
    caches whose key/value buffers differ in length (when the cache allocates them lazily)."""
    model = served_model(sliding_window=window, max_seq_len=1024)
    if compiled:  # the server's --compile: every shape class compiled first (here: none; the fused step runs 1-3 rows)
        torch._dynamo.reset()
        model.compile_decode().warm_up_decode(max_batch_size=3)
        from torch._dynamo.utils import counters
        counters.clear()
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=10)
    rng = random.Random(0)
    prompts = [[tokenizer.bos_id] + [rng.randrange(3, 32000) for _ in range(n)] for n in (3, 20, 7, 1, 13, long, 5)]
    lengths = [9, 4, 15, 6, 11, 3, 8]
    joins = [0, 0, 2, 3, 3, 9, 10]  # step at which each job is submitted
    out = Collector()
    step = 0
    while step < 200 and (step <= max(joins) or not engine.idle):
        for i, at in enumerate(joins):
            if at == step:
                cfg = GenerationConfig(max_new_tokens=lengths[i], temperature=0.0, ignore_eos=True)
                engine.submit([Job(prompts[i], cfg, out, index=i)])
        engine.step()
        step += 1
    assert engine.idle
    if compiled:  # the warm-up compiled every shape class the engine met: no request waited
        assert counters["stats"]["unique_graphs"] == 0 and model._fused_step.steps > 0
    model._decode_step = None  # the references: plain eager decoding
    for i, p in enumerate(prompts):
        alone = generate_ids(model, [p], max_new_tokens=lengths[i], temperature=0.0, ignore_eos=True)[0]
        assert out.tokens(i) == alone, f"job {i}"
        assert out.done(i).finish_reason == "length" and out.done(i).completion_tokens == lengths[i]


def test_engine_text_stop_strings_and_seeded_sampling(tokenizer):
    """Text, stop strings and finish reasons match `generate`; a seeded sampling job gives the
    same tokens alone and beside other jobs."""
    model = served_model()
    prompt = tokenizer.encode("The quick brown fox", bos=True)
    greedy = generate(model, tokenizer, [prompt], max_new_tokens=12, temperature=0.0)[0]
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    cases = [dict(max_new_tokens=12, temperature=0.0), dict(max_new_tokens=12, temperature=0.0, stop=[stop]),
             dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)]

    def run(jobs):
        engine = Engine(model, tokenizer, max_batch_size=4)
        out = Collector()
        engine.submit([Job(prompt, GenerationConfig(**c), out, index=i) for i, c in jobs])
        while not engine.idle:
            engine.step()
        return out

    together = run(list(enumerate(cases)))
    for i, c in enumerate(cases):
        assert together.text(i) == generate(model, tokenizer, [prompt], **c)[0]
        alone = run([(i, c)])
        assert together.tokens(i) == alone.tokens(i)
    assert together.done(1).finish_reason == "stop" and stop not in together.text(1)


def test_engine_cancel_frees_row_and_queue_bounds(tokenizer):
    model = served_model()
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=1)
    out = Collector()
    cfg = GenerationConfig(max_new_tokens=100, temperature=0.0, ignore_eos=True)
    jobs = [Job([1, 100 + i], cfg, out, index=i) for i in range(3)]
    engine.submit(jobs[:2])  # two rows
    engine.submit(jobs[2:])  # waits in the queue
    with pytest.raises(ServerBusy) as busy:
        engine.submit([Job([1, 5], cfg, out, index=9)])
    assert busy.value.status == 429
    engine.step()
    assert len(engine.rows) == 2 and engine.counts() == (2, 1)
    jobs[0].cancelled = True  # the client went away
    engine.step()  # the cancelled row leaves, the waiting job takes its place at once
    assert [r.job.index for r in engine.rows] == [1, 2]
    engine.stop()
    with pytest.raises(ServerBusy) as stopping:
        engine.submit([Job([1, 5], cfg, out, index=8)])
    assert stopping.value.status == 503
    assert isinstance(out.done(1), Failed) and out.done(1).status == 503  # running jobs are told


# ================================================================ the real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mistral-torch serve` in a subprocess on a free loopback port."""

    def __init__(self, folder: Path, log: Path, *args: str, startup_timeout: float = 240) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_torch.cli", "serve", "--model", str(folder), "--port", str(self.port),
             "--model-name", "tiny-test", "--threads", "1", "--shutdown-timeout", "20", *args],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start in {startup_timeout} s:\n{log.read_text()}")
            time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def post(url: str, body: bytes | dict, key: str | None = API_KEY, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"content-type": "application/json"})
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--api-key", API_KEY,
                        "--max-batch-size", "4", "--max-queue", "6", "--max-body-size", "64KiB")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(model_dir):
    """The served model and tokenizer, loaded in this process: the reference for the server's text."""
    from mistral_torch.checkpoint import load_model
    from mistral_torch.tokenizer import load_tokenizer

    return load_model(model_dir), load_tokenizer(model_dir)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    h = server.health()
    assert h["status"] == "ok" and h["context_length"] == 2048 and h["max_batch_size"] == 4


def test_completion_equals_local_greedy(client, local):
    model, tok = local
    r = client.completions.create(model="tiny-test", prompt="The capital of France is", max_tokens=12, temperature=0)
    expected = generate(model, tok, ["The capital of France is"], max_new_tokens=12, temperature=0.0)[0]
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    n_prompt = len(tok.encode("The capital of France is", bos=True))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert r.object == "text_completion" and r.model == "tiny-test"


def test_chat_and_streaming_chat_equal_local_greedy(client, local):
    model, tok = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello in French."}]
    r = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=15, temperature=0)
    expected = generate(model, tok, [tok.encode_chat(messages)], max_new_tokens=15, temperature=0.0)[0]
    text = r.choices[0].message.content
    assert text == expected and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.encode_chat(messages)) and r.usage.completion_tokens == 15

    chunks = list(client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and sum(bool(p) for p in pieces) > 1  # streamed in several pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_streaming_completion_is_sse_ending_with_done(server, client):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 6,
                                                        "temperature": 0, "stream": True}),
                 {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    r = client.completions.create(model="tiny-test", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert text == r.choices[0].text and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_seed_and_logprobs(client):
    full = client.completions.create(model="tiny-test", prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = client.completions.create(model="tiny-test", prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and full.startswith(r.choices[0].text) and stop not in r.choices[0].text

    sampled = [client.completions.create(model="tiny-test", prompt="Hello", max_tokens=10, temperature=1.0, seed=3)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]

    r = client.completions.create(model="tiny-test", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    assert all(t <= 0 for t in lp.token_logprobs) and all(len(top) == 2 for top in lp.top_logprobs)
    assert all(max(top.values()) == pytest.approx(t) for top, t in zip(lp.top_logprobs, lp.token_logprobs))  # greedy
    r = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)


def test_several_prompts_in_one_completion_request(client):
    prompts = ["First prompt", "A second, longer prompt than the first"]
    alone = [client.completions.create(model="tiny-test", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    r = client.completions.create(model="tiny-test", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone) and r.usage.completion_tokens == 10
    pieces = ["", ""]
    for chunk in client.completions.create(model="tiny-test", prompt=prompts, max_tokens=5, temperature=0, stream=True):
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert pieces == [c.text for c in r.choices]


def test_auth_failure(server):
    import openai

    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, body = post(server.url + "/v1/completions", {"prompt": "hi"}, key=None)
    assert status == 401 and "API key" in body["error"]["message"]
    assert server.health()["status"] == "ok"  # /health and the page need no key
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        assert r.status == 200 and b"/v1/chat/completions" in r.read()


@pytest.mark.parametrize("route,body,param", [
    ("completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": 12}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [1, 99999]}, "prompt"),
    ("completions", {"prompt": "hi", "n": 2}, "n"),
    ("completions", {}, "prompt"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
])
def test_bad_input_is_400_openai_error(server, route, body, param):
    status, err = post(f"{server.url}/v1/{route}", body)
    assert status == 400 and err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"
    assert isinstance(err["error"]["message"], str) and err["error"]["message"]


def test_openai_client_sees_bad_request_and_server_keeps_serving(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert client.completions.create(model="tiny-test", prompt="fine", max_tokens=3).usage.completion_tokens == 3


def test_invalid_json_prompt_too_long_and_body_too_large(server, client):
    status, err = post(server.url + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    status, err = post(server.url + "/v1/completions", {"prompt": "hello " * 2100})
    assert status == 400 and "2048" in err["error"]["message"] and err["error"]["code"] == "context_length_exceeded"
    status, err = post(server.url + "/v1/completions", {"prompt": "x" * 70_000})  # limit: 64 KiB
    assert status == 413 and err["error"]["code"] == "request_too_large"
    # a body without Content-Length (chunked) is counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"y" * 70_000, b'"}']),
                 headers={"authorization": f"Bearer {API_KEY}"}, encode_chunked=True)
    assert conn.getresponse().status == 413
    assert client.completions.create(model="tiny-test", prompt="still fine", max_tokens=2).usage.completion_tokens == 2


def test_disconnect_mid_stream_frees_slot_then_normal_request(server, client):
    stream = client.completions.create(model="tiny-test", prompt="A long story:", max_tokens=2000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].text)
        if got == 3:
            break
    assert server.health()["running"] == 1
    stream.close()  # the client goes away after 3 of 2000 tokens
    t0 = time.monotonic()
    while server.health()["running"] and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    freed_after = time.monotonic() - t0
    assert server.health()["running"] == 0 and freed_after < 3, freed_after  # 2000 tokens would take far longer
    r = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0)
    assert r.usage.completion_tokens == 5


def test_concurrent_requests_each_equal_alone(client):
    """More requests than batch rows (4), of different lengths, arriving at different moments:
    each gets exactly the text it gets when sent alone (greedy, and seeded sampling)."""
    rng = random.Random(1)
    requests = [dict(prompt=f"Request number {i}: " + "word " * rng.randrange(0, 30), max_tokens=rng.randrange(4, 40),
                     temperature=0 if i % 3 else 0.8, seed=i, extra_body={"ignore_eos": True}) for i in range(9)]

    def send(i: int, delay: float = 0.0) -> str:
        time.sleep(delay)
        return client.completions.create(model="tiny-test", **requests[i]).choices[0].text

    alone = [send(i) for i in range(len(requests))]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(send, range(len(requests)), [0.03 * rng.randrange(0, 10) for _ in requests]))
    assert together == alone


def test_full_queue_gets_429_at_once_and_queued_clients_can_leave(server, client):
    """4 rows + 6 queued are busy: the next request is refused at once. Then all 10 clients
    go away (the queued ones too) and the server is idle again right after."""
    body = json.dumps({"prompt": "Busy", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True})
    conns = []
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body,
                     {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
        conns.append(conn)
    try:
        assert all(c.getresponse().status == 200 for c in conns)
        t0 = time.monotonic()  # admission happens at step boundaries: wait for the batch to fill
        while (h := server.health())["running"] < 4 and time.monotonic() - t0 < 20:
            time.sleep(0.02)
        assert (h["running"], h["waiting"]) == (4, 6)
        t0 = time.monotonic()
        status, err = post(server.url + "/v1/completions", {"prompt": "one more", "max_tokens": 2})
        assert status == 429 and err["error"]["code"] == "server_busy" and time.monotonic() - t0 < 5
    finally:
        for c in conns:
            c.close()
    t0 = time.monotonic()
    while sum(server.health()[k] for k in ("running", "waiting")) and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    assert sum(server.health()[k] for k in ("running", "waiting")) == 0
    assert client.completions.create(model="tiny-test", prompt="after", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_is_graceful(server):
    """SIGTERM during a streamed reply: the reply finishes ([DONE]), then the process exits 0.
    (Last test of the module: it stops the shared server.)"""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Bye", "max_tokens": 100, "temperature": 0,
                                                        "stream": True, "ignore_eos": True,
                                                        "stream_options": {"include_usage": True}}),
                 {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    resp = conn.getresponse()
    first = resp.readline()
    assert first.startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()
    assert rest.rstrip().endswith("data: [DONE]")
    usage = json.loads(rest.rstrip().split("\n\n")[-2][6:])["usage"]
    assert usage["completion_tokens"] == 100  # the reply in flight was not cut short
    assert server.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    log = server.log.read_text()
    assert "Traceback" not in log, log


# ================================================================ the command line
def test_cli_serve_defaults_and_adapter_wiring(model_dir, tmp_path, monkeypatch):
    """`serve` binds 127.0.0.1 by default; --adapter loads a LoRA adapter onto the served model."""
    from mistral_torch import cli
    from mistral_torch import serve as serve_module
    from mistral_torch.checkpoint import load_model

    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.max_batch_size) == ("127.0.0.1", 8000, None, 16)

    served: dict = {}
    monkeypatch.setattr(serve_module, "serve", lambda model, tok, name, host, port, **kw: served.update(
        model=model, name=name, host=host, port=port, **kw))
    monkeypatch.delenv("MISTRAL_TORCH_API_KEY", raising=False)
    assert cli.main(["serve", "--model", str(model_dir), "--max-body-size", "1KiB"]) == 0
    assert (served["host"], served["port"], served["name"], served["api_key"]) == ("127.0.0.1", 8000, "tiny", None)
    assert served["max_body_bytes"] == 1024

    lora = pytest.importorskip("mistral_torch.lora")
    tuned = lora.apply_lora(load_model(model_dir), r=4, seed=0)
    with torch.no_grad():
        for _, m in lora.lora_modules(tuned):
            m.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lora.save_adapter(tuned, tmp_path / "adapter")
    assert cli.main(["serve", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter")]) == 0
    tokens = torch.tensor([[1, 50, 900, 4000, 12]])
    with torch.inference_mode():
        got, want = served["model"](tokens, use_cache=False)[0], tuned.eval()(tokens, use_cache=False)[0]
        base = load_model(model_dir)(tokens, use_cache=False)[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, base)  # the adapter changed the model


def test_cli_serve_quantize_wiring(model_dir, monkeypatch):
    pytest.importorskip("mistral_torch.quantize")
    from mistral_torch import cli
    from mistral_torch import serve as serve_module
    from mistral_torch.checkpoint import load_model

    served: dict = {}
    monkeypatch.setattr(serve_module, "serve", lambda model, *a, **kw: served.update(model=model))
    assert cli.main(["serve", "--model", str(model_dir), "--quantize", "int8"]) == 0
    model = served["model"]
    assert getattr(model, "quantization", None) and type(model.lm_head).__name__ != "Linear"
    tokens = torch.tensor([[1, 50, 900, 4000, 12]])
    with torch.inference_mode():
        got, base = model(tokens, use_cache=False)[0], load_model(model_dir)(tokens, use_cache=False)[0]
    assert (got - base).abs().max() < 0.05 * base.abs().max()  # int8: close to the full-precision model
    assert cli.main(["serve", "--model", str(model_dir), "--quantize", "int3"]) == 2  # a clear error, no traceback
