"""Peak memory of one ViT training step with and without activation (gradient) checkpointing.

Each setting runs in a fresh subprocess and reports its peak resident memory (ru_maxrss), so one setting's
allocations cannot hide in the other's. One step = forward + backward under bf16 autocast + AdamW step.

    .venv/bin/python benchmarks/grad_checkpointing_memory.py --model L/16 --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

from machine import cpu_model  # benchmarks/machine.py; scripts run as `python benchmarks/<name>.py`


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def one_step(model_name: str, batch: int, checkpointing: bool) -> dict:
    import torch

    import vitkit

    torch.manual_seed(0)
    model = vitkit.create_model(model_name, num_classes=1000).train()
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    H, W = model.cfg.img_size
    x, y = torch.randn(batch, 3, H, W), torch.randint(0, 1000, (batch,))
    before = rss_mib()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    peak_fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    loss.backward()
    fwd_bwd_s = time.perf_counter() - t0
    peak_fwd_bwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        checkpointing=checkpointing,
        loss=loss.item(),
        rss_before_step_mib=before,
        peak_fwd_mib=peak_fwd,
        grads_mib=sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()) / 2**20,
        peak_fwd_bwd_mib=peak_fwd_bwd,
        peak_step_mib=peak,
        fwd_bwd_s=fwd_bwd_s,
    )


def machine() -> str:
    import torch

    cpu = cpu_model()
    return f"{cpu}, {torch.get_num_threads()} threads, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="L/16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_step(args.model, args.batch, args.child == "on")))
        return
    print(f"machine: {machine()}")
    print(f"model {args.model}, batch {args.batch}, bf16 autocast, forward + backward + AdamW step, fresh process each")
    rows = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--child", setting]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    head = ("checkpointing", "loss", "RSS before", "peak fwd", "peak fwd+bwd", "peak step", "fwd+bwd s")
    print("{:>13} {:>8} {:>11} {:>10} {:>13} {:>10} {:>10}".format(*head))
    for r in rows:
        print(
            f"{'on' if r['checkpointing'] else 'off':>13} {r['loss']:8.4f} {r['rss_before_step_mib']:9.0f}Mi "
            f"{r['peak_fwd_mib']:8.0f}Mi {r['peak_fwd_bwd_mib']:11.0f}Mi {r['peak_step_mib']:8.0f}Mi "
            f"{r['fwd_bwd_s']:10.1f}"
        )
    off, on = rows
    fwd_off = off["peak_fwd_mib"] - off["rss_before_step_mib"]
    fwd_on = on["peak_fwd_mib"] - on["rss_before_step_mib"]
    act_off = off["peak_fwd_bwd_mib"] - off["rss_before_step_mib"]
    act_on = on["peak_fwd_bwd_mib"] - on["rss_before_step_mib"]
    print(f"memory held after forward (activations + bf16 weight cache): {fwd_off:.0f} -> {fwd_on:.0f} MiB")
    print(
        f"forward+backward growth (incl. {off['grads_mib']:.0f} MiB of fp32 gradients): {act_off:.0f} -> "
        f"{act_on:.0f} MiB ({act_on / act_off:.2f}x); whole-step peak {off['peak_step_mib']:.0f} -> "
        f"{on['peak_step_mib']:.0f} MiB; time {on['fwd_bwd_s'] / off['fwd_bwd_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
