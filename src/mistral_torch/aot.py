"""The batch-1 decode step compiled ahead of time (AOTInductor): one C++ call per token.

`Transformer.compile_decode(aot=True)`, CLI `--aot`. torch.compile's CPU step runs
inductor's kernels from a generated Python wrapper, entered through dynamo's frame hook: at
bench-125m about 1 ms of Python per token, a tenth of a bf16 step. AOTInductor compiles the same
graph (the same fused kernels and C++ ops) into a shared library whose C++ wrapper calls them, so
that a step is one call from Python. The library reads the model's own parameters in place
("user-managed constants": no copy of the weights; huge pages kept) and, like the torch.compile
step, writes the new token's keys and values into the cache buffers it is given.

Batch 1 on CPU only: batched steps measured slower this way and keep the torch.compile step, as
do the first step of an empty cache and a step after an exporting or compiling failure (warned
once). Exporting and compiling take ~30 s; the package (no weights in it) is stored in inductor's
cache directory under a hash of everything the graph depends on (this package's code, torch's
version, the modules with their settings and their parameters' shapes, the cache kind), so a
later process loads it in about a second.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import fast
from .cache import CacheStep, RollingKVCache

if TYPE_CHECKING:
    from .model import Transformer


class DecodeStep(nn.Module):
    """`Transformer._run` for one new token per row over cache buffers given as tensors (what
    torch.export traces): the write-first step `RollingKVCache.plan` makes for a decode step."""

    def __init__(self, model: "Transformer") -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, k_pos: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor, slots: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
                k_scale: list[torch.Tensor], v_scale: list[torch.Tensor]) -> torch.Tensor:
        m = self.model
        cache = RollingKVCache.over(k, v, k_scale, v_scale, m.args.sliding_window, m.dtype)
        step = CacheStep(cache, positions, k_pos, (rows, cols, slots), write_first=True, used=k_pos.shape[-1])
        return m._run(tokens, positions, step, False)


def step_inputs(tokens: torch.Tensor, step: CacheStep) -> tuple[Any, ...]:
    """`DecodeStep`'s arguments for a planned decode step."""
    c = step.cache
    return (tokens, step.q_pos, step.k_pos, *step.index, c.k, c.v, c.k_scale, c.v_scale)


# Module attributes that are ids within one process (`PackedLinear.handle`: the oneDNN-packed
# weight's registry key), in no graph this step compiles: oneDNN-packed models do not take it.
_PROCESS_LOCAL = {"handle"}


def package_path(model: "Transformer", kv_dtype: torch.dtype) -> Path:
    """Where the compiled step of this model and cache kind is kept (inductor's cache directory)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for f in sorted([*here.glob("*.py"), *here.glob("csrc/*.cpp")]):
        h.update(f.read_bytes())
    settings = [(name, type(m).__name__, sorted((k, v) for k, v in vars(m).items() if not k.startswith("_")
                                                and k not in _PROCESS_LOCAL and isinstance(v, (bool, int, float, str, type(None)))))
                for name, m in model.named_modules()]
    tensors = [(name, tuple(t.shape), t.stride(), str(t.dtype))
               for name, t in itertools.chain(model.named_parameters(), model.named_buffers())]
    h.update(repr((torch.__version__, torch.backends.cpu.get_cpu_capability(), model.args, str(kv_dtype),
                   sorted(fast.INDUCTOR_OPTIONS.items()), settings, tensors)).encode())
    return Path(cache_dir()) / "mistral_torch_aot" / f"decode_{h.hexdigest()[:32]}.pt2"


class AotDecoder:
    """The ahead-of-time compiled batch-1 step of one model, built or loaded on first use."""

    def __init__(self, model: "Transformer") -> None:
        self.step = DecodeStep(model)
        self.runner = None
        self.boxed_run = None  # the runner's call on flat inputs (`_flat_call`)
        self.kv_dtype: torch.dtype | None = None
        self.failed = False
        self.constants: list[torch.Tensor] = []
        self.pointers: list[int] = []
        self.steps = 0  # steps it has run (the others went to the caller's own step)

    def __call__(self, tokens: torch.Tensor, step: CacheStep) -> torch.Tensor | None:
        """The step's logits, or None where this step is not for it (the caller runs its own)."""
        if self.failed or tokens.shape[0] != 1 or step.k_pos.shape[-1] < 2 or not step.write_first:
            return None
        inputs = step_inputs(tokens, step)
        if self.runner is None or self.kv_dtype != step.cache.kv_dtype:
            try:
                self._load(inputs, step.cache.kv_dtype)
            except Exception as e:  # torch.export or AOTInductor could not take this model
                self.failed = True
                warnings.warn(f"mistral-torch: ahead-of-time decode step unavailable ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); using torch.compile's")
                return None
        if [t.data_ptr() for t in self.constants] != self.pointers:  # parameters re-pointed (p.data = ...)
            self._bind_constants()
        self.steps += 1
        if self.boxed_run is not None:
            return self.boxed_run([t for x in inputs for t in (x if isinstance(x, list) else (x,))])[0]
        return self.runner(*inputs)

    def _load(self, inputs: tuple[Any, ...], kv_dtype: torch.dtype) -> None:
        path = package_path(self.step.model, kv_dtype)
        if not path.exists():
            self._compile(inputs, path, quantized=kv_dtype == torch.int8)
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.boxed_run = self._flat_call(self.runner)
        self.kv_dtype = kv_dtype
        self._bind_constants()

    @staticmethod
    def _flat_call(runner: Any) -> Any:
        """The loaded library's own call on the flat list of input tensors, where its output is
        one tensor (else None): the package's Python `__call__` parses its input and output
        specs and walks the arguments' tree on every call, ~0.1 ms of a ~8 ms step."""
        from torch.utils import _pytree as pytree

        loader = getattr(runner, "loader", None)
        try:
            if pytree.treespec_loads(loader.get_call_spec()[1]).is_leaf():
                return loader.boxed_run
        except Exception:  # another torch's package layout: its generic call
            pass
        return None

    def _compile(self, inputs: tuple[Any, ...], path: Path, quantized: bool) -> None:
        keys = torch.export.Dim("keys", min=2)
        per_layer = [{2: keys}] * self.step.model.args.n_layers  # every layer's buffers: slots along dim 2
        scales = per_layer if quantized else []
        dynamic = (None, None, {1: keys}, None, None, None, per_layer, per_layer, scales, scales)
        with torch.inference_mode(False), torch.no_grad():  # export writes into copies of the buffers
            example = tuple([t.clone() for t in x] if isinstance(x, list) else x.clone() for x in inputs)
            exported = torch.export.export(self.step, example, dynamic_shapes=dynamic, strict=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
        try:
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(tmp),
                inductor_configs={**fast.INDUCTOR_OPTIONS, "aot_inductor.package_constants_in_so": False})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _bind_constants(self) -> None:
        """Point the library at the model's parameters and buffers (in place, not copied)."""
        named = dict(itertools.chain(self.step.named_parameters(), self.step.named_buffers()))
        names = self.runner.get_constant_fqns()
        missing = [name for name in names if name not in named]
        if missing:
            raise RuntimeError(f"the compiled step needs tensors the model does not have: {missing[:3]}")
        self.constants = [named[name] for name in names]
        self.runner.load_constants(dict(zip(names, self.constants)), check_full_update=True, user_managed=True)
        self.pointers = [t.data_ptr() for t in self.constants]
