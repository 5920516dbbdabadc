"""vitkit's C++ kernels for CPU bf16 (csrc/cpu_kernels.cpp): attention and LayerNorm for inference, and bf16
training's attention (with its backward), residual add and pre-norm LayerNorm.

Attention, on oneDNN's brgemm (AMX): at ViT-*/16's 197 tokens PyTorch's CPU flash attention runs on the slow side
of a cliff (key counts that are not a multiple of 16), and attention is a third of a ViT-S/16 forward at batch 32.
The kernel pads the keys inside its packed copies (exact: padded keys get probability 0), reads q / k / v straight
from the qkv projection's output and writes (B, Q, C) for the output projection. LayerNorm (bf16 in and out, fp32
statistics): ATen runs an AVX2 kernel for bf16 here, and this one saves a little at batch 1.
`benchmarks/cpu_kernels.py` measures each op alone and whole models with and without them; the outputs stay within
bf16 tolerance of PyTorch's ops (tests/test_cpu_kernels.py).

For bf16 autocast training (`training.py` calls them):
- attention with its own backward (`attention_with_grad`), where `auto` would pick explicit attention (up to
  MAX_TOKENS): the forward keeps the log-sum-exps, the backward recomputes the probabilities (flash-attention style),
  reads q, k, v in place and writes d(qkv) in the layout the qkv projection's backward takes. No (B, heads, N, N)
  tensor is kept between forward and backward;
- the residual add (`residual_add`): autocast leaves the stream fp32 and the branches bf16, and PyTorch's
  mixed-dtype add converts the branch into a temporary before adding;
- the pre-norms (`layer_norm_to_bf16`): fp32 in, bf16 out, where autocast would write fp32 and the next linear
  would cast it.
`benchmarks/cpu_kernels.py --train` measures the whole training step with each kernel switched off in turn.

Built once per machine, never during a forward: `vitkit kernels build` (which `make setup` runs) compiles the source
with torch.utils.cpp_extension (a C++ compiler and ninja) into the cache folder (VITKIT_CACHE, default
~/.cache/vitkit), keyed by the source, torch and Python versions. Until it is built, or where the CPU lacks
AVX512-BF16, or with VITKIT_CPU_KERNELS=0, every op falls back to PyTorch's (SDPA, F.layer_norm, x + y).
`vitkit kernels status` says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
CFLAGS += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]  # ATen's Vectorized<float>: 16 lanes
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")  # what the compiled code executes
HEAD_DIMS = (32, 64)
# Longer sequences keep SDPA: PyTorch's flash kernel splits long rows into blocks and this one does not, so it wins
# at 65-257 tokens and loses from ~577 on (whole-model A/B: benchmarks/cpu_kernels.py).
MAX_TOKENS = 320

_module: ModuleType | None = None
_probed = False
_no_brgemm = False  # the library loaded, but oneDNN's bf16 brgemm is unavailable on this CPU (no AMX / old oneDNN)
_enabled = os.environ.get("VITKIT_CPU_KERNELS", "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get("VITKIT_CACHE", Path.home() / ".cache" / "vitkit")) / "kernels"


def build_key() -> str:
    """What the compiled library depends on: the source, the flags, torch and the Python ABI."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(f"{torch.__version__}|{sys.implementation.cache_tag}|{platform.machine()}".encode())
    return h.hexdigest()[:16]


def module_name() -> str:
    return f"vitkit_cpu_kernels_{build_key()}"


def library_path() -> Path:
    return cache_dir() / f"{module_name()}.so"


def cpu_supported() -> bool:
    """Whether this CPU runs the compiled instructions (x86-64 with AVX-512 BF16; AMX makes brgemm fast)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return all(f in flags for f in CPU_FLAGS)


def _cpp_extension() -> ModuleType:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": irrelevant here
    from torch.utils import cpp_extension

    return cpp_extension


def why_not_buildable() -> str | None:
    """None when `build()` can run here, else the reason in words."""
    if not cpu_supported():
        return f"this CPU lacks one of {', '.join(CPU_FLAGS)}"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler (c++ / g++) on PATH"
    if not _cpp_extension().is_ninja_available():
        return "ninja is missing: pip install ninja"
    return None


def build(verbose: bool = False) -> Path:
    """Compile the kernel into the cache folder (once per source / torch version) and return the library's path."""
    target = library_path()
    if target.exists():
        return target
    reason = why_not_buildable()
    if reason:
        raise RuntimeError(f"cannot build vitkit's CPU kernels: {reason}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as tmp:
        # built in a private folder, then moved into place: a second process never loads a half-written library
        _cpp_extension().load(
            module_name(), [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=tmp,
            verbose=verbose,
        )  # fmt: skip
        os.replace(Path(tmp) / f"{module_name()}.so", target)
    return target


def kernel() -> ModuleType | None:
    """The built kernel, loaded once; None when it is off, not built here, or the CPU cannot run it. Never builds."""
    global _module, _probed, _no_brgemm
    if not _enabled:
        return None
    if not _probed:
        _probed = True
        path = library_path()
        if cpu_supported() and path.exists():
            try:
                loader = importlib.machinery.ExtensionFileLoader(module_name(), str(path))
                spec = importlib.util.spec_from_file_location(module_name(), path, loader=loader)
                mod = importlib.util.module_from_spec(spec)
                loader.exec_module(mod)
                _no_brgemm = not mod.brgemm_available()
                _module = None if _no_brgemm else mod
            except (ImportError, OSError) as e:  # a damaged or foreign library: say so once, keep SDPA
                warnings.warn(f"vitkit: not using {path} ({e}); rebuild with `vitkit kernels build`", stacklevel=2)
    return _module


def usable(tokens: int, head_dim: int, queries: int) -> bool:
    """Whether the fast path should call `attention` for this shape (and the kernel is loaded).

    One query (the class-token-only last block) keeps SDPA: packing every key and value for a single row costs more
    than it saves (op alone, `benchmarks/cpu_kernels.py`: from about 4 queries on the kernel wins).
    """
    return queries > 1 and head_dim in HEAD_DIMS and tokens <= MAX_TOKENS and kernel() is not None


def attention(qkv: torch.Tensor, heads: int, queries: int, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for the first `queries` tokens: qkv (B, N, 3·C) bf16 contiguous -> (B, Q, C) bf16.

    q, k, v are the three C-wide thirds of the last dimension, each split into `heads` heads (timm's qkv layout).
    """
    return kernel().attention(qkv, heads, queries, scale)


def trainable(tokens: int, head_dim: int) -> bool:
    """Whether training attention at this shape should run on the kernels (`attention_with_grad`), and they are loaded.

    Same sequence-length bound as inference: at most MAX_TOKENS, past which SDPA's blocked kernel (and its backward)
    catches up (attention_backend.py measures the explicit path losing from ~400 tokens on).
    """
    return head_dim in HEAD_DIMS and tokens <= MAX_TOKENS and kernel() is not None


class _Attention(torch.autograd.Function):
    """softmax(q kᵀ · scale) v with its gradient, both on the kernels: (B, N, 3·C) bf16 qkv -> (B, N, C) bf16.

    The forward keeps the (B, heads, N) log-sum-exps, not the (B, heads, N, N) probabilities: the backward recomputes
    them (as flash attention does), and reads q, k, v, the output and its gradient in place.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        out, lse = kernel().attention_forward(qkv, heads, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qkv, out, lse = ctx.saved_tensors
        dout = dout.to(torch.bfloat16).contiguous()
        return kernel().attention_backward(dout, qkv, out, lse, ctx.heads, ctx.scale), None, None


def attention_with_grad(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """`attention` for all N queries, differentiable: qkv (B, N, 3·C) bf16 contiguous -> (B, N, C) bf16.

    For training (autograd on); the caller has checked `trainable`."""
    return _Attention.apply(qkv, heads, scale)


class _ResidualAdd(torch.autograd.Function):
    """x (fp32) + y (bf16) -> fp32 in one pass; the gradient goes to x as it is and to y in bf16 (as autograd's add
    would hand it back for a bf16 input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kernel().residual_add(x, y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.to(torch.bfloat16)


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y for an fp32 residual stream x and a bf16 branch y (bf16 autocast training): one pass on the kernel
    where it takes them (loaded; contiguous CPU tensors of one shape; not under torch.compile), else x + y."""
    if (
        y.dtype != torch.bfloat16  # first: fp32 models and the bf16-stream inference path leave here
        or x.dtype != torch.float32
        or x.shape != y.shape
        or not (x.is_cpu and y.is_cpu and x.is_contiguous() and y.is_contiguous())
        or torch.compiler.is_compiling()
        or kernel() is None
    ):
        return x + y
    return _ResidualAdd.apply(x, y)


class _LayerNormToBF16(torch.autograd.Function):
    """LayerNorm of an fp32 x with fp32 weight and bias, written out in bf16; the gradients come back in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, rstd = kernel().layer_norm_train(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        dy = grad.to(torch.bfloat16).contiguous()
        dx, dw, db = kernel().layer_norm_train_backward(dy, x, mean, rstd, weight)
        return dx, dw, db, None


def layer_norm_to_bf16(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor | None:
    """`norm(x)` rounded to bf16, in one pass and with its own backward, for bf16 autocast training where the result
    feeds a linear (which would cast it to bf16 anyway); None where the kernel does not take the call: not recording
    gradients, autocast off or not bf16, not an fp32 contiguous CPU x, no fp32 affine, a width that is not a multiple
    of 16, under torch.compile, or the kernels not loaded."""
    w, b = norm.weight, norm.bias
    if not torch.is_grad_enabled() or w is None or b is None or x.shape[-1] % 16 or len(norm.normalized_shape) != 1:
        return None
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    if x.dtype != torch.float32 or w.dtype != torch.float32 or b.dtype != torch.float32:
        return None
    if not (x.is_cpu and x.is_contiguous()) or torch.compiler.is_compiling() or kernel() is None:
        return None
    return _LayerNormToBF16.apply(x, w, b, norm.eps)


def layer_norm(x: torch.Tensor, shape, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """F.layer_norm's arguments, for a contiguous bf16 x on the fast path: the kernel's LayerNorm where it takes
    them (loaded; fp32 weight and bias; width a multiple of 16), else F.layer_norm. Same result within bf16 rounding."""
    mod = kernel()
    if mod is None or weight is None or bias is None or x.shape[-1] % 16:
        return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)
    if weight.dtype != torch.float32 or bias.dtype != torch.float32:  # bf16 weights (low_precision_inference)
        return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)
    return mod.layer_norm(x, weight, bias, eps)


def unsupported_here() -> bool:
    """Whether the kernels are off for a reason of this machine, not of the build: a CPU without AVX-512 BF16, or
    a library that loads but finds no bf16 brgemm in oneDNN. A damaged library is not such a reason."""
    kernel()
    return not cpu_supported() or _no_brgemm


def status() -> str:
    """One line: whether the kernel is in use, and if not, why."""
    if not _enabled:
        return "off (VITKIT_CPU_KERNELS=0)"
    if kernel() is not None:
        return f"in use ({library_path()})"
    if not cpu_supported():
        return "not used: this CPU lacks AVX-512 BF16 (the fast path uses PyTorch's ops)"
    if not library_path().exists():
        return "not built: run `vitkit kernels build` (the fast path uses PyTorch's ops until then)"
    return "built, but oneDNN's bf16 brgemm is unavailable on this CPU (the fast path uses PyTorch's ops)"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """PyTorch's ops (SDPA, F.layer_norm) inside the block (A/B measurements, tests)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
