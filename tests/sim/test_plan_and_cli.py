"""Fault-plan validation and the CLI: one-line errors with exit code 2, byte-identical traces."""

import json
import subprocess
import sys

import pytest

from vllm_faultsim.faults.plan import PlanError, load_plan, validate_plan
from vllm_faultsim.harness.cli import main

BAD_PLANS = {
    "unknown kind": ("faults: [{kind: meteor_strike, at: 1}]", "unknown kind 'meteor_strike'"),
    "not modelled": ("faults: [{kind: network_partition}]", "not modelled yet"),
    "negative time": ("faults: [{kind: kill_engine, at: -3}]", "(kill_engine): at: must be >= 0 (got -3)"),
    "missing field": ("faults: [{kind: slow_steps, start: 1, factor: 2}]", "missing field 'end'"),
    "wrong type": ("faults: [{kind: kill_engine, at: soon}]", "at: must be a number (got 'soon')"),
    "bad signal": ("faults: [{kind: kill_engine, at: 1, signal: SIGFOO}]", "must be one of SIGKILL"),
    "end before start": ("faults: [{kind: slow_steps, start: 5, end: 2, factor: 2}]", "(slow_steps): end must be > start (5.0), got 2.0"),
    "unknown field": ("faults: [{kind: ec_prefetch_fail, item: x, when: 3}]", "unknown field 'when'"),
    "not yaml": ("faults: [kind: x", "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_bad_plan_is_one_line_and_exit_2(tmp_path, capsys, name):
    text, expected = BAD_PLANS[name]
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    assert main(["run", "--plan", str(plan), "--duration", "1", "--trace", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "t.jsonl").exists()  # validated before anything runs


def test_bad_plan_from_a_real_process_has_no_traceback(tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"faults": [{"kind": "kill_engine"}]}))
    proc = subprocess.run([sys.executable, "-m", "vllm_faultsim.harness.cli", "check-plan", str(plan)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing field 'at'" in proc.stderr


def test_valid_plan_defaults():
    plan = validate_plan({"faults": [{"kind": "kill_engine", "at": 2.5}]})
    assert plan.faults[0].params == {"at": 2.5, "rank": 0, "signal": "SIGKILL", "phase": "any"}
    with pytest.raises(PlanError):
        load_plan("/nonexistent/plan.yaml")


def test_same_seed_same_trace_bytes(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    args = ["run", "--duration", "5", "--rate", "10", "--seed", "7"]
    assert main(args + ["--trace", str(a)]) == 0
    assert main(args + ["--trace", str(b)]) == 0
    assert main(["run", "--duration", "5", "--rate", "10", "--seed", "8", "--trace", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_bad_config_exit_2(tmp_path, capsys):
    assert main(["run", "--max-num-seqs", "0", "--trace", str(tmp_path / "t.jsonl")]) == 2
    assert "scheduler.max_num_seqs: must be >= 1 (got 0)" in capsys.readouterr().err
    assert main(["run", "--profile", "nope", "--trace", str(tmp_path / "t.jsonl")]) == 2
    assert "unknown step-time profile" in capsys.readouterr().err


def test_study_small_spec(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("""
name: tiny
base: {workload: {kind: poisson, duration: 3.0, prompt: 64, output: 8}}
grid: {workload.rate: [5.0, 10.0]}
plans: {none: [], slow: [{kind: slow_steps, start: 0, end: 2, factor: 3}]}
""")
    assert main(["study", "--spec", str(spec), "--out", str(tmp_path / "o"), "--no-progress", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "throughput_rps" in out and (tmp_path / "o" / "study.csv").read_text().count("\n") == 5


@pytest.mark.parametrize("command", ["procs", "calibrate"])
def test_real_vllm_commands_without_vllm_are_one_line_exit_2(monkeypatch, capsys, command):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    assert main([command, "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vllm-faultsim: error: {command} needs the real vLLM: pip install 'vllm-faultsim[vllm]' (vllm==0.26.0)"


def test_unknown_option_of_a_simulator_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--no-such-option"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_diff_needs_at_least_one_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["diff", "--examples", "0"])
    assert exc.value.code == 2 and "--examples: must be at least 1, got 0" in capsys.readouterr().err


def test_wrongly_typed_scheduler_field_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("scheduler: {max_num_seqs: 'a'}\n")
    assert main(["run", "--config", str(cfg), "--trace", str(tmp_path / "t.jsonl"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"vllm-faultsim: error: {cfg}: scheduler.max_num_seqs: must be an integer (got 'a')"


def test_diff_of_unreadable_traces_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["diff", "--traces", str(bad), str(bad)]) == 2
    assert capsys.readouterr().err.strip().startswith("vllm-faultsim: error: cannot read trace: ")


def test_plot_draws_a_runs_timeline_from_its_trace(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot needs matplotlib (pip install -e '.[plot]')")
    plan, trace = tmp_path / "plan.yaml", tmp_path / "t.jsonl"
    plan.write_text("version: 1\nfaults:\n  - {kind: slow_steps, start: 1, end: 2, factor: 3}\n"
                    "  - {kind: kill_engine, at: 3, rank: 0, signal: SIGTERM}\n")
    assert main(["run", "--duration", "4", "--rate", "10", "--plan", str(plan), "--trace", str(trace), "--no-progress"]) == 0
    assert main(["plot", str(trace)]) == 0
    png = trace.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing.jsonl")]) == 2


def test_plot_without_matplotlib_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    t = tmp_path / "t.jsonl"
    assert main(["run", "--duration", "1", "--trace", str(t), "--no-progress"]) == 0  # a good trace
    capsys.readouterr()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["plot", str(t)]) == 2
    assert capsys.readouterr().err.strip() == "vllm-faultsim: error: plot needs matplotlib: pip install 'vllm-faultsim[plot]'"
