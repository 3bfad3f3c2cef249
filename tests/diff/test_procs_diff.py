"""Engine-process deaths: real OS processes (and Ray actors) under vLLM 0.26.0's engine
managers, liveness monitors, client and shutdown code, against the simulator.

Per case time is printed (pytest -s, or -rP); the MP matrix is 30 cases of ~2 s on 2 cores.
Only classifications are judged (exit codes, who exited first and is named, shutdown causes and
order, connector drains, probes, the code-0 naming rate): no wall-clock figure. The detection
latency of the model against fresh kills is benchmarks/detection_latency.py's judgement (it prints
and records it); the matrix prints the figures it measured.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e '.[vllm]')")

from vllm_faultsim.faults.plan import validate_plan  # noqa: E402
from vllm_faultsim.harness.drivers import real_procs  # noqa: E402
from vllm_faultsim.harness.runs.procs import like_the_run, replay_command, run_fault_matrix  # noqa: E402
from vllm_faultsim.harness.checkers.procs import classify, fate_differences  # noqa: E402
from vllm_faultsim.harness.mutants import PROCS_MUTANTS  # noqa: E402
from vllm_faultsim.models.engine_procs import LatencyModel, ProcScenario  # noqa: E402
from vllm_faultsim.models.shutdown_drain import ConnectorOp  # noqa: E402


def _print(report) -> None:
    print()
    for c in report.cases:
        verdict = c.divergences or (f"unjudged: {c.unjudged}" if c.unjudged else "ok")
        print(f"  {c.case.name:28s} {c.seconds:5.2f} s  {verdict}")
    print(report.summary())


def _unjudged(report) -> str:
    return "; ".join(f"{c.case.name}: {c.unjudged}" for c in report.unjudged)


def _diverging(report, traces) -> str:
    """Every diverging case, its divergences, the command that replays it and the one that
    re-checks its two traces (kept in ``traces``)."""
    return "\n".join(f"{c.case.name}: {'; '.join(c.divergences)}\n  replay: "
                     f"{replay_command(c.case, report.policy, report.seed, report.backend)}\n  re-check: "
                     f"python -m vllm_faultsim.harness.checkers.procs {traces}/{c.case.name}.sim.jsonl "
                     f"{traces}/{c.case.name}.real.jsonl"
                     for c in report.cases if c.divergences)


def test_fault_matrix_is_classified_identically_and_every_mutant_is_caught(tmp_path):
    """Every case with a valid real run classified identically, the model taking the run's own
    operation times and detection latencies (runs.procs ``like_the_run``). A loaded machine can
    still make a run no valid history for its case (``off_schedule`` / ``on_a_boundary``: a fault,
    the probe or the stop late, an operation never submitted or outliving its planned duration, a
    client call in the death notice's delay, a detection latency within ``GUARD`` of a boundary of
    the model's classification); such a case is re-run, then left unjudged, and a matrix with
    unjudged cases whose mutants are not all caught in the judged ones skips with the reasons."""
    report = run_fault_matrix(out_dir=tmp_path, log=lambda line: None)
    _print(report)
    assert not any(c.divergences for c in report.cases), _diverging(report, tmp_path)
    assert report.code0_naming["ok"], report.code0_naming
    assert set(report.mutants) == set(PROCS_MUTANTS)
    if report.unjudged and not all(report.mutants.values()):
        pytest.skip(f"machine loaded: {len(report.unjudged)}/{len(report.cases)} cases had no valid run "
                    f"({_unjudged(report)}); mutants caught in the judged ones: {report.mutants}")
    assert all(report.mutants.values()), report.mutants


def test_drain_bounded_by_the_manager_timeout_for_real():
    """An EC operation longer than shutdown(procs, timeout=None)'s 5 s: killed, lost."""
    sc = ProcScenario(ops=(ConnectorOp(0, "ec", "worker", "slow", 0.25, 8.0),
                           ConnectorOp(0, "kv", "scheduler", "quick", 0.25, 0.9)),
                      duration=7.0, probe_at=6.5)
    plan = validate_plan([{"kind": "kill_engine", "at": 0.45, "rank": 1, "signal": "SIGKILL"}])
    real = real_procs.run_case(sc, plan)
    sim = like_the_run(sc, plan, "mp-0.26", 0, LatencyModel.load(), real)
    assert not fate_differences(sim, real), (fate_differences(sim, real), "replay: pytest tests/diff/test_procs_diff.py -k drain_bounded")
    c = classify(real)
    assert c["exits"] == {0: -9, 1: -9} and c["ops"]["0.worker.ec"]["lost"] == 1
    assert c["ops"]["0.scheduler.kv"]["drain"] == 1


def test_ray_actor_manager_matrix(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray): the model covers it")
    with real_procs.ray_cluster():
        assert ray.is_initialized()
        report = run_fault_matrix(backend="ray", phases=("mid_step",), out_dir=tmp_path, log=lambda line: None)
    _print(report)
    assert not ray.is_initialized()
    assert not any(c.divergences for c in report.cases), _diverging(report, tmp_path)
    by = {c.case.name: classify(c.real) for c in report.cases if not c.unjudged}
    if "exit1-mid_step-rank1" in by:
        assert by["exit1-mid_step-rank1"]["monitor_error"]  # RayTaskError escapes the monitor
    if "SIGKILL-mid_step-rank0" in by:
        assert by["SIGKILL-mid_step-rank0"]["detect"][0]["failed"] == 0
    if report.unjudged:
        pytest.skip(f"machine loaded: {_unjudged(report)} (the judged cases classified identically)")
