"""Engine-process deaths: real OS processes (and Ray actors) under vLLM 0.26.0's engine
managers, liveness monitors, client and shutdown code, against the simulator.

Per case time is printed (pytest -s, or -rP); the MP matrix is 30 cases of ~2 s on 2 cores.
"""

from __future__ import annotations

import os
import statistics

import pytest

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e '.[vllm]')")

from vllm_faultsim.faults.plan import validate_plan  # noqa: E402
from vllm_faultsim.harness.drivers import real_procs  # noqa: E402
from vllm_faultsim.harness.runs.procs import replay_command, run_fault_matrix, simulate_procs  # noqa: E402
from vllm_faultsim.harness.checkers.procs import classify, compare, compare_latency, latencies  # noqa: E402
from vllm_faultsim.models.engine_procs import MUTANTS, LatencyModel, ProcScenario  # noqa: E402
from vllm_faultsim.models.shutdown_drain import ConnectorOp  # noqa: E402

BUSY = 0.75  # load average per CPU above which latency figures are not comparable


def _print(report) -> None:
    print()
    for c in report.cases:
        print(f"  {c.case.name:28s} {c.seconds:5.2f} s  {'ok' if not c.divergences else c.divergences}")
    print(report.summary())


def test_fault_matrix_is_classified_identically_and_every_mutant_is_caught(tmp_path):
    report = run_fault_matrix(out_dir=tmp_path, log=lambda line: None)
    _print(report)
    first = next((c for c in report.cases if c.divergences), None)
    assert first is None, (f"{first.case.name}: {first.divergences}\nreplay: "
                           f"{replay_command(first.case, report.policy, report.seed)}")
    assert report.code0_naming["ok"], report.code0_naming
    assert all(report.mutants.values()), report.mutants
    assert set(report.mutants) == set(MUTANTS)


def test_drain_bounded_by_the_manager_timeout_for_real():
    """An EC operation longer than shutdown(procs, timeout=None)'s 5 s: killed, lost."""
    sc = ProcScenario(ops=(ConnectorOp(0, "ec", "worker", "slow", 0.25, 8.0),
                           ConnectorOp(0, "kv", "scheduler", "quick", 0.25, 0.9)),
                      duration=7.0, probe_at=6.5)
    plan = validate_plan([{"kind": "kill_engine", "at": 0.45, "rank": 1, "signal": "SIGKILL"}])
    real = real_procs.run_case(sc, plan)
    sim = simulate_procs(sc, plan)
    assert not compare(sim, real), (compare(sim, real), "replay: pytest tests/diff/test_procs_diff.py -k drain_bounded")
    c = classify(real)
    assert c["exits"] == {0: -9, 1: -9} and c["ops"]["0.worker.ec"]["lost"] == 1
    assert c["ops"]["0.scheduler.kv"]["drain"] == 1


def test_detection_latency_p50_matches_the_model():
    """The model's p50 within +-25% of the measured one (SIGKILL and exit 0 pooled: on this 2-core
    host both are bimodal, ~15 ms and ~23 ms, and a dozen kills per cause can land either side).
    The packaged profile was measured on another host: it is re-based on this one by the bare
    fork-teardown time of this process (the engine cores are its forks; no vLLM involved), so what
    is checked is the rest of the model (sentinel wake-up, the real monitor starting the
    shutdown). A batch of 24 kills whose p50 misses is followed by another, up to three, each
    judged alone and pooled with the ones before: a p50 that is the other mode by chance does not
    fail CI, a model off the host's latencies misses every batch. Latencies stretch on a loaded
    machine (the dying process's teardown and the monitor thread wait for a CPU): a miss on a
    busy machine is a skip that shows the figures."""
    sc = ProcScenario(dp_size=2, step=0.1, busy=((0.1, 0.5), (0.1, 0.5)), ops=(), duration=0.8, probe_at=0.7)
    profile = LatencyModel.load()
    batches: list[str] = []
    every: list[tuple[str, float]] = []
    every_teardown: list[float] = []
    for _ in range(3):
        measured, teardowns = [], []
        for i in range(12):
            teardowns += [real_procs.fork_teardown_s(1) for _ in range(2)]  # beside the kills: the same conditions
            for signal in ("SIGKILL", "exit0"):
                plan = validate_plan([{"kind": "kill_engine", "at": 0.2 + 0.02 * i, "rank": i % 2, "signal": signal}])
                measured += latencies(real_procs.run_case(sc, plan))
        every += measured
        every_teardown += teardowns
        rss = real_procs.client_rss_mb()
        judged = [("batch", measured, teardowns)] + ([("pooled", every, every_teardown)] if every != measured else [])
        for name, xs, tds in judged:
            teardown = statistics.median(tds)
            v = compare_latency(profile.on_host(teardown, rss), "mp", xs, rss, pooled=True)["pooled"]
            batches.append(f"{name}: measured p50 {v['measured_p50'] * 1e3:.1f} ms vs model {v['model_p50'] * 1e3:.1f} ms "
                           f"(n={v['n']}; fork teardown {teardown * 1e3:.1f} ms at {rss:.0f} MB here, "
                           f"{profile.fork_teardown_s * 1e3:.1f} ms at {profile.client_rss_mb:.0f} MB in the profile)")
            print(batches[-1])
            if v["ok"]:
                return
    load = os.getloadavg()[0]
    if load > BUSY * (os.cpu_count() or 1):
        pytest.skip(f"machine busy (load {load:.1f}): {batches}")
    pytest.fail(f"{batches}; if this host differs from the profile's, re-measure: PYTHONPATH=src python "
                "benchmarks/detection_latency.py --backend both --profile src/vllm_faultsim/profiles/liveness_cpu.json")


def test_ray_actor_manager_matrix():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray): the model covers it")
    with real_procs.ray_cluster():
        assert ray.is_initialized()
        report = run_fault_matrix(backend="ray", phases=("mid_step",), log=lambda line: None)
    _print(report)
    assert not ray.is_initialized()
    assert all(not c.divergences for c in report.cases), [(c.case.name, c.divergences) for c in report.cases]
    by = {c.case.name: classify(c.real) for c in report.cases}
    assert by["exit1-mid_step-rank1"]["monitor_error"]  # RayTaskError escapes the monitor
    assert by["SIGKILL-mid_step-rank0"]["detect"][0]["failed"] == 0
