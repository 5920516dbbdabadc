"""vitkit.threads: the thread count follows the cores other processes leave free (`--threads auto`).

The load is faked (readings and a clock handed in), so nothing here depends on what else runs on the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitkit import cli, threads
from vitkit.threads import CpuTimes, LoadAdaptiveThreads, busy_elsewhere, choose_threads, parse_threads

from .conftest import run_python, tiny_model


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(("given", "setting"), [("auto", "auto"), (" AUTO ", "auto"), (None, "auto"), ("3", 3), (2, 2)])
def test_parse_threads_takes_auto_or_a_positive_count(given, setting):
    assert parse_threads(given) == setting


@pytest.mark.parametrize("bad", ["0", "-1", "two", "2.0", "", 1.5, 0, True])
def test_parse_threads_refuses_anything_else_saying_what_it_got(bad):
    with pytest.raises(ValueError, match=r"positive whole number or 'auto', got"):
        parse_threads(bad)


# ------------------------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize(
    ("cores", "busy", "threads_"),
    [
        (2, 0.0, 2),  # quiet: every core
        (2, 0.4, 2),  # a light job: more than half of its core is still free
        (2, 0.6, 1),
        (2, 1.0, 1),  # one core held
        (2, 2.0, 1),  # both held: never fewer than one
        (2, 3.5, 1),
        (16, 4.2, 12),
        (1, 0.0, 1),
    ],
)
def test_choose_threads_counts_the_cores_left_free(cores, busy, threads_):
    assert choose_threads(cores, busy) == threads_


def test_busy_elsewhere_takes_this_process_own_time_off():
    before = CpuTimes(busy=10.0, total=20.0, own=1.0)
    after = CpuTimes(busy=13.0, total=22.0, own=2.0)  # 1 s of wall on 2 cores, 3 core-seconds busy, 1 of them ours
    assert busy_elsewhere(before, after, cores=2) == pytest.approx(2.0)
    assert busy_elsewhere(before, before, cores=2) == 0.0  # no time passed: nothing measured
    ours_only = CpuTimes(busy=12.0, total=22.0, own=3.0)  # our time read a tick later than /proc/stat's: not negative
    assert busy_elsewhere(before, ours_only, cores=2) == 0.0


def test_read_cpu_times_reads_the_cores_asked_for(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 100 500 100 0 0 0 0 0\n"
        "cpu0 100 0 50 300 50 0 0 0 0 0\n"
        "cpu1 200 0 50 200 50 0 0 0 0 0\n"
        "intr 12345\n"
        "\n"
    )
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    one = threads.read_cpu_times(cpus={1}, stat=stat)
    both = threads.read_cpu_times(cpus={0, 1}, stat=stat)
    assert (one.busy, one.total) == (2.5, 5.0)  # user + system, in seconds at 100 ticks a second; idle + iowait not
    assert (both.busy, both.total) == (4.0, 10.0)
    assert threads.read_cpu_times(stat=tmp_path / "missing") is None


class FakeMachine:
    """A clock, /proc/stat readings with a chosen load from other processes, and torch's per-thread count."""

    def __init__(self, cores: int = 2):
        self.cores, self.now, self.others, self.times = cores, 0.0, 0.0, CpuTimes(0.0, 0.0, 0.0)
        self.count, self.sets = cores, []

    def run(self, seconds: float, ours: float) -> None:
        """`seconds` of wall time, `ours` cores busy with this process, `self.others` with the rest."""
        t = self.times
        busy = min(self.cores, ours + self.others) * seconds
        self.times = CpuTimes(t.busy + busy, t.total + self.cores * seconds, t.own + ours * seconds)
        self.now += seconds

    def governor(self) -> LoadAdaptiveThreads:
        return LoadAdaptiveThreads(
            self.cores,
            read=lambda: self.times,
            clock=lambda: self.now,
            set_threads=self.set,
            get_threads=lambda: self.count,
        )

    def set(self, n: int) -> None:
        self.count = n
        self.sets.append(n)


def test_auto_drops_to_the_free_cores_and_back_when_the_other_job_ends():
    m = FakeMachine()
    g = m.governor()
    assert g.adapt() == 2 and m.sets == []  # nothing measured yet: every core, nothing to change
    m.others = 2.0  # another job keeps both cores busy
    m.run(0.3, ours=0.0)  # the first window (imports, model loading) has passed
    assert g.adapt() == 1 and m.sets == [1]
    m.run(0.5, ours=1.0)
    assert g.adapt() == 1 and m.sets == [1]  # within the window: not re-measured, not re-set
    m.others = 0.0
    m.run(1.0, ours=1.0)
    assert g.adapt() == 2 and m.sets == [1, 2]


def test_auto_keeps_one_thread_per_free_core_beside_a_one_core_job():
    m = FakeMachine(cores=4)
    g = m.governor()
    m.others = 1.0
    m.run(1.0, ours=3.0)  # our own busy cores are not counted as taken
    assert g.adapt() == 3


def test_auto_applies_the_count_to_each_thread_that_runs_a_forward():
    m = FakeMachine()
    g = m.governor()
    m.others = 2.0
    m.run(1.0, ours=0.0)
    g.adapt()
    m.count = 2  # another thread (a server's worker) still runs torch's count
    assert g.adapt() == 1 and m.sets == [1, 1]


class FakeThrottle:
    def __init__(self):
        self.calls = []

    def set(self, parked: bool) -> None:
        self.calls.append(parked)


def test_auto_keeps_every_core_and_shortens_the_waits_while_others_hold_cores():
    m, throttle = FakeMachine(), FakeThrottle()
    g = LoadAdaptiveThreads(2, throttle, read=lambda: m.times, clock=lambda: m.now, set_threads=m.set,
                            get_threads=lambda: m.count)  # fmt: skip
    m.others = 2.0
    m.run(0.3, ours=0.0)
    assert g.adapt() == 2 and throttle.calls == [True] and m.sets == []
    assert g.adapt(rows=threads.SMALL_FORWARD_ROWS) == 2  # a large forward: both cores, short waits
    assert g.adapt(rows=197) == 1 and m.sets == [1]  # a small one (ViT-S/16 batch 1): the free core alone
    assert g.adapt(rows=None) == 2 and m.sets == [1, 2]
    m.others = 0.0
    m.run(1.0, ours=2.0)
    assert g.adapt() == 2 and throttle.calls == [True, False]
    g.close()
    assert throttle.calls[-1] is False


def test_spin_throttle_parks_one_helper_thread_and_ends_it():
    throttle = threads.SpinThrottle(team=2)
    throttle.set(True)
    helper = throttle._helper
    assert throttle.parked and helper.is_alive()
    throttle.set(True)  # already parked: the same helper
    assert throttle._helper is helper
    throttle.set(False)
    assert not throttle.parked and not helper.is_alive()


@pytest.mark.parametrize(("name", "value"), [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "5"),
                                             ("VITKIT_SPIN_THROTTLE", "0")])  # fmt: skip
def test_spin_throttle_stays_off_where_someone_chose_the_waits(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert not threads.SpinThrottle.works_here()


def test_auto_keeps_its_count_where_the_load_cannot_be_read():
    m = FakeMachine()
    g = LoadAdaptiveThreads(2, read=lambda: None, clock=lambda: m.now, set_threads=m.set, get_threads=lambda: 2)
    m.run(5.0, ours=0.0)
    assert g.adapt() == 2 and m.sets == []


# ------------------------------------------------------------------------------------------------ wiring
def test_configured_sets_the_count_and_gives_the_previous_one_back():
    before = torch.get_num_threads()
    with threads.configured(1) as said:
        assert said == "1 threads" and torch.get_num_threads() == 1 and threads._active is None
    assert torch.get_num_threads() == before and threads._active is None
    with threads.configured("auto") as said:
        assert said.startswith("auto") or "cannot be read" in said
        active = threads._active
        if active is not None and active.throttle is not None:
            active.throttle.set(True)
    assert threads._active is None  # a verb's auto does not outlive it (in-process callers, tests)
    assert active is None or active.throttle is None or not active.throttle.parked
    with pytest.raises(ValueError, match="got 'lots'"):
        threads.configure("lots")


def test_every_cpu_forward_adapts_the_count_once_when_configured(monkeypatch):
    calls = []

    class Spy:
        def adapt(self, rows: int | None = None) -> int:
            calls.append(rows)
            return 1

    model = tiny_model().eval()
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert calls == []  # not configured: the library leaves torch's count alone
    monkeypatch.setattr(threads, "_active", Spy())
    with torch.inference_mode():
        model(torch.randn(3, 3, 32, 32))
    assert calls == [3 * 4 * 4]  # the forward's token rows: 3 images of 4 x 4 patches


def test_every_verb_takes_threads_and_a_bad_value_is_a_clear_error(tmp_path, capsys):
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert all("--threads" in p._option_string_actions for p in verbs.values())
    code = cli.main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "a.jpg"), "--threads", "many"])
    assert code == 1 and "threads must be a positive whole number or 'auto', got 'many'" in capsys.readouterr().err


def test_the_command_runs_each_verb_under_its_thread_setting(monkeypatch, tmp_path):
    seen = []
    real = threads.configured

    def spy(setting):
        seen.append(setting)
        return real(1)

    monkeypatch.setattr(threads, "configured", spy)
    cli.main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "a.jpg")])
    cli.main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "a.jpg"), "--threads", "1"])
    assert seen == ["auto", "1"]


@pytest.mark.slow  # three fresh processes that import torch: ~10-30 s
def test_the_contention_benchmark_runs_and_reports_each_condition(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "contention.py"
    out = tmp_path / "contention.jsonl"
    args = [str(script), "--quick", "--levers", "auto", "--workloads", "b1", "--conditions", "alone,joined"]
    run = run_python([*args, "--retries", "0", "--out", str(out)], timeout=600)
    assert run.returncode == 0, run.stderr
    row = json.loads(out.read_text())["results"]["b1"]["auto"]
    assert set(row) == {"alone", "joined", "ratios"} and row["alone"]["median_s"] > 0
    assert row["alone"]["threads"].startswith("auto") or "cannot be read" in row["alone"]["threads"]
