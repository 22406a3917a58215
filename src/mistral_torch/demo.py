"""`make demo`: until the shipped model lands, a short forward + greedy decode of a small random model."""

from __future__ import annotations

import time

import torch

from . import ModelArgs, Transformer


def main() -> None:
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny")
    model = Transformer(args).init_weights(seed=0).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 12))
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, cache = model(prompt)
        out = []
        for _ in range(40):  # 52 positions in a window of 8: the rolling cache wraps many times
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            logits, cache = model(nxt, cache=cache)
    dt = time.perf_counter() - t0
    print(f"tiny random Mistral ({args.n_params:,} params, window {args.sliding_window}):")
    print(f"  prompt ids   {prompt[0].tolist()}")
    print(f"  greedy ids   {out}")
    print(f"  cache slots  {cache.capacity} per layer after {cache.length} positions; {dt * 1000:.0f} ms")


if __name__ == "__main__":
    main()
