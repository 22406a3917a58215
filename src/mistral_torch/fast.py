"""CPU fast paths for inference: how the compiled decode step and packed weights read memory.

Decode streams every weight once per step, so its speed is how fast the weights are read:

- Up to 8 rows on an x86 CPU with AVX2 or AVX-512, after `compile_decode()`: `small_linear`,
  a C++ kernel (`csrc/decode_kernels.cpp`, built on first use by `cpp_kernels`) that reads each
  weight once for all rows at memory speed, bf16 included (widened by a shift and a mask, which
  inductor's reductions cannot express); and `decode_attention` over the grouped query heads.
  q/k/v and gate/up go through one call each, over their weights side by side (`project`).
  A step of up to 8 rows (16 for small or, with AVX512_BF16, bf16 models) of a plain model runs
  both kernels from one C++ call instead (`fused.py`).
- One row elsewhere (compiled): `PackedLinear` writes `x @ W.t()` as a multiply-sum
  (`one_row_linear`) that inductor fuses into one vectorised reduction over the weight rows,
  together with the norm or activation before it. It reads fp32 weights ~1.7x faster than the
  BLAS gemv. Both ways the compiled step is stock inductor, whose on-disk caches serve later
  processes (a 25 s compilation becomes ~5 s).
- Several rows (batched decode, prefill): `PackedLinear`, the fastest multi-row matmul this CPU
  has for the weight's dtype (`multi_row_kernel`): oneDNN with the weight reordered once into its
  blocked layout where oneDNN runs the dtype natively (fp32 everywhere; bf16/fp16 with AVX-512
  BF16/FP16 or AMX), else, for bf16/fp16 on CPUs without such hardware (AVX2), an fp32 matmul on a
  weight upcast block by block per call, from 16 rows: there the low-precision GEMM is 2x
  (16 rows) to 5.6x (512 rows) slower (docs/speed.md).
- The plain model's eager forwards (prefill, uncompiled decode; no packed copy): `linear`, `swiglu` and
  `linear_add` hand the weight as it is to oneDNN where that beats the BLAS (`plain_onednn`), and
  oneDNN applies SiLU, the gate-times-up product and the residual adds as post-ops of its matmuls,
  packed weights or not.

`PackedLinear` is an `nn.Linear` (same parameter, same state-dict key). The oneDNN kind also holds
the packed copy, so packing costs one extra copy of the linear weights (`onednn=False` declines
it and keeps the rest); it repacks when the weight changes (in-place update, load_state_dict,
LoRA merge). Whenever autograd needs the weight, the plain `F.linear` runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_MODULES: dict[int, weakref.ref] = {}  # handle -> PackedLinear, for the compiled graph's custom op
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def packing_supported(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """Whether oneDNN can run packed linears of `dtype` natively on this machine."""
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


@functools.lru_cache(maxsize=None)
def multi_row_kernel(dtype: torch.dtype, device_type: str = "cpu") -> str | None:
    """How `PackedLinear` multiplies several rows: "onednn" (packed weight), "upcast" (fp32 matmul
    on the weight upcast per call, from `UPCAST_MIN_ROWS` rows: bf16/fp16 without native
    hardware), or None (plain F.linear)."""
    if packing_supported(dtype, device_type):
        return "onednn"
    if device_type == "cpu" and dtype in _LOW_PRECISION:
        return "upcast"
    return None


# `mistral_torch::packed_linear`, defined with a plain `Library` rather than `custom_op`: the op
# runs once per linear per decode step, and `custom_op`'s wrapper costs ~5 us more a call.
_LIB = torch.library.Library("mistral_torch", "DEF")
_LIB.define("packed_linear(Tensor x, int[] handles, int out_features) -> Tensor")


def packed_linear(x: torch.Tensor, handles: list[int], out_features: int) -> torch.Tensor:
    """`x` through the `PackedLinear`s registered as `handles` (several: outputs side by side, in
    one `small_linear` call where each would take it)."""
    modules = [_MODULES[h]() for h in handles]
    if any(m is None for m in modules):
        raise RuntimeError("a packed linear this compiled graph refers to no longer exists; compile again")
    if len(modules) == 1:
        return modules[0].packed_forward(x)
    if all(m.takes_small(x) for m in modules):
        return small_linear(x, *(m.weight for m in modules))
    return torch.cat([m.packed_forward(x) for m in modules], dim=-1)


_LIB.impl("packed_linear", packed_linear, "CPU")


@torch.library.register_fake("mistral_torch::packed_linear")
def _(x: torch.Tensor, handles: list[int], out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


UPCAST_BLOCK = 2**21  # weight elements upcast at a time: an 8 MB fp32 block, reused by the allocator
UPCAST_MIN_ROWS = 16  # below this, upcasting costs more than the low-precision GEMM saves (8 rows: level)


def upcast_pays(x: torch.Tensor) -> bool:
    """Whether `x` (..., K) has enough rows for `upcast_linear` to beat the low-precision GEMM."""
    return x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]


def upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.t()` in fp32 for a low-precision `w`, upcast a block of rows at a time (a whole 7B
    matrix at once would be a 235 MB temporary, and fresh large allocations cost page faults)."""
    xf = x.reshape(-1, x.shape[-1]).float()
    rows = max(1, UPCAST_BLOCK // w.shape[1])
    if rows >= w.shape[0]:
        y = F.linear(xf, w.float())
    else:
        y = torch.cat([F.linear(xf, block.float()) for block in w.split(rows)], dim=1)
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


class UpcastLinears(TorchFunctionMode):
    """While active, `F.linear` on a bf16/fp16 weight (no bias) with `UPCAST_MIN_ROWS` rows or more
    runs as `upcast_linear`: the plain (unpacked) model's prefill gets the fast kernel too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, w = args[:2]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None and w.dtype in _LOW_PRECISION and upcast_pays(x):
                return upcast_linear(x, w)  # the mode is off inside its own handler: no recursion
        return func(*args, **kwargs)


def upcast_linears(dtype: torch.dtype, device_type: str, rows: int) -> contextlib.AbstractContextManager:
    """`UpcastLinears()` for an eager inference forward of `rows` rows on `dtype` weights where
    upcasting is the faster multi-row kernel (`multi_row_kernel`), else a context that does nothing."""
    if (rows >= UPCAST_MIN_ROWS and multi_row_kernel(dtype, device_type) == "upcast"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return UpcastLinears()
    return contextlib.nullcontext()


class PackedLinear(nn.Linear):
    """`nn.Linear` (no bias) that runs inference matmuls of several rows through `multi_row_kernel`."""

    _next_handle = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, onednn: bool = True) -> "PackedLinear":
        """Over `linear`'s own parameter; `onednn=False`: no oneDNN-packed copy (plain multi-row
        matmuls). `small` (set by `compile_decode`): up to `SMALL_MAX_ROWS` rows through the C++
        `small_linear`."""
        if linear.bias is not None:
            raise ValueError("PackedLinear supports bias-free linears only (Mistral has no biases)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight  # shared: same parameter, same state-dict key
        new.register_parameter("bias", None)
        new.handle = PackedLinear._next_handle
        PackedLinear._next_handle += 1
        _MODULES[new.handle] = weakref.ref(new)
        weakref.finalize(new, _MODULES.pop, new.handle, None)
        new._packed, new._packed_key = None, None
        new.onednn, new.small = onednn, False
        return new

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear

    def kernel(self, w: torch.Tensor | None = None) -> str | None:
        """This module's multi-row kernel now (the module may have been cast since it was made)."""
        w = self.weight if w is None else w
        kernel = multi_row_kernel(w.dtype, w.device.type)
        return None if kernel == "onednn" and not self.onednn else kernel

    def _packed_weight(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), w.dtype, _version(w))
        if key != self._packed_key:  # first use, or the weight changed since it was packed
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed_key = key
        return self._packed

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called once per linear per batched decode step: every microsecond here counts 85 times
        # a step at bench-125m (oneDNN itself costs ~23 us a call), hence no reshapes (oneDNN
        # takes (..., K) inputs) and one read of `self.weight`.
        w = self.weight
        if self.takes_small(x, w):
            return small_linear(x, w)
        kernel = self.kernel(w)
        if kernel == "onednn":
            return onednn_linear(x, self._packed_weight(w))
        if kernel == "upcast" and upcast_pays(x):
            return upcast_linear(x, w)
        return plain_linear(x, w)  # no packed copy: oneDNN on the weight as it is, where that pays

    def takes_small(self, x: torch.Tensor, w: torch.Tensor | None = None) -> bool:
        """Whether `x` goes through the C++ `small_linear` (`small` set, at most `SMALL_MAX_ROWS`
        rows, a weight it can read). Eager, or in a compiled graph static in the rows."""
        w = self.weight if w is None else w
        return self.small and x.numel() <= SMALL_MAX_ROWS * x.shape[-1] and small_linear_fits(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return F.linear(x, self.weight)  # autograd: oneDNN's packed linear has no backward
        if torch.compiler.is_compiling():
            return compiled_projection(x, (self,))[0]
        return self.packed_forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rows>1: {self.kernel()}"


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """`x` through several linears that read it (q/k/v, gate/up), one output each: in a compiled
    inference step over `PackedLinear`s, one kernel call for all of them; otherwise each linear
    as it runs alone."""
    if (len(linears) > 1 and torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and all(isinstance(m, PackedLinear) for m in linears)):
        return compiled_projection(x, linears)
    return tuple(linear(x, m) for m in linears)


def compiled_projection(x: torch.Tensor, linears: tuple[PackedLinear, ...]) -> tuple[torch.Tensor, ...]:
    """Inside a compiled inference graph: `x` through `linears` (same input). Up to 8 rows (known
    when the graph is traced) go through the C++ `small_linear`, all weights in one call (one
    extern call, one pass of the threads; the weights are read one after another, so no fused copy
    of them is kept); one fp32 row through inductor's fused reductions (`one_row_linear`: as fast,
    no extern call; bench_decode --inductor-only); anything else (a batch dynamic in the graph)
    through the `packed_linear` op, which decides per call."""
    sizes = [m.out_features for m in linears]
    rows = x.numel() // x.shape[-1]
    static = isinstance(rows, int)  # else symbolic: a graph dynamic in the batch
    small = static and all(m.takes_small(x) for m in linears)
    if static and rows == 1 and (linears[0].weight.dtype == torch.float32 or not small):
        return tuple(one_row_linear(x, m.weight) for m in linears)
    if small:
        y = small_linear(x, *(m.weight for m in linears))
    else:
        y = torch.ops.mistral_torch.packed_linear(x, [m.handle for m in linears], sum(sizes))
    return y.split(sizes, dim=-1) if len(linears) > 1 else (y,)


# Below this many multiply-adds a call, oneDNN's fixed cost (~20 us) loses to the BLAS (alone, fp32:
# one row of 256 x 256 0.27x, of 768 x 256 0.61x, of 1024 x 1024 1.40x). Eager fp32 decode, one
# process (docs/speed.md): the shipped model 173 tok/s at 2^18, 165 with every product through
# oneDNN, 148 with none; bench-125m 39.0, 39.5 and 25.7.
PLAIN_ONEDNN_MIN_MACS = 2**18


@functools.lru_cache(maxsize=None)
def plain_onednn(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """Whether eager inference matmuls on plain (unpacked) weights of `dtype` go to oneDNN:
    bf16/fp16 where it runs them natively (F.linear calls it anyway; its post-ops then fuse the
    SwiGLU and the residual adds), fp32 on AVX-512 CPUs, where it reorders the weight per call
    and still beats MKL's sgemm at every row count measured on bench-125m's weights: 1.4-3.6x for
    1-8 rows (the eager decode step 1.4x at batch 1, 1.7x at batch 4), 1.2-2.4x for 16-512
    (docs/speed.md); small products stay with the BLAS (`PLAIN_ONEDNN_MIN_MACS`). On AVX2 it was
    not measured faster."""
    if not packing_supported(dtype, device_type):
        return False
    return dtype != torch.float32 or avx512()


def _eager_inference(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `x @ w.t()` may leave its module for oneDNN: no autograd, no compiled graph, no
    autocast, and x already in the weight's dtype."""
    return (x.dtype == w.dtype and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type))


def _plain_onednn_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether an eager inference `x @ w.t()` on a plain weight goes to oneDNN (`plain_onednn`;
    from `PLAIN_ONEDNN_MIN_MACS` multiply-adds)."""
    return (x.numel() // x.shape[-1] * w.numel() >= PLAIN_ONEDNN_MIN_MACS
            and plain_onednn(w.dtype, w.device.type) and _eager_inference(x, w)
            and type(w) in (torch.Tensor, nn.Parameter) and type(x) is torch.Tensor)  # not DTensors (FSDP)


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.t()` by oneDNN, `w` plain or packed (`_reorder_linear_weight`); x (..., K)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def plain_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` (no bias), through oneDNN where `plain_onednn` says (eager inference):
    what the plain model's linears run (`linear`)."""
    return onednn_linear(x, w) if _plain_onednn_takes(x, w) else F.linear(x, w)


def onednn_weight(x: torch.Tensor, m: nn.Module) -> torch.Tensor | None:
    """The weight oneDNN should multiply `x` by for `m(x)` in an eager inference forward: a
    `PackedLinear`'s packed copy (more rows than `small_linear` takes), or a plain `nn.Linear`'s
    own weight (`plain_onednn`); None where `m(x)` should run as it is (autograd, a compiled
    graph, autocast, other modules, forward hooks to honour)."""
    if torch.compiler.is_compiling() or m._forward_hooks or m._forward_pre_hooks:
        return None  # first: inside a graph nothing below is traced
    if type(m) is nn.Linear:  # the cheap checks first: this runs for every linear of every step
        return m.weight if m.bias is None and _plain_onednn_takes(x, m.weight) else None
    if type(m) is not PackedLinear or m.takes_small(x):
        return None
    if m.kernel() != "onednn":  # no packed copy (`pack=False`, AOT): like a plain linear
        return m.weight if _plain_onednn_takes(x, m.weight) else None
    return m._packed_weight(m.weight) if _eager_inference(x, m.weight) else None


def linear(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """`m(x)`, through oneDNN where `onednn_weight` names a weight."""
    w = onednn_weight(x, m)
    return m(x) if w is None else onednn_linear(x, w)


def linear_add(x: torch.Tensor, m: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """`residual + m(x)`; through oneDNN the add happens as the product is written (a binary
    post-op), not as one more pass over the activations."""
    w = onednn_weight(x, m)
    if w is None:
        return residual + m(x)
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, None, "add")


def swiglu(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`[residual +] down(silu(gate(x)) * up(x))`. Through oneDNN (eager inference) the SiLU, the
    product and the residual add are post-ops of the three matmuls: 512-token fp32 feed-forward
    1.15x (docs/speed.md)."""
    wg = onednn_weight(x, gate)
    wu = None if wg is None else onednn_weight(x, up)
    if wu is not None:
        op = torch.ops.mkldnn._linear_pointwise
        h = op.binary(x, op(x, wg, None, "swish", [], ""), wu, None, "mul")
    elif torch.compiler.is_compiling():
        g, u = project(x, gate, up)  # one kernel call
        h = F.silu(g) * u
    else:
        h = F.silu(gate(x)) * up(x)
    return linear(h, down) if residual is None else linear_add(h, down, residual)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: it cannot be changed in place outside inference mode
        return 0


def pack_linears(model: nn.Module, onednn: bool = True) -> int:
    """Swap every plain `nn.Linear` of `model` for a `PackedLinear` (in place); returns how many.

    Nothing happens where no faster multi-row kernel exists (see `multi_row_kernel`).
    `onednn=False`: no packed copies (multi-row matmuls stay plain; one row is still fused).
    """
    return _replace(model, lambda m: type(m) is nn.Linear and m.bias is None
                    and multi_row_kernel(m.weight.dtype, m.weight.device.type) is not None,
                    lambda m: PackedLinear.from_linear(m, onednn))


def memory_available() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable in /proc/meminfo), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def packed_copy_fits(model: nn.Module) -> bool:
    """Whether oneDNN's packed copy of `model`'s linear weights (as many bytes again) would take at
    most half the memory available now; True where that is unknown."""
    need = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    free = memory_available()
    return free is None or 2 * need <= free


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears`: plain `nn.Linear`s holding the same parameters; returns how many."""
    return _replace(model, lambda m: type(m) is PackedLinear, PackedLinear.to_linear)


def _replace(model: nn.Module, wanted, convert) -> int:
    targets = [(name, m) for name, m in model.named_modules() if wanted(m)]
    for name, m in targets:
        model.set_submodule(name, convert(m))
    return len(targets)


# ---------------------------------------------------------------- one-row matmuls in inductor
INDUCTOR_OPTIONS = {
    # An activation read by several matmuls (q/k/v, gate/up) is computed once into a buffer
    # instead of inside each weight-row loop of their reductions (bf16: +3-4 %).
    "realize_reads_threshold": 1,
    # The wrapper's checks of every input's and extern kernel output's size, stride and alignment
    # cost ~0.4 ms of Python per batch-1 step (~4 %); the step's shapes come from the model itself.
    "size_asserts": False,
    "alignment_asserts": False,
}


def one_row_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.t()` for a single row x (..., K), as a multiply-sum accumulated in fp32, which inductor
    turns into one vectorised reduction over w's rows: on this project's CPUs it reads the weights
    ~1.7x faster than the BLAS gemv (docs/speed.md). Use inside a compiled graph only: eagerly it
    would materialise the product."""
    return (x.float().unsqueeze(-2) * w.float()).sum(-1).to(x.dtype)


# ---------------------------------------------------------------- weights on huge pages
HUGE_PAGE = 2 << 20
HUGE_PAGES = True  # compile_decode() moves the linear weights onto huge pages (Linux); False: not


def huge_page_weights(model: nn.Module) -> int:
    """Move the weights of `model`'s `PackedLinear`s (CPU) into one memory block that Linux backs
    with 2 MB transparent huge pages (`madvise(MADV_HUGEPAGE)`, honoured unless THP is "never"),
    one after another in module order, which is the order a decode step reads them. Each weight
    keeps its own storage (a slice of the block) and its Parameter (`.data` is swapped), so saving,
    tying and LoRA see nothing new. A decode step streams every weight once: on 4 KB pages that is
    a TLB miss every 4 KB and a prefetcher that stops at each page; on 2 MB pages `small_linear`
    read bench-125m's weights 2-13 % faster here (`benchmarks/bench_small_linear.py`; docs/speed.md). Returns the bytes moved
    (0 where not Linux or nothing to move). The block holds the weights' bytes plus at most 2 MB."""
    import mmap

    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    params, seen = [], set()
    for m in model.modules():
        w = getattr(m, "weight", None) if isinstance(m, PackedLinear) else None
        if w is not None and w.device.type == "cpu" and id(w) not in seen and w.is_contiguous():
            seen.add(id(w))
            params.append(w)
    if advice is None or platform.system() != "Linux" or not params:
        return 0
    align = 64
    sizes = [-(-p.numel() * p.element_size() // align) * align for p in params]
    try:
        block = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block.madvise(advice)  # before the first touch: the copies below fault in huge pages
    except OSError:  # a kernel without THP (EINVAL), or no room: the weights stay where they are
        return 0
    view = memoryview(block)
    offset = -torch.frombuffer(view[:1], dtype=torch.uint8).data_ptr() % HUGE_PAGE  # first weight on a 2 MB boundary
    with torch.no_grad():
        for p, size in zip(params, sizes):
            nbytes = p.numel() * p.element_size()
            dest = torch.frombuffer(view[offset:offset + nbytes], dtype=p.dtype).view(p.shape)  # keeps `block` alive
            dest.copy_(p)
            p.data = dest
            offset += size
    return offset


# ---------------------------------------------------------------- C++ kernels (x86 with AVX2)
SMALL_MAX_ROWS = 8  # up to this many rows, `small_linear` beats every other kernel here (docs/speed.md)
_CSRC = Path(__file__).parent / "csrc" / "decode_kernels.cpp"
_kernels_loaded = False


# torch's CPU capabilities the C++ kernels run on: AVX2 code, on AVX-512 CPUs too, where the fused
# step was measured faster than inductor's path (docs/speed.md)
KERNEL_CPUS = ("AVX2", "AVX512")


def avx512() -> bool:
    """Whether torch runs this CPU's AVX-512 kernels (oneDNN's packed weights pay for prefill there)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


_KERNEL_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def kernels_supported() -> bool:
    """x86 with AVX2 or AVX-512, and not switched off (MISTRAL_TORCH_CPP_KERNELS=0)."""
    if os.environ.get("MISTRAL_TORCH_CPP_KERNELS", "1") == "0":
        return False
    cpu = torch.backends.cpu.get_cpu_capability()
    return platform.machine().lower() in ("x86_64", "amd64") and cpu in KERNEL_CPUS


def _kernel_build_dir() -> Path:
    """Where the kernels are built: torch's extension folder ($TORCH_EXTENSIONS_DIR, else its
    default), one subfolder per source, flags and torch/Python version, so that a built library is
    never stale (`kernels_ready`)."""
    from torch.utils import cpp_extension

    key = hashlib.sha1(b"\0".join([_CSRC.read_bytes(), " ".join(_KERNEL_CFLAGS).encode(),
                                   torch.__version__.encode(), sys.version.encode()])).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"mistral_torch_cpu_{key}"


def kernels_ready() -> bool:
    """Whether the C++ kernels can be used at once: loaded, or built on this machine for this source
    (then loading takes well under a second), not ~15 s of compiling first (`cpp_kernels`)."""
    if _kernels_loaded:
        return True
    if not kernels_supported():
        return False
    return (_kernel_build_dir() / "mistral_torch_cpu.so").exists()


@functools.lru_cache(maxsize=None)
def cpp_kernels() -> bool:
    """Build (first call: ~15 s; later processes load it from torch's extension folder) and load
    `csrc/decode_kernels.cpp`; whether its ops are usable. False, with a warning saying why, where
    the build fails; False quietly on CPUs other than x86 with AVX2 (or AVX-512) or with
    MISTRAL_TORCH_CPP_KERNELS=0."""
    global _kernels_loaded
    if not kernels_supported():
        return False
    try:
        from torch.utils import cpp_extension

        build_dir = _kernel_build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        with _ninja_on_path():
            cpp_extension.load("mistral_torch_cpu", [str(_CSRC)], is_python_module=False,
                               extra_cflags=_KERNEL_CFLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(build_dir))
    except Exception as e:  # no compiler, no ninja, ...: the plain kernels still work
        warnings.warn(f"mistral-torch: C++ decode kernels unavailable ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using torch's kernels")
        return False
    torch.library.register_fake("mistral_torch_cpu::small_linear")(
        lambda x, ws: x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in ws))))
    torch.library.register_fake("mistral_torch_cpu::small_linear_int8")(
        lambda x, ws, scales: x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in ws))))
    torch.library.register_fake("mistral_torch_cpu::decode_attention")(
        lambda q, k, v, bias, k_scale=None, v_scale=None: q.new_empty(q.shape))
    _kernels_loaded = True
    return True


@contextlib.contextmanager
def _ninja_on_path():
    """torch builds extensions with the `ninja` executable: also find the pip package's copy."""
    old = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = os.pathsep.join([old, ninja.BIN_DIR])
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


def small_linear_fits(w: torch.Tensor) -> bool:
    """Whether `small_linear` can multiply by `w` (kernels loaded, CPU, fp32/bf16/fp16, K % 16 == 0)."""
    return (_kernels_loaded and w.device.type == "cpu" and w.dtype in (torch.float32, *_LOW_PRECISION)
            and w.dim() == 2 and w.shape[1] % 16 == 0 and w.is_contiguous())


def small_linear(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """`x @ w.t()` for a few rows of x (..., K) by the AVX2 kernel of `csrc/decode_kernels.cpp`: one
    pass over the weight per 8 rows, fp32 accumulation, at memory speed for one row (bf16 too).
    Several weights (same K and dtype): their outputs side by side, `x @ cat(weights).t()`."""
    return torch.ops.mistral_torch_cpu.small_linear(x, list(weights))


def small_linear_int8(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """x @ (w * scale[:, None]).t() for int8 weights (N, K) with fp32 scales (N,), several side by
    side as one; in x's dtype. x is rounded to int16 per row (max |x| / 32767 a unit) so that the
    kernel multiplies in integers: `vpdpwssd` with AVX512-VNNI, `vpmaddwd` with AVX2."""
    return torch.ops.mistral_torch_cpu.small_linear_int8(x, list(weights), list(scales))


def decode_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` takes this step: kernels loaded, CPU, a float q and k, v of its
    dtype or int8, head_dim a multiple of 16 with unit stride, at most 8 query heads per kv head."""
    return (_kernels_loaded and q.device.type == "cpu" and q.dtype in (torch.float32, *_LOW_PRECISION)
            and k.dtype == v.dtype and k.dtype in (q.dtype, torch.int8) and q.shape[-1] % 16 == 0
            and k.stride(-1) == v.stride(-1) == 1
            and q.shape[1] % k.shape[1] == 0 and q.shape[1] // k.shape[1] <= SMALL_MAX_ROWS)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row, q (B, nh, 1, hd), over k, v (B, nkv, S, hd) plus bias (B, 1, 1, S), by the
    AVX2 kernel of `csrc/decode_kernels.cpp`: each kv head's keys and values read once for the query
    heads that share it, softmax in fp32; ~3x faster than SDPA here (docs/speed.md). An int8 cache
    (`cache.quantize_int8`) passes its keys and values as int8 with their scales (B, nkv, S)."""
    return torch.ops.mistral_torch_cpu.decode_attention(q, k, v, bias, k_scale, v_scale)


@contextlib.contextmanager
def int8_vnni(on: bool) -> Iterator[None]:
    """Within the block, whether the C++ int8 kernels (int8 weights, the int8 cache's attention)
    may use AVX512-VNNI where the CPU has it (the default) or keep to their AVX2 forms: the two give
    the same results bit for bit; for tests and A/B runs in one process."""
    before = torch.ops.mistral_torch_cpu.use_vnni(on)
    try:
        yield
    finally:
        torch.ops.mistral_torch_cpu.use_vnni(before)
