"""Benchmark `mistral-torch serve`: throughput and latency with 1, 4, 16 concurrent clients, and a soak.

    .venv/bin/python benchmarks/bench_server.py                    # the shipped demo model
    .venv/bin/python benchmarks/bench_server.py --model DIR --clients 1,4,16 --soak 500

The server runs as a subprocess (`python -m mistral_torch.cli serve`) on a free loopback port,
exactly as a user starts it. Each client is a thread with its own keep-alive HTTP connection that
sends requests one after another (POST /v1/completions with the demo model's translation prompt,
greedy, `ignore_eos` so every reply has exactly --max-tokens tokens). Reported per concurrency
level: aggregate new tokens per second over the wall time (the median of --rounds rounds that
interleave the levels, so a busy spell on a shared machine hits every level), and p50/p99
request latency over all rounds. The soak then sends --soak requests of random lengths from 16
clients, half of them streamed, and counts failures (any error status, a broken stream, or a
token count that does not match the request); it must be zero.

Without the shipped model (`tiny-en-fr`) the script serves a random stand-in of the same
architecture (the `mistral-tiny-en-fr` preset over Mistral's v1 tokenizer), and says so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

SENTENCES = ["The cat sleeps on the sofa.", "Where is the train station?", "I would like a cup of coffee, please.",
             "It is raining today.", "We are going to the beach tomorrow morning.", "Thank you!"]
PROMPTS = [f"Translate: English → French\nEnglish: {s}\nFrench:" for s in SENTENCES]  # the demo model's format


def model_folder(name: str | None, workdir: Path) -> tuple[Path, str]:
    """(checkpoint folder, description): the named/shipped model, or a random stand-in."""
    from mistral_torch.checkpoint import ModelNotFoundError, resolve_model_path

    try:
        return resolve_model_path(name), name or "tiny-en-fr (shipped)"
    except ModelNotFoundError:
        if name is not None:
            raise
    from mistral_torch import ModelArgs, Transformer
    from mistral_torch.checkpoint import save_model
    from mistral_torch.tokenizer import NAMED, _data_dir

    preset = ModelArgs.from_name("mistral-tiny-en-fr").to_dict()
    args = ModelArgs.from_dict({**preset, "vocab_size": 32000})  # over the v1 tokenizer
    model = Transformer(args).init_weights(seed=0).eval()
    folder = save_model(model, workdir / "stand-in", extra_files=[_data_dir() / NAMED["v1"]])
    return folder, f"random stand-in for tiny-en-fr (mistral-tiny-en-fr preset, vocab 32000, {args.n_params:,} params)"


class Server:
    def __init__(self, folder: Path, log: Path, extra: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_torch.cli", "serve", "--model", str(folder), "--port", str(self.port),
             *extra], stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        sys.exit(f"server did not start:\n{log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request(conn: http.client.HTTPConnection, body: dict) -> tuple[int, int, str]:
    """(status, completion tokens, error) of one completion request, streamed or not."""
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        return resp.status, 0, data[:200].decode(errors="replace")
    if not body.get("stream"):
        return 200, json.loads(data)["usage"]["completion_tokens"], ""
    events = [e for e in data.decode().split("\n\n") if e]
    if not events or events[-1] != "data: [DONE]":
        return 200, 0, "stream did not end with [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return 200, 0, "error event in stream"
    usage = [c["usage"] for c in chunks if c.get("usage")]
    return 200, usage[-1]["completion_tokens"] if usage else 0, "" if usage else "no usage chunk"


def run_clients(port: int, n_clients: int,
                bodies_per_client: list[list[dict]]) -> tuple[float, list[float], list[tuple]]:
    """Wall time, latencies, and (status, tokens, error, body) per request."""
    latencies: list[float] = []
    results: list[tuple] = []
    lock = threading.Lock()
    start = threading.Barrier(n_clients + 1)

    def client(bodies: list[dict]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start.wait()
        for body in bodies:
            t0 = time.perf_counter()
            try:
                status, tokens, error = request(conn, body)
            except Exception as exc:  # a broken connection counts as a failure
                status, tokens, error = 0, 0, f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            with lock:
                latencies.append(time.perf_counter() - t0)
                results.append((status, tokens, error, body))
        conn.close()

    threads = [threading.Thread(target=client, args=(bodies_per_client[i],)) for i in range(n_clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, results


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder or shipped name (default: tiny-en-fr)")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default: 1,4,16)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level and round (default: 4)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over the levels; tokens/s is their median (default: 3)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--soak", type=int, default=500, help="requests in the soak, 0 to skip (default: 500)")
    p.add_argument("--threads", type=int, default=1, help="server torch threads (default: 1)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="serve with --compile (compiled decode step)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder, what = model_folder(args.model, Path(tmp))
        print(f"model: {what}\nserver: --threads {args.threads} --max-batch-size {args.max_batch_size}"
              f"{' --compile' if args.compile else ''}; "
              f"{os.cpu_count()} CPUs on this machine", flush=True)
        server = Server(folder, Path(tmp) / "server.log",
                        ["--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
                         "--max-queue", "256", *(["--compile"] if args.compile else [])])
        try:
            # warm-up (first calls allocate and load lazily)
            run_clients(server.port, 2, [[{"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}]] * 2)
            levels = [int(c) for c in args.clients.split(",")]
            runs: dict[int, list] = {n: [] for n in levels}  # per level: (tokens/s, latencies, failed) per round
            for rnd in range(args.rounds):  # rounds interleave the levels, so a busy spell hits all of them
                for n in levels:
                    bodies = [[{"prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_tokens": args.max_tokens,
                                "temperature": 0, "ignore_eos": True}
                               for j in range(args.requests)] for i in range(n)]
                    wall, lat, res = run_clients(server.port, n, bodies)
                    failed = [r for r in res if r[0] != 200 or r[1] != args.max_tokens]
                    tps = sum(r[1] for r in res) / wall
                    runs[n].append((tps, lat, len(failed)))
                    print(f"  round {rnd + 1}, {n:>2} clients: {tps:7.1f} tokens/s, p50 {percentile(lat, 50):.2f} s, "
                          f"{len(failed)} failed", flush=True)
            rows = []
            for n in levels:
                lat = [x for _, lats, _ in runs[n] for x in lats]
                rows.append(dict(clients=n, requests=len(lat), failed=sum(f for *_, f in runs[n]),
                                 tokens_per_s=statistics.median(t for t, *_ in runs[n]),
                                 tokens_per_s_rounds=[t for t, *_ in runs[n]],
                                 p50_s=percentile(lat, 50), p99_s=percentile(lat, 99)))
            base = rows[0]["tokens_per_s"]
            print(f"\n| clients | requests | tokens/s (aggregate, median of {args.rounds} rounds) | vs 1 client "
                  "| p50 latency | p99 latency | failed |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                ratio = r["tokens_per_s"] / base
                print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {ratio:.1f}× "
                      f"| {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | {r['failed']} |")
            soak = None
            if args.soak:
                rng = random.Random(0)
                bodies = [{"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, args.max_tokens),
                           "temperature": rng.choice([0, 0.8]),
                           "seed": i, "ignore_eos": True, "stream": i % 2 == 1,
                           "stream_options": {"include_usage": True}} for i in range(args.soak)]
                per_client = [bodies[i::16] for i in range(16)]
                wall, lat, res = run_clients(server.port, 16, per_client)
                failed = [r for r in res if r[0] != 200 or r[1] != r[3]["max_tokens"] or r[2]]
                soak = dict(requests=len(res), failed=len(failed), wall_s=wall, p50_s=percentile(lat, 50),
                            p99_s=percentile(lat, 99))
                print(f"\nsoak: {len(res)} requests (16 clients, half streamed, 1-{args.max_tokens} tokens) in "
                      f"{wall:.1f} s: {len(failed)} failed; p50 {soak['p50_s']:.2f} s, p99 {soak['p99_s']:.2f} s")
                for r in failed[:5]:
                    print("  failure:", r[:3])
            speedup = rows[-1]["tokens_per_s"] / base
            print(f"\naggregate tokens/s with {rows[-1]['clients']} clients = {speedup:.1f}x one client's "
                  f"({'>= 4x: PASS' if speedup >= 4 else '< 4x: FAIL'})")
            if args.json:
                Path(args.json).write_text(json.dumps(dict(model=what, levels=rows, soak=soak), indent=2) + "\n")
        finally:
            server.stop()
    ok = speedup >= 4 and all(r["failed"] == 0 for r in rows) and (soak is None or soak["failed"] == 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
