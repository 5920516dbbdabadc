"""Which int8 linear path is fast on this CPU: one ViT block's four linears (qkv, proj, fc1 + GELU, fc2) at ViT-S/16
shapes (197 x batch rows, width 384, MLP 1536), each int8 path against the bf16 ones, interleaved, median of reps.

Every path does what a block would do with it, its own overheads included: the int8 paths quantize their inputs
(from the bf16 stream), add the bias, apply GELU after fc1 and add the residual after proj and fc2.

    bf16 F.linear      bf16 weights, plain F.linear (+ GELU and the adds as separate ops)
    bf16 packed        vitkit's fast path: oneDNN-packed bf16 weights, GELU and the residual adds fused
    ao dynamic ENGINE  torch.ao's quantized::linear_dynamic (fp32 in and out, per-tensor activations found per call)
                       on the fbgemm / x86 / onednn engines
    onednn static      onednn::qlinear_pointwise: uint8 activations with calibrated per-tensor scales, per-channel
                       int8 weights, bf16 out; fc1's GELU output requantized to uint8 for fc2 inside the kernel
    onednn dynamic     the same op with each activation's scale found per call (min/max pass first)
    int_mm per-token   torch._int_mm on int8 activations quantized per row, int32 out, rescaled to bf16

    .venv/bin/python benchmarks/int8_linear.py                    # batch 1 and 32, ~1 min on 2 cores
    .venv/bin/python benchmarks/int8_linear.py --batches 32 --reps 21
    .venv/bin/python benchmarks/int8_linear.py --attention     # also one block's attention: SDPA vs explicit
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vitkit import allocator  # noqa: E402
from vitkit.quant.engine import affine_params, quantize  # noqa: E402

WIDTH, MLP, TOKENS = 384, 1536, 197
SHAPES = {"qkv": (WIDTH, 3 * WIDTH), "proj": (WIDTH, WIDTH), "fc1": (WIDTH, MLP), "fc2": (MLP, WIDTH)}


def per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) fp32 -> (int8 weight, fp32 scale per output channel), symmetric."""
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return quantize(x, 1 / scale, torch.tensor([zero_point + 0.5]))  # vitkit's own (vitkit/quant/engine.py)


def affine_of(x: torch.Tensor) -> tuple[float, int]:
    """Per-tensor uint8 scale and zero point covering x's range (as a min/max observer)."""
    lo, hi = torch.aminmax(x)
    return affine_params(lo.item(), hi.item())


class Block:
    """Weights and inputs of one block's linears at `rows` rows."""

    def __init__(self, rows: int):
        g = torch.Generator().manual_seed(0)
        self.w = {k: torch.randn(o, i, generator=g) * i**-0.5 for k, (i, o) in SHAPES.items()}
        self.b = {k: torch.randn(o, generator=g) * 0.02 for k, (i, o) in SHAPES.items()}
        self.x = F.layer_norm(torch.randn(rows, WIDTH, generator=g), (WIDTH,)).to(torch.bfloat16)  # LN output
        self.res = torch.randn(rows, WIDTH, generator=g).to(torch.bfloat16)  # the residual stream


def bf16_linear(blk: Block) -> Callable[[], torch.Tensor]:
    w = {k: v.to(torch.bfloat16) for k, v in blk.w.items()}
    b = {k: v.to(torch.bfloat16) for k, v in blk.b.items()}
    x, r = blk.x, blk.res

    def run() -> torch.Tensor:
        qkv = F.linear(x, w["qkv"], b["qkv"])
        y = r + F.linear(qkv[:, :WIDTH], w["proj"], b["proj"])
        h = F.gelu(F.linear(x, w["fc1"], b["fc1"]))
        return y + F.linear(h, w["fc2"], b["fc2"])

    return run


def bf16_packed(blk: Block) -> Callable[[], torch.Tensor]:
    lp, reorder = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    w = {k: reorder(v.to(torch.bfloat16)) for k, v in blk.w.items()}
    b = {k: v.to(torch.bfloat16) for k, v in blk.b.items()}
    x, r = blk.x, blk.res

    def run() -> torch.Tensor:
        qkv = lp(x, w["qkv"], b["qkv"], "none", [], "")
        y = lp.binary(qkv[:, :WIDTH].contiguous(), r, w["proj"], b["proj"], "add")
        h = lp(x, w["fc1"], b["fc1"], "gelu", [], "none")
        return lp.binary(h, y, w["fc2"], b["fc2"], "add")

    return run


def ao_dynamic(blk: Block, engine: str) -> Callable[[], torch.Tensor]:
    torch.backends.quantized.engine = engine
    packed = {}
    for k, w in blk.w.items():
        qw, scale = per_channel_int8(w)
        wq = torch._make_per_channel_quantized_tensor(qw, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        packed[k] = torch.ops.quantized.linear_prepack(wq, blk.b[k])
    dyn = torch.ops.quantized.linear_dynamic
    x, r = blk.x.float(), blk.res.float()  # its activations are fp32
    reduce_range = engine in ("fbgemm", "x86")  # as torch.ao's dynamic Linear sets it for these engines

    def run() -> torch.Tensor:
        torch.backends.quantized.engine = engine
        qkv = dyn(x, packed["qkv"], reduce_range)
        y = r + dyn(qkv[:, :WIDTH].contiguous(), packed["proj"], reduce_range)
        h = F.gelu(dyn(x, packed["fc1"], reduce_range))
        return y + dyn(h, packed["fc2"], reduce_range)

    return run


def onednn_linears(blk: Block, static: bool) -> Callable[[], torch.Tensor]:
    """qlinear_pointwise with per-tensor uint8 activations; static: scales from a calibration pass (here, the
    inputs themselves); dynamic: found per call."""
    ql = torch.ops.onednn.qlinear_pointwise
    rows = blk.x.shape[0]
    p = {}
    for k, w in blk.w.items():
        qw, scale = per_channel_int8(w)
        p[k] = (
            torch.ops.onednn.qlinear_prepack(qw, [rows, w.shape[1]]),
            scale,
            torch.zeros_like(scale, dtype=torch.long),
        )
    x, r = blk.x, blk.res
    x_aff = affine_of(x.float())
    qkv_ref = F.linear(x.float(), blk.w["qkv"], blk.b["qkv"])
    o_aff = affine_of(qkv_ref[:, :WIDTH])
    h_aff = affine_of(F.gelu(F.linear(x.float(), blk.w["fc1"], blk.b["fc1"])))
    bf16 = torch.bfloat16

    def run() -> torch.Tensor:
        xa = x_aff if static else affine_of(x)
        qx = quantize_u8(x, *xa)
        qkv = ql(qx, *xa, *p["qkv"], blk.b["qkv"], 1.0, 0, bf16, "none", [], "")
        o = qkv[:, :WIDTH]
        oa = o_aff if static else affine_of(o)
        y = ql.binary(quantize_u8(o, *oa), *oa, *p["proj"], r, blk.b["proj"], 1.0, 0, bf16, 1.0, 0, "add", 1.0,
                      "none", [], "")  # fmt: skip
        if static:  # fc1 writes uint8 at fc2's input scale: GELU and the requantization inside the kernel
            h = ql(qx, *xa, *p["fc1"], blk.b["fc1"], h_aff[0], h_aff[1], torch.uint8, "gelu", [], "none")
            ha = h_aff
        else:
            hf = ql(qx, *xa, *p["fc1"], blk.b["fc1"], 1.0, 0, bf16, "gelu", [], "none")
            ha = affine_of(hf)
            h = quantize_u8(hf, *ha)
        return ql.binary(h, *ha, *p["fc2"], y, blk.b["fc2"], 1.0, 0, bf16, 1.0, 0, "add", 1.0, "none", [], "")

    return run


def int_mm_per_token(blk: Block) -> Callable[[], torch.Tensor]:
    wt = {}
    for k, w in blk.w.items():
        qw, scale = per_channel_int8(w)
        wt[k] = (qw.t().contiguous(), scale)  # _int_mm takes (in, out)

    def linear(x: torch.Tensor, k: str) -> torch.Tensor:
        xs = x.abs().amax(1, keepdim=True).float().clamp_min(1e-8) / 127  # (rows, 1)
        qx = torch.round(x / xs).to(torch.int8)
        acc = torch._int_mm(qx, wt[k][0])  # (rows, out) int32
        return (acc * (xs * wt[k][1]) + blk.b[k]).to(torch.bfloat16)

    x, r = blk.x, blk.res

    def run() -> torch.Tensor:
        qkv = linear(x, "qkv")
        y = r + linear(qkv[:, :WIDTH], "proj")
        h = F.gelu(linear(x, "fc1"))
        return y + linear(h, "fc2")

    return run


def paths(blk: Block) -> dict[str, Callable[[], torch.Tensor]]:
    out = {"bf16 F.linear": bf16_linear(blk), "bf16 packed": bf16_packed(blk)}
    for engine in ("fbgemm", "x86", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            out[f"ao dynamic {engine}"] = ao_dynamic(blk, engine)
    out["onednn static"] = onednn_linears(blk, static=True)
    out["onednn dynamic"] = onednn_linears(blk, static=False)
    out["int_mm per-token"] = int_mm_per_token(blk)
    return out


def reference(blk: Block) -> torch.Tensor:
    x, w, b = blk.x.float(), blk.w, blk.b
    y = blk.res.float() + F.linear(F.linear(x, w["qkv"], b["qkv"])[:, :WIDTH], w["proj"], b["proj"])
    return y + F.linear(F.gelu(F.linear(x, w["fc1"], b["fc1"])), w["fc2"], b["fc2"])


def time_paths(batch: int, reps: int) -> None:
    blk = Block(TOKENS * batch)
    fns = paths(blk)
    ref = reference(blk)
    errors = {name: (fn().float() - ref).abs().max().item() / ref.abs().max().item() for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(reps):
        for name in order:
            t = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t)
        order = order[1:] + order[:1]
    base = statistics.median(samples["bf16 packed"])
    print(f"\nbatch {batch} ({TOKENS * batch} rows), one block's linears, median of {reps}:")
    print(f"  {'path':<20}{'ms':>9}{'vs bf16 packed':>16}{'max err / max':>15}")
    for name, s in sorted(samples.items(), key=lambda kv: statistics.median(kv[1])):
        ms = statistics.median(s) * 1e3
        print(f"  {name:<20}{ms:>9.3f}{base * 1e3 / ms:>15.2f}x{errors[name]:>15.4f}")


def time_attention(batch: int, reps: int) -> None:
    """One block's attention in bf16 at 197 tokens, 6 heads: SDPA against explicit matmul-softmax-matmul (the int8
    plan's choice on CPUs without AMX, vitkit/quant/layers.py)."""
    heads, hd = 6, WIDTH // 6
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, TOKENS, 3, heads, hd, generator=g).to(torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) views, as the plans slice them

    def explicit() -> torch.Tensor:
        q3, k3, v3 = (t.reshape(batch * heads, TOKENS, hd) for t in (q, k, v))
        s = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=hd**-0.5)
        return torch.bmm(s.softmax(dim=-1), v3)

    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "explicit": explicit}
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    line = ", ".join(f"{name} {statistics.median(s) * 1e3:.3f} ms" for name, s in samples.items())
    print(f"\nbatch {batch}, one block's attention (bf16, {TOKENS} tokens, {heads} heads): {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32", help="comma list of batch sizes (197 rows each)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--attention", action="store_true", help="also time SDPA against explicit attention (bf16)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated")
    print(f"malloc: {allocator.configure()}")  # as the vitkit command runs: no page faults on big activations
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {torch.backends.cpu.get_cpu_capability()}"
    )
    with torch.inference_mode():
        for batch in map(int, args.batches.split(",")):
            time_paths(batch, args.reps)
            if args.attention:
                time_attention(batch, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
