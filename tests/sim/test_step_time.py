"""Step-time backends (models/step_time.py): one interface on the batch shape, chosen by the run
config's ``step_time`` section; ``linear`` is today's (``profile: NAME`` keeps working), ``aic``
is aiconfigurator-core's estimate, memoised by (bucketed) shape, with a one-line fallback."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from hypothesis import given, settings, strategies as st

from vllm_faultsim.harness.cli import main
from vllm_faultsim.harness.runs.simulate import config_from_dict, simulate, step_time_model
from vllm_faultsim.models import step_time as S
from vllm_faultsim.models.step import StepResult

pytestmark = pytest.mark.sim
HAVE_AIC = importlib.util.find_spec("aiconfigurator_core") is not None
LLAMA8B = {"backend": "aic", "model": "meta-llama/Meta-Llama-3.1-8B", "system": "h200_sxm"}
RUN = {"workload": {"kind": "poisson", "rate": 20, "duration": 3, "prompt": 256, "output": 32}, "seed": 3}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 600), st.integers(0, 900), st.integers(1, 900)), min_size=1, max_size=20))
def test_batch_shape_agrees_with_the_linear_shape(rows):
    res = StepResult(sched={f"r{i}": n for i, (n, _, _) in enumerate(rows)},
                     computed_before={f"r{i}": b for i, (_, b, _) in enumerate(rows)},
                     prompt_len={f"r{i}": p for i, (_, _, p) in enumerate(rows)})
    npf, spt, spkv, nd, dkv = res.batch_shape()
    prefill, decode, context = res.shape()
    assert (spt, nd, spkv + dkv) == (prefill, decode, context) and npf + nd == len(rows)
    lin = S.load_profile("default")
    assert lin.of_step(res) == lin(*res.shape()) == lin.batch_seconds(res.batch_shape())


def test_profile_and_a_linear_section_give_the_same_trace():
    a = simulate(config_from_dict({**RUN, "profile": "h100-tiny-llama"}))
    b = simulate(config_from_dict({**RUN, "step_time": {"backend": "linear", "profile": "h100-tiny-llama"}}))
    strip = lambda evs: [e for e in evs if e["kind"] != "header"]  # noqa: E731
    assert strip(a.events) == strip(b.events)
    assert "step_time" not in config_from_dict(RUN).to_dict()  # no section: headers as before


def test_scale_multiplies_the_step_time():
    slow = step_time_model(config_from_dict({**RUN, "step_time": {"backend": "linear", "scale": 2.0}}))
    shape = (1, 300, 0, 5, 2000)
    assert slow.batch_seconds(shape) == pytest.approx(2 * S.load_profile("default").batch_seconds(shape))


@pytest.mark.parametrize("section, needle", [
    ({"backend": "roofline"}, "step_time.backend: must be one of linear, aic (got 'roofline')"),
    ({"backend": "aic"}, "step_time: model is missing (a config aiconfigurator ships"),
    ({"backend": "aic", "model": "x", "tp": "2"}, "step_time.tp: must be an integer (got '2')"),
    ({"backend": "linear", "model": "x"}, "step_time: unknown field 'model' (fields: backend, profile, scale, decode_scale)"),
    ({"backend": "linear", "scale": 0}, "step_time.scale: must be > 0 (got 0)"),
])
def test_bad_sections_are_one_line_errors(tmp_path, capsys, section, needle):
    import yaml
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**RUN, "step_time": section}))
    assert main(["run", "--config", str(cfg), "--trace", str(tmp_path / "t.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_missing_package_falls_back_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiconfigurator_core", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "aiconfigurator_core.sdk", None)
    monkeypatch.setattr(S, "_BUILT", {})
    said = []
    model = S.from_config(S.check_section({**LLAMA8B, "fallback": "h100-tiny-llama"}), warn=said.append)
    assert model == S.load_profile("h100-tiny-llama")
    assert len(said) == 1 and "aiconfigurator-core is not installed" in said[0] and "'h100-tiny-llama'" in said[0]


@pytest.mark.skipif(not HAVE_AIC, reason="aiconfigurator-core not installed (pip install aiconfigurator-core==0.12.0)")
def test_aic_estimates_an_h200_forward_and_memoises_it():
    m = S.from_config(S.check_section(LLAMA8B))
    assert isinstance(m, S.AicStepTime)
    decode8 = m.batch_seconds((0, 0, 0, 8, 8 * 700))
    assert 0.003 < decode8 < 0.008  # recipes/aic_step_time.py saw ~5.0 ms
    assert m.batch_seconds((1, 2048, 0, 0, 0)) > 4 * m.batch_seconds((1, 512, 0, 0, 0)) * 0.8
    n = len(m._memo)
    for kv in range(5600, 5640):  # one bucket (1/64 of 4096 = 64 tokens wide)
        m.batch_seconds((0, 0, 0, 8, kv))
    assert len(m._memo) - n <= 2
    exact = S.AicStepTime({**S.check_section(LLAMA8B), "kv_bucket": False})
    for kv in (5000, 70_000, 300_001):
        assert m.batch_seconds((0, 0, 0, 64, kv)) == pytest.approx(exact.batch_seconds((0, 0, 0, 64, kv)), rel=0.02)
    assert S.from_config(S.check_section(LLAMA8B)) is m  # built once per process


@pytest.mark.skipif(not HAVE_AIC, reason="aiconfigurator-core not installed (pip install aiconfigurator-core==0.12.0)")
def test_aic_without_data_for_the_model_falls_back_with_one_line():
    said = []
    model = S.from_config(S.check_section({**LLAMA8B, "model": "no-such-org/NoSuchModel"}), warn=said.append)
    assert model == S.load_profile("default")
    assert len(said) == 1 and "no estimate for model 'no-such-org/NoSuchModel'" in said[0]
    assert "falling back to the linear profile 'default'" in said[0] and "\n" not in said[0]


@pytest.mark.skipif(not HAVE_AIC, reason="aiconfigurator-core not installed (pip install aiconfigurator-core==0.12.0)")
def test_a_run_with_the_aic_backend():
    res = simulate(config_from_dict({**RUN, "step_time": LLAMA8B}))
    steps = [e for e in res.events if e["kind"] == "step" and e["sched"]]
    assert res.summary["finished"] == res.summary["requests"] > 0
    assert 0.002 < sorted(e["dur"] for e in steps)[len(steps) // 2] < 0.05
