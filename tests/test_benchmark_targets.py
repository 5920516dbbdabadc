"""benchmarks/throughput.py states plainly which of the speed targets (docs/speed.md) a run met (bookkeeping only)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _throughput():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `machine`
    try:
        spec = importlib.util.spec_from_file_location("throughput_under_test", BENCH / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _entry(arch, mode, batch, vitkit_ms, ratio=None):
    e = {"arch": arch, "mode": mode, "precision": "bf16", "batch": batch, "ms": {"vitkit": vitkit_ms, "timm": 1.0}}
    if ratio is not None:
        e["ratio"] = ratio
    return e


def test_verdicts_compare_ratios_and_the_latency_bound():
    tp = _throughput()
    results = [
        _entry("ti4_32", "train", 128, 575.0, ratio=1.12),
        _entry("s16_224", "infer", 32, 229.0, ratio=1.61),
        _entry("s16_224", "latency", 1, 15.1, ratio=1.77),
    ]
    verdicts = {v["workload"]: v for v in tp.target_verdicts(results)}
    assert set(verdicts) == {"ti4_32/train/b128/bf16", "s16_224/infer/b32/bf16", "s16_224/latency/b1/bf16"}
    assert verdicts["ti4_32/train/b128/bf16"]["met"] is False  # 1.12x < 4x
    assert verdicts["s16_224/infer/b32/bf16"]["met"] is True  # 1.61x >= 1.6x
    latency = verdicts["s16_224/latency/b1/bf16"]
    assert latency["reached"] == 15.1 and latency["met"] is False  # an absolute bound in ms, not the ratio

    results[2]["ms"]["vitkit"] = 15.0
    assert {v["workload"]: v["met"] for v in tp.target_verdicts(results)}["s16_224/latency/b1/bf16"] is True


def test_a_run_without_the_target_workloads_or_without_peers_states_none():
    tp = _throughput()
    assert tp.target_verdicts([]) == []
    alone = _entry("s16_224", "train", 32, 1162.0)  # vitkit only (`--libs vitkit`): no ratio to judge
    assert tp.target_verdicts([alone]) == []


def test_each_verdict_names_the_peers_it_was_judged_against():
    tp = _throughput()
    (v,) = tp.target_verdicts([_entry("s16_224", "infer", 32, 229.0, ratio=1.94)])
    assert v["peers"] == ["timm"] and v["met"] is True  # a slice against timm alone: the printout says so
