"""Shared helpers for the speed benchmarks (`bench_decode.py`, `bench_prefill.py`, `bench_long.py`).

Contenders run in one process on identical random weights, interleaved (A B C, A B C, ...) and
reported as medians, so that a machine busy with other work slows them alike. Peak memory is
measured in a fresh child process per contender (`peak_memory`), as RSS high-water marks.

    make_model(args, dtype)       our Transformer, seeded random weights
    hf_model(model)               transformers' MistralForCausalLM holding the same weights
    write_gguf(model, path, kind) a minimal llama.cpp GGUF (f32, f16 or q8_0) of the same weights
    copy_bandwidth(device=...)    measured memory copy bandwidth (read + write bytes per second), CPU or GPU
    matmul_flops(device=...)      measured matmul throughput at prefill shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mistral_torch import ModelArgs, Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- models
def make_model(args: ModelArgs, dtype: torch.dtype = torch.float32, device: str = "cpu",
               seed: int = 0) -> Transformer:
    """Our model with seeded random weights (std 0.02, built in fp32 then cast)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
    return model.init_weights(seed=seed).to(dtype).eval()


def hf_model(model: Transformer, attn: str = "sdpa"):
    """transformers' `MistralForCausalLM` with `model`'s weights, dtype and device (strict load)."""
    import transformers

    cfg = {k: v for k, v in model.args.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
    config = transformers.MistralConfig(**cfg)
    config._attn_implementation = attn
    w = model.lm_head.weight
    before = torch.get_default_dtype()
    torch.set_default_dtype(w.dtype)  # built in place, in the weights' dtype (a 7B model on a GPU: seconds)
    try:
        with torch.device(w.device):
            hf = transformers.MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every tensor of the state dict but the embedding
    table, of which one row; quantized modules at their stored size (int8 weights with their scales)."""
    embed = model.model.embed_tokens
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied table once
    table = {t.data_ptr() for t in embed.state_dict().values()}
    if model.lm_head.weight.data_ptr() in table:  # tied: the LM head reads the whole table
        table = set()
    rows = embed.weight.shape[0]
    return sum(t.nbytes if p not in table else t.nbytes // rows for p, t in tensors.items())


# ---------------------------------------------------------------- machine measurements
def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7, device: str = "cpu") -> float:
    """Memory copy bandwidth in bytes/s (bytes read + bytes written), median of `repeats`: main
    memory on a CPU, the GPU's own memory (HBM) on a GPU (1 GiB there, past its caches)."""
    if torch.device(device).type == "cuda":
        nbytes = max(nbytes, 2**30)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def matmul_flops(m: int = 512, k: int = 768, n: int = 2048, dtype: torch.dtype = torch.float32,
                 repeats: int = 9, device: str = "cpu") -> float:
    """Matmul throughput (FLOP/s) of (m, k) @ (k, n), median of `repeats` batches of calls: the
    faster of the BLAS call (`F.linear`) and, on a CPU, oneDNN with a packed weight
    (`fast.PackedLinear`)."""
    from mistral_torch.fast import PackedLinear, packing_supported

    a = torch.randn(m, k, dtype=dtype, device=device)
    linear = torch.nn.Linear(k, n, bias=False, dtype=dtype, device=device).requires_grad_(False)
    calls = [lambda: torch.nn.functional.linear(a, linear.weight)]
    if torch.device(device).type == "cpu" and packing_supported(dtype):
        calls.append(lambda packed=PackedLinear.from_linear(linear): packed(a))
    best = 0.0
    for call in calls:
        call()
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(8):
                call()
            sync(device)
            times.append((time.perf_counter() - t0) / 8)
        best = max(best, 2 * m * k * n / statistics.median(times))
    return best


def twin(model: Transformer) -> Transformer:
    """A second model over the same weight tensors (no copy), for a contender that swaps modules
    (packing, compiling) while another keeps the plain ones."""
    with torch.device("meta"):
        other = Transformer(model.args)
    other.load_state_dict(model.state_dict(), assign=True)
    return other.eval()


def peak_rss() -> int:
    """Peak resident memory of this process (VmHWM), bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "capability": torch.backends.cpu.get_cpu_capability()}


# ---------------------------------------------------------------- running and reporting
def interleave(contenders: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, dict[str, float]]:
    """Run each contender once per round, `repeats` rounds; the median of every reported figure."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for r in range(repeats):
        for name, fn in contenders.items():
            runs[name].append(fn())
            print(f"  round {r + 1}/{repeats} {name}: " +
                  ", ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()), file=sys.stderr, flush=True)
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def peak_memory(script: str, names: list[str], argv: list[str]) -> dict[str, float]:
    """Peak RSS (MB) of `script --child NAME argv` per contender, each in a fresh process."""
    out = {}
    for name in names:
        proc = subprocess.run([sys.executable, script, "--child", name, *argv], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("PEAK ")]
        out[name] = float(lines[-1].split()[1]) / 2**20 if lines else float("nan")
        if not lines:
            print(f"  memory child {name} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
    return out


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table: columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None or (isinstance(v, float) and v != v) else format(v, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # then renamed: never a half-written result
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


# ---------------------------------------------------------------- llama.cpp
def llama_cpp_available() -> bool:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split RoPE rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf does)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_gguf(model: Transformer, path: str | Path, kind: str = "f32") -> Path:
    """A minimal llama.cpp GGUF ("llama" architecture) of `model`'s weights: f32, f16 or q8_0
    matrices (norms stay f32) and a placeholder vocabulary; enough to benchmark, not to chat."""
    import gguf
    import numpy as np

    a = model.args
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(min(a.max_seq_len, 32768))
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_dimension_count(a.head_dim)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_vocab_size(a.vocab_size)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[kind])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(a.vocab_size - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * a.vocab_size)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (a.vocab_size - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name: str, t: torch.Tensor) -> None:
        data = t.detach().float().cpu().numpy()
        if data.ndim == 1 or kind == "f32":
            w.add_tensor(name, data.astype(np.float32))
        elif kind == "f16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    for key, t in model.state_dict().items():
        if key == "model.embed_tokens.weight":
            add("token_embd.weight", t)
        elif key == "model.norm.weight":
            add("output_norm.weight", t)
        elif key == "lm_head.weight":
            if not a.tie_embeddings:
                add("output.weight", t)
        else:
            _, _, layer, *rest = key.split(".")  # model.layers.{i}.{module}.weight
            module = ".".join(rest[:-1])
            if module == "self_attn.q_proj":
                t = _permute_rope(t, a.n_heads)
            elif module == "self_attn.k_proj":
                t = _permute_rope(t, a.n_kv_heads)
            add(f"blk.{layer}.{GGUF_NAMES[module]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def llama_cpp_model(path: str | Path, n_ctx: int, threads: int, n_batch: int = 512):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=n_batch, n_ubatch=n_batch, logits_all=False, verbose=False)


class LlamaWorker:
    """llama.cpp in a process of its own, driven over a pipe: one timed generation per request.

    In the benchmark's process, llama.cpp's OpenMP thread pool and torch's (oneDNN's) competed:
    our 8-row decode ran at ~60 % of its speed whenever llama.cpp had been loaded beside it.
    """

    def __init__(self, path: str | Path, n_ctx: int, threads: int, n_batch: int = 512) -> None:
        cmd = [sys.executable, __file__, "--llama-worker", str(path), str(n_ctx), str(threads), str(n_batch)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"llama.cpp worker failed to load {path}")

    def run(self, ids: list[int], new: int) -> dict[str, float]:
        """Greedy: the prompt, then `new - 1` more tokens (none when new <= 1): ttft_s, tok_s, s."""
        self.proc.stdin.write(json.dumps({"ids": ids, "new": new}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _llama_worker(path: str, n_ctx: int, threads: int, n_batch: int) -> None:
    import numpy as np

    llm = llama_cpp_model(path, n_ctx, threads, n_batch)
    vocab = llm.n_vocab()
    argmax = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(req["ids"])
        tok = argmax()
        t1 = time.perf_counter()
        for _ in range(req["new"] - 1):
            llm.eval([tok])
            tok = argmax()
        t2 = time.perf_counter()
        out = {"ttft_s": t1 - t0, "s": t1 - t0}
        if req["new"] > 1:
            out["tok_s"] = (req["new"] - 1) / (t2 - t1)
        print(json.dumps(out), flush=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Next token (B, 1) from logits (B, T, V), as `generate` picks it: argmax over fp32 (a bf16
    argmax over 32k logits costs ~0.1 ms a row on this CPU, 5x the fp32 one)."""
    return logits[:, -1].float().argmax(-1, keepdim=True)


def time_it(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def threads_from_env(default: int | None = None) -> int:
    n = int(os.environ.get("BENCH_THREADS", default or torch.get_num_threads()))
    torch.set_num_threads(n)
    return n


def side_by_side_parser(doc: str, counts: str, rounds: int, out: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that compares variants in one process (`ab_decode.py`,
    `bench_small_linear.py`): --preset, --dtypes, `counts` (a comma list of ints: batch sizes or
    rows, default 1,8), --rounds, --threads, --out."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--preset", default="bench-125m")
    p.add_argument("--dtypes", default="fp32,bf16", type=lambda s: s.split(","))
    p.add_argument(counts, default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=out)
    return p


def run_and_save(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Set the threads, run, write the JSON; exit status 0."""
    threads_from_env(args.threads)
    write_json(args.out, run(args))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--llama-worker"]:
    _llama_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
