"""The public API (``vllm_faultsim.__all__``) and the pytest plugin: markers, fixtures, replay on failure."""

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_faultsim
from vllm_faultsim.harness import pytest_plugin
from vllm_faultsim.harness.cli import main as cli_main

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = Path(__file__).with_name("test_readme_example.py")
SMALL = {"workload": {"kind": "poisson", "rate": 20, "duration": 3, "prompt": 128, "output": 16}, "seed": 5}
KILL = {"kind": "kill_engine", "at": 1.5, "signal": "SIGKILL"}
MARKERS = ("sim", "diff", "gpu")

USER_NEEDS = {"simulate", "RunConfig", "config_from_dict", "load_config", "FaultPlan", "validate_plan", "load_plan",
              "read_trace", "first_divergence", "Divergence", "request_specs", "workloads", "scheduler_configs",
              "fault_plans", "SchedulerConfig", "RequestSpec"}


# ---- the public API ---------------------------------------------------------------------------

def test_every_exported_name_resolves_and_is_listed():
    assert USER_NEEDS <= set(vllm_faultsim.__all__)
    assert len(set(vllm_faultsim.__all__)) == len(vllm_faultsim.__all__)
    for name in vllm_faultsim.__all__:
        assert getattr(vllm_faultsim, name) is not None, name
        assert name in dir(vllm_faultsim), name
    namespace: dict = {}
    exec("from vllm_faultsim import *", namespace)
    assert set(vllm_faultsim.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vllm_faultsim.nope  # noqa: B018


def test_exports_are_the_implementations():
    from vllm_faultsim.faults import plan
    from vllm_faultsim.harness import strategies, trace
    from vllm_faultsim.harness.checkers import divergence
    from vllm_faultsim.harness.runs import simulate

    assert vllm_faultsim.simulate is simulate.simulate and vllm_faultsim.RunConfig is simulate.RunConfig
    assert vllm_faultsim.validate_plan is plan.validate_plan and vllm_faultsim.read_trace is trace.read_trace
    assert vllm_faultsim.first_divergence is divergence.first_divergence
    assert vllm_faultsim.workloads is strategies.workloads


def test_import_is_light_and_never_imports_torch_or_vllm():
    code = ("import sys, vllm_faultsim, vllm_faultsim.harness.pytest_plugin\n"
            "light = sorted(m for m in sys.modules if m.split('.')[0] in ('simpy', 'hypothesis', 'torch', 'vllm'))\n"
            "[getattr(vllm_faultsim, n) for n in vllm_faultsim.__all__]\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm'))\n"
            "print(light, heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] []"


def test_load_config_reads_the_cli_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("seed: 3\nscheduler: {max_num_seqs: 8}\n"
                                       "workload: {kind: poisson, rate: 5, duration: 1, prompt: 64, output: 4}\n")
    cfg = vllm_faultsim.load_config(tmp_path / "run.yaml")
    assert (cfg.seed, cfg.scheduler.max_num_seqs, cfg.workload["rate"]) == (3, 8, 5)
    (tmp_path / "bad.yaml").write_text("scheduler: {max_num_seqs: 8, seqs: 2}\n")
    with pytest.raises(vllm_faultsim.ConfigError, match=r"bad\.yaml: scheduler: unknown field 'seqs' \(fields: max_num_seqs, "):
        vllm_faultsim.load_config(tmp_path / "bad.yaml")
    with pytest.raises(vllm_faultsim.ConfigError, match="cannot read config"):
        vllm_faultsim.load_config(tmp_path / "missing.yaml")


# ---- the plugin: registration and markers --------------------------------------------------------

def test_plugin_is_registered_through_the_pytest11_entry_point(pytestconfig):
    [ep] = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "vllm_faultsim"]
    assert ep.value == "vllm_faultsim.harness.pytest_plugin"
    assert pytestconfig.pluginmanager.get_plugin("vllm_faultsim") is pytest_plugin


def test_tier_markers_are_declared_once(pytestconfig):
    names = [line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")]
    assert [names.count(m) for m in ("sim", "diff", "gpu")] == [1, 1, 1]


def test_a_user_suite_gets_the_markers_and_fixtures(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.sim
        @pytest.mark.diff
        @pytest.mark.gpu
        def test_markers(faultsim_run, faultsim_plan, faultsim_diff):
            run = faultsim_run({"workload": {"kind": "poisson", "rate": 5, "duration": 1, "prompt": 32, "output": 4}})
            faultsim_diff(run, run)
    """)
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    markers = pytester.runpytest("--markers", "-p", "no:cacheprovider").stdout.str()
    assert [len(re.findall(rf"^@pytest\.mark\.{m}: ", markers, re.M)) for m in MARKERS] == [1, 1, 1]


# ---- faultsim_plan ---------------------------------------------------------------------------------

def test_faultsim_plan_builds_validated_plans(faultsim_plan, tmp_path, request):
    plan = faultsim_plan(KILL, {"kind": "slow_steps", "start": 0, "end": 1, "factor": 2})
    assert isinstance(plan, vllm_faultsim.FaultPlan) and [f.kind for f in plan.faults] == ["kill_engine", "slow_steps"]
    assert plan.faults[0].rank == 0 and plan.faults[0].phase == "any"  # defaults filled in
    assert faultsim_plan([KILL]) == faultsim_plan({"version": 1, "faults": [KILL]}) == faultsim_plan(KILL)
    assert not faultsim_plan() and not faultsim_plan(None)
    (tmp_path / "p.yaml").write_text("faults: [{kind: ec_prefetch_fail}]\n")
    assert faultsim_plan(tmp_path / "p.yaml").faults[0].item == "*"
    with pytest.raises(vllm_faultsim.PlanError) as err:
        faultsim_plan({"kind": "kill_engine", "at": -1})
    assert request.node.nodeid in str(err.value) and "at: must be >= 0 (got -1)" in str(err.value)


# ---- faultsim_run ------------------------------------------------------------------------------------

def _replay(command: str, tmp_path: Path) -> bytes:
    argv = shlex.split(command)
    assert argv[:2] == ["vllm-faultsim", "run"]
    assert cli_main(argv[1:] + ["--no-progress"]) == 0
    return Path(argv[argv.index("--trace") + 1]).read_bytes()


def test_faultsim_run_returns_summary_events_and_a_validated_trace(faultsim_run, faultsim_plan):
    run = faultsim_run(SMALL, faultsim_plan(KILL))
    assert run.summary["requests"] == len(run.specs) == len(run.requests) > 0
    assert run.summary["failed"] > 0 and run.summary == run.events[-1]["summary"]
    assert run.events[0]["kind"] == "header" and run.seed == 5
    assert [e["fault"]["kind"] for e in run.find("fault")] == ["kill_engine"]
    assert len(run.find("proc", event="engine_dead")) == 1
    assert vllm_faultsim.read_trace(run.trace_path) == json.loads(json.dumps(run.events))
    # the same as the API, and the replay command writes the same bytes
    api = vllm_faultsim.simulate(vllm_faultsim.config_from_dict(SMALL), vllm_faultsim.validate_plan([KILL]))
    assert api.events == run.events
    assert _replay(run.command, run.dir) == run.trace_path.read_bytes()


def test_faultsim_run_takes_specs_configs_and_files(faultsim_run, tmp_path):
    specs = [vllm_faultsim.RequestSpec("a", 0.0, 40, 4, (vllm_faultsim.MMItem("img", 0, 16, 0.2),)),
             {"id": "b", "arrival": 0.01, "prompt_tokens": 20, "output_tokens": 3}]
    run = faultsim_run({"scheduler": vllm_faultsim.SchedulerConfig(max_num_seqs=4)}, specs=specs)
    assert sorted(run.requests) == ["a", "b"] and run.config.scheduler.max_num_seqs == 4
    assert any(s.get("deferred") == ["a"] for s in run.steps)  # the image's prefetch defers "a"
    assert (run.dir / "workload.jsonl").exists() and _replay(run.command, run.dir) == run.trace_path.read_bytes()
    again = faultsim_run(run.dir / "run.yaml", run.dir / "plan.yaml")  # the written files are a run's input
    assert again.events == run.events
    cfg = faultsim_run(vllm_faultsim.config_from_dict(SMALL), seed=6, trace=False)
    assert cfg.trace_path is None and cfg.seed == 6 and cfg.events[0]["seed"] == 6


def test_check_trace_rejects_a_broken_trace(faultsim_run, tmp_path):
    run = faultsim_run(SMALL)
    lines = run.trace_path.read_text().splitlines(keepends=True)
    for name, broken in {"no end": lines[:-1], "steps swapped": [lines[0], lines[2], lines[1], *lines[3:]],
                         "a second header": [lines[0], *lines]}.items():
        path = tmp_path / "broken.jsonl"
        path.write_text("".join(broken))
        with pytest.raises(AssertionError, match="invalid trace"):
            pytest_plugin.check_trace(path)
    pytest_plugin.check_trace(run.trace_path, run.events)


# ---- faultsim_diff --------------------------------------------------------------------------------

def test_faultsim_diff_passes_on_equal_traces_and_explains_a_divergence(faultsim_run, faultsim_diff, faultsim_plan):
    a, b = faultsim_run(SMALL), faultsim_run(SMALL)
    faultsim_diff(a, b)
    faultsim_diff(a.trace_path, b.events)
    assert faultsim_diff.first(a, b) is None
    slow = faultsim_run(SMALL, faultsim_plan({"kind": "slow_steps", "start": 1, "end": 2, "factor": 3}))
    div = faultsim_diff.first(a, slow)
    assert isinstance(div, vllm_faultsim.Divergence) and div.where.startswith("step ")
    with pytest.raises(pytest_plugin.FaultsimDivergence) as err:
        faultsim_diff(a, slow.trace_path)
    msg = str(err.value)
    assert err.value.divergence == div and msg.startswith(f"first divergence at {div.where}")
    assert "how to replay:" in msg and a.command in msg  # the run's own replay, and one from the file's header
    [command] = [line.split("replay: ", 1)[1] for line in msg.splitlines()[msg.splitlines().index("how to replay:"):]
                 if line.startswith("  replay: ") and line.split("replay: ", 1)[1] != a.command]
    assert "slow_steps" in msg and _replay(command, slow.dir) == slow.trace_path.read_bytes()


# ---- failures: a wrong expectation fails, and the report says how to replay -------------------------

def test_a_wrong_expectation_fails_and_the_report_says_how_to_replay(pytester):
    pytester.makepyfile(test_wrong="""
        def test_kill_fails_nothing(faultsim_run, faultsim_plan):
            run = faultsim_run({"seed": 4, "workload": {"kind": "poisson", "rate": 20, "duration": 3,
                                                        "prompt": 128, "output": 16}},
                               faultsim_plan({"kind": "kill_engine", "at": 1.5}))
            assert run.summary["failed"] == 0   # wrong: a SIGKILL fails the requests in flight
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "vllm-faultsim: how to replay" in out and "faultsim_run #1 (seed 4):" in out
    assert '"kill_engine"' in out and '"seed": 4' in out
    [command] = re.findall(r"^  replay: (vllm-faultsim run .*)$", out, re.M)
    [trace] = re.findall(r"^  trace:  (\S+)", out, re.M)
    assert _replay(command, pytester.path) == Path(trace).read_bytes()


def test_a_passing_test_prints_no_replay(pytester):
    pytester.makepyfile("""
        def test_ok(faultsim_run):
            faultsim_run({"workload": {"kind": "poisson", "rate": 5, "duration": 1, "prompt": 32, "output": 4}})
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1)
    assert "how to replay" not in result.stdout.str()


def test_a_run_that_raises_is_replayable(pytester):
    pytester.makepyfile("""
        import pytest
        from vllm_faultsim.harness import runs

        def test_raises(faultsim_run, monkeypatch):
            def boom(*a, **k):
                raise RuntimeError("the engine loop blew up")
            monkeypatch.setattr(runs.simulate, "run_engine", boom)
            faultsim_run({"seed": 9, "workload": {"kind": "poisson", "rate": 5, "duration": 1, "prompt": 32,
                                                  "output": 4}})
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "the engine loop blew up" in out and "faultsim_run #1 (seed 9):" in out and "replay: vllm-faultsim run" in out


# ---- the README's example ---------------------------------------------------------------------------

def _readme_blocks() -> list[str]:
    """The Python blocks of the README's section on the API and the plugin."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## In your own tests", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_shows_the_example_the_sim_tier_runs():
    assert _readme_blocks()[-1] == EXAMPLE.read_text(encoding="utf-8")


def test_the_readme_api_snippet_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "run.yaml").write_text(json.dumps(SMALL))
    (tmp_path / "plan.yaml").write_text(json.dumps({"faults": [KILL]}))
    monkeypatch.chdir(tmp_path)
    exec(_readme_blocks()[0], {})
    assert capsys.readouterr().out.endswith(" failed\n") and (tmp_path / "trace.jsonl").exists()


WRONG = {  # a deliberately wrong expectation in each example test, which must then fail
    "test_engine_death_fails_every_in_flight_request_and_loses_none":
        ('assert after["status"] == "failed"', 'assert after["status"] == "length"'),
    "test_ec_prefetch_stalls_defer_but_never_starve":
        ('assert step["t"] < run.requests[rid]["first_token"]', 'assert step["t"] > run.requests[rid]["first_token"]'),
}


@pytest.mark.parametrize("test", sorted(WRONG))
def test_the_readme_example_fails_on_a_wrong_expectation(pytester, test):
    right, wrong = WRONG[test]
    source = EXAMPLE.read_text(encoding="utf-8")
    assert source.count(right) == 1
    pytester.makepyfile(test_example=source.replace(right, wrong))
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", test)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1 and "passed" not in outcomes, result.stdout.str()
    assert "vllm-faultsim: how to replay" in result.stdout.str()
