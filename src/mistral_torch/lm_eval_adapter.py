"""An lm-evaluation-harness model: `MistralTorchLM`, registered as "mistral-torch".

    python -m mistral_torch.lm_eval_adapter --model mistral-torch \\
        --model_args pretrained=DIR,dtype=bf16 --tasks mmlu,arc_easy --batch_size 16
    mistral-torch evaluate lm-eval --model_args pretrained=DIR --tasks hellaswag   # the same

lm-eval 0.4 finds models only in its own registry (it has no plugin entry points), so the stock
`lm_eval` command does not know this one until this module is imported: the two commands above
import it, then run lm-eval's own command line unchanged. From Python:

    import lm_eval, mistral_torch.lm_eval_adapter
    lm_eval.simple_evaluate(model="mistral-torch", model_args="pretrained=DIR", tasks=["arc_easy"])

All three request types go through `mistral_torch.evaluate` (the same code as `mistral-torch
evaluate mc`, so both report the same numbers), batched:
    loglikelihood          `evaluate.loglikelihood`: lm-eval's context/continuation split, BOS first
    loglikelihood_rolling  `evaluate.loglikelihood_rolling`: disjoint max_length windows
    generate_until         `generate.generate`: greedy (or sampled) batched decoding, stop strings

Before the first request the adapter runs `evaluate.self_check` (our log-likelihoods against
transformers' MistralForCausalLM on the same weights) and refuses to go on if they disagree: an
adapter that silently scores at chance is the classic failure of custom lm-eval models.
Pass `self_check=False` to skip it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from . import evaluate as ev
from .model import Transformer

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in _TRUE


def _device(requested: str | None) -> str:
    """lm-eval passes device="cuda" by default; fall back to the CPU when there is no GPU."""
    if requested and not str(requested).startswith("cuda"):
        return str(requested)
    if torch.cuda.is_available():
        return str(requested or "cuda")
    if requested:
        log.warning("mistral-torch: device %s is not available, using the CPU", requested)
    return "cpu"


@register_model("mistral-torch", "mistral_torch")
class MistralTorchLM(LM):
    """lm-eval `LM` over a mistral-torch model.

    model_args: pretrained (folder or shipped name; default: the shipped model), tokenizer
    (default: the checkpoint's), dtype (fp32/bf16/fp16), device, batch_size, max_length
    (default: max_seq_len), self_check (default true). Or pass `model=` and `tokenizer=`
    objects directly from Python.
    """

    def __init__(self, pretrained: str | None = None, tokenizer: Any = None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str | None = 16, max_batch_size: int | None = None,
                 max_length: int | None = None, self_check: bool | str = True,
                 model: Transformer | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            log.warning("mistral-torch: ignoring unknown model_args %s", sorted(kwargs))
        from .tokenizer import Tokenizer, load_tokenizer

        if model is None:
            from .checkpoint import load_model

            model = load_model(pretrained, dtype=dtype, device=_device(device))
        self.model = model.eval()
        if isinstance(tokenizer, Tokenizer):
            self.tokenizer = tokenizer
        else:
            self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else pretrained)
        if self.tokenizer.vocab_size > model.args.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} pieces, the model only "
                             f"{model.args.vocab_size} embeddings: wrong tokenizer?")
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 16
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else model.args.max_seq_len
        self.pretrained = pretrained
        self.self_check_result: ev.SelfCheck | None = None
        if _bool(self_check):
            self.run_self_check()

    # ---------------------------------------------------------------- lm-eval plumbing
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def get_model_info(self) -> dict[str, Any]:
        a = self.model.args
        return {"model_name": f"mistral-torch:{self.pretrained or 'default'}",
                "model_num_parameters": a.n_params, "model_dtype": str(self.model.dtype),
                "sliding_window": a.sliding_window, "max_length": self.max_length}

    def run_self_check(self) -> ev.SelfCheck:
        result = ev.self_check(self.model, self.tokenizer, batch_size=self.batch_size)
        self.self_check_result = result
        print(result.summary(), file=sys.stderr)
        if not result.ok:
            raise RuntimeError("mistral-torch self-check failed: our log-likelihoods disagree with "
                               f"transformers'; refusing to evaluate. {result.summary()}")
        return result

    # ---------------------------------------------------------------- the three request types
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        out = ev.loglikelihood(self.model, self.tokenizer, pairs, self.batch_size, self.max_length,
                               progress=False if disable_tqdm else None)
        for (ctx, cont), res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", (ctx, cont), res)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in tqdm(requests, desc="rolling log-likelihood", disable=disable_tqdm or None):
            (text,) = r.args[:1]
            ll = ev.loglikelihood_rolling(self.model, self.tokenizer, [text], self.max_length)[0]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            out.append(ll)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from .generate import generate

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # same generation settings -> one batch
        settings = []
        for i, r in enumerate(requests):
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            do_sample = _bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            opts = {"max_new_tokens": max_new, "temperature": temperature, "stop": until}
            for k in ("top_k", "top_p", "seed"):
                if k in kwargs:
                    opts[k] = kwargs.pop(k)
            settings.append((context, opts))
            groups.setdefault(repr(sorted(opts.items())), []).append(i)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm or None)
        for idx in groups.values():
            opts = settings[idx[0]][1]
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                prompts = [self._prompt(settings[i][0], opts["max_new_tokens"]) for i in chunk]
                for i, text in zip(chunk, generate(self.model, self.tokenizer, prompts, **opts)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [r or "" for r in results]

    def _prompt(self, context: str, max_new: int) -> str | list[int]:
        """The context as text, or as its last ids (BOS kept) when it would not fit."""
        room = self.max_length - max_new
        if room < 2:
            raise ValueError(f"max_gen_toks {max_new} leaves no room in max_length {self.max_length}")
        ids = self.tokenizer.encode(context, bos=True)
        if len(ids) <= room:
            return context if context else ids
        return [ids[0]] + ids[-(room - 1):]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with "mistral-torch" registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
