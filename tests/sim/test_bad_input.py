"""Bad input (issue 15, items 1-2): every invalid input to the CLI exits 2 with one line on stderr
that names the file or option and the value, no traceback, and nothing written (no trace, no
partial trace, no study folder). Hypothesis generates the invalid inputs of every kind."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vllm_faultsim.harness.cli import main

pytestmark = pytest.mark.sim

GOOD_WL = {"kind": "poisson", "rate": 5, "duration": 2, "prompt": 64, "output": 8}
NONFINITE = st.sampled_from([math.inf, -math.inf, math.nan, 1e400])
BAD_NUMBER = st.one_of(NONFINITE, st.floats(max_value=0, allow_nan=False, allow_infinity=False),
                       st.sampled_from(["x", [1], {"a": 1}, True]))
# a value no numeric field takes (those >= 0 included): not finite, negative, or not a number
NEVER = st.one_of(NONFINITE, st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
                  st.sampled_from(["x", [1], {"a": 1}, True]))


def _yaml(d) -> str:
    import yaml
    return yaml.safe_dump(d)


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# (kind, files {name: text or bytes}, argv with {dir} for the folder)
BINARY = st.sampled_from([b"\xff\xfe\x00a\x00b", "kind: x".encode("utf-16"), b"\x00\x9f\x92\x96binary"])


@st.composite
def bad_inputs(draw):
    kind = draw(st.sampled_from([
        "binary", "config_field", "workload_field", "workload_number", "mm", "jsonl", "study", "cli_number",
        "out_path", "admission", "plan_mismatch", "plan_field", "section", "deploy", "search", "trace", "recording",
        "trace_format"]))
    if kind in SCHEMA_KINDS:
        return SCHEMA_KINDS[kind](draw)
    if kind == "plan_mismatch":
        fault = draw(st.sampled_from([
            {"kind": "kv_transfer_slow", "start": 0, "end": 1, "factor": 3}, {"kind": "kv_transfer_fail", "start": 0, "end": 1},
            {"kind": "ec_prefetch_stall", "item": "*", "delay": 0.2}, {"kind": "ec_prefetch_fail", "item": "img3"},
            {"kind": "slow_link", "start": 0, "end": 1, "factor": 2}]))
        return kind, {"plan.yaml": _yaml({"version": 1, "faults": [fault]})}, ["run", "--duration", "1", "--plan",
                                                                               "{dir}/plan.yaml"]
    if kind == "binary":
        blob = draw(BINARY)
        where = draw(st.sampled_from(["--plan", "--config", "--workload", "--spec", "check-plan", "--profile"]))
        name = "in.json" if where == "--profile" else "in.yaml"
        argv = {"--plan": ["run", "--plan"], "--config": ["run", "--config"], "--workload": ["run", "--workload"],
                "--spec": ["study", "--out", "{dir}/study", "--spec"], "check-plan": ["check-plan"],
                "--profile": ["run", "--profile"]}[where]
        return kind, {name: blob}, argv + ["{dir}/" + name]
    if kind == "config_field":
        cfg = draw(st.sampled_from([
            {"ec_policy": "whatever"}, {"workload": [1]}, {"workload": "poisson"}, {"seed": "one"},
            {"seed": 1.5}, {"profile": 3}, {"nonsense": 1}, {"scheduler": {"max_num_seqs": "many"}},
            {"workload": {**GOOD_WL, "promt": 64}}, {"workload": {"kind": "bursty", "rate_high": 5}},
            {"workload": {"kind": "nope"}}]))
        return kind, {"run.yaml": _yaml(cfg)}, ["run", "--config", "{dir}/run.yaml"]
    if kind == "workload_field":
        field = draw(st.sampled_from(["rate", "duration", "num_requests"]))
        wl = {**GOOD_WL}
        if field == "num_requests":
            wl.pop("duration")
            wl["num_requests"] = draw(st.one_of(st.integers(max_value=0), st.sampled_from([1.5, "x", 10**9])))
        else:
            wl[field] = draw(BAD_NUMBER)
        return kind, {"run.yaml": _yaml({"workload": wl}).replace(".inf", ".inf")}, ["run", "--config", "{dir}/run.yaml"]
    if kind == "workload_number":
        which = draw(st.sampled_from(["sigma", "median", "uniform"]))
        prompt = {"sigma": {"lognormal": {"median": 64, "sigma": draw(st.floats(max_value=-1e-6, allow_nan=False,
                                                                                  allow_infinity=False))}},
                  "median": {"lognormal": {"median": draw(st.sampled_from([0, -3, math.inf])), "sigma": 0.5}},
                  "uniform": {"uniform": draw(st.sampled_from([[1], [5, 2], [0, 3], "x"]))}}[which]
        return kind, {"run.yaml": _yaml({"workload": {**GOOD_WL, "prompt": prompt}})}, ["run", "--config", "{dir}/run.yaml"]
    if kind == "mm":
        mm = draw(st.sampled_from([
            {"prefetch": {"uniform": [1]}}, {"prefetch": -0.5}, {"prefetch": {"uniform": [0.3, 0.1]}},
            {"fraction": 2}, {"fraction": math.nan}, {"tokens": 0}, {"size": 3}, [1], "img"]))
        return kind, {"run.yaml": _yaml({"workload": {**GOOD_WL, "mm": {"fraction": 0.5, **mm} if isinstance(mm, dict)
                                                      else mm}})}, ["run", "--config", "{dir}/run.yaml"]
    if kind == "jsonl":
        good = {"arrival": 0.1, "prompt_tokens": 16, "output_tokens": 4}
        bad = draw(st.sampled_from([
            '{"arrival": NaN, "prompt_tokens": 16, "output_tokens": 4}',
            '{"arrival": Infinity, "prompt_tokens": 16, "output_tokens": 4}',
            {**good, "arival": 1}, {**good, "prompt_tokens": 0}, {**good, "arrival": -1},
            {**good, "mm": [{"id": "a", "offset": 0, "length": 4, "prefetch": -1}]},
            "not json", [1, 2]]))
        return kind, {"w.jsonl": _jsonl([good, bad])}, ["run", "--workload", "{dir}/w.jsonl"]
    if kind == "study":
        spec = draw(st.sampled_from([
            {"base": {"workload": GOOD_WL}, "grid": {"workload.rate": 5}},
            {"base": {"workload": GOOD_WL}, "grid": {"workload.rate": []}},
            {"base": {"workload": GOOD_WL}, "grid": {"workload.rate": [5]}, "plns": {}},
            {"base": {"workload": GOOD_WL}, "grid": {"workload.rate": [5, math.inf]}},
            {"base": [1], "grid": {}}]))
        return kind, {"s.yaml": _yaml(spec)}, ["study", "--spec", "{dir}/s.yaml", "--out", "{dir}/study"]
    if kind == "cli_number":
        opt = draw(st.sampled_from(["--rate", "--duration"]))
        val = draw(st.sampled_from(["1e400", "inf", "nan", "-1", "0", "1e9"]))
        return kind, {}, ["run", opt, val]
    if kind == "out_path":
        which = draw(st.sampled_from(["missing", "folder", "device", "proc", "study_file"]))
        if which == "study_file":
            return kind, {"f.txt": "x"}, ["study", "--out", "{dir}/f.txt"]
        trace = {"missing": "{dir}/no/such/t.jsonl", "folder": "{dir}", "device": "/dev/full",
                 "proc": "/proc/t.jsonl"}[which]
        return kind, {}, ["run", "--duration", "1", "--trace", trace]
    which = draw(st.sampled_from(["too_long", "equal", "kv"]))
    row = {"too_long": {"arrival": 0, "prompt_tokens": 300, "output_tokens": 4},
           "equal": {"arrival": 0, "prompt_tokens": 256, "output_tokens": 4},
           "kv": {"arrival": 0, "prompt_tokens": 200, "output_tokens": 40}}[which]
    return kind, {"w.jsonl": _jsonl([row])}, ["run", "--workload", "{dir}/w.jsonl", "--max-model-len", "256",
                                              "--num-gpu-blocks", "8", "--block-size", "16",
                                              "--max-num-batched-tokens", "256"]


def _plan_field(draw):
    fault = dict(draw(st.sampled_from([{"kind": "kill_engine", "at": 1}, {"kind": "slow_steps", "start": 1, "end": 2, "factor": 2},
                                      {"kind": "ec_prefetch_stall", "delay": 0.2}, {"kind": "eplb_rank_death"}])))
    key = draw(st.sampled_from(sorted(set(fault) - {"kind"}) + ["rank", "bogus"]))
    fault[key] = draw(NEVER)
    return "plan_field", {"plan.yaml": _yaml({"faults": [fault]})}, ["run", "--duration", "1", "--plan", "{dir}/plan.yaml"]


def _section(draw):
    """A run config section with one bad value: scheduler, kv_offload, eplb, or the top level."""
    section, key = draw(st.sampled_from([("scheduler", "max_num_seqs"), ("scheduler", "block_size"),
                                         ("kv_offload", "num_cpu_chunks"), ("kv_offload", "bandwidth"),
                                         ("kv_offload", "latency"), ("eplb", "layers"), ("eplb", "contention"),
                                         ("seed", None), ("ec_policy", None)]))
    value = draw(NEVER)
    cfg = {"workload": GOOD_WL, "scheduler": {"enable_prefix_caching": True, "async_scheduling": False}}
    cfg[section] = value if key is None else {**cfg.get(section, {}), key: value}
    return "section", {"run.yaml": _yaml(cfg)}, ["run", "--config", "{dir}/run.yaml"]


def _deploy(draw):
    spec = draw(st.sampled_from([
        {"deployment": {"servers": draw(NEVER)}}, {"deployment": {"retry": {"backoff_multiplier": 0.5}}},
        {"deployment": {"slo": {"ttft_ms": draw(NEVER)}}}, {"deployment": {"router": "random"}},
        {"fault_rates": {"ec_prefetch_fail_rate": draw(NEVER)}}, {"fault_rates": {"kill_signal": "SIGHUP"}},
        {"run": {"workload": {**GOOD_WL, "rate": draw(NEVER)}}}, {"replicas": 2}, [1]]))
    return "deploy", {"d.yaml": _yaml(spec)}, ["deploy", "--spec", "{dir}/d.yaml", "--trace", "{dir}/t.jsonl"]


SEARCH = {"model": "meta-llama/Meta-Llama-3.1-8B", "workload": GOOD_WL,
          "slo": {"ttft_ms": {"percentile": 90, "max": 150}}, "space": {"system": ["h100_sxm"], "max_num_seqs": [2]}}


def _search(draw):
    bad = draw(NEVER)
    spec = draw(st.sampled_from([
        {**SEARCH, "slo": {"ttft_ms": {"percentile": bad, "max": 150}}}, {**SEARCH, "slo": {"availability": bad}},
        {**SEARCH, "slo": {}}, {**SEARCH, "space": {"system": ["h100_sxm"], "max_num_seqs": [bad]}},
        {**SEARCH, "gpu_memory_utilization": bad}, {**SEARCH, "cost_per_gpu_hour": {"h100_sxm": bad}},
        {**SEARCH, "model": ""}, {k: v for k, v in SEARCH.items() if k != "slo"}]))
    return "search", {"s.yaml": _yaml(spec)}, ["search", "--spec", "{dir}/s.yaml", "--out", "{dir}/search"]


def _trace(draw):
    """A trace given to plot or diff --traces that breaks the schema: one event changed."""
    head = {"kind": "header", "schema": "vllm-faultsim.trace/1", "side": "sim", "seed": 0, "config": {}}
    step = {"kind": "step", "step": 0, "t": 0.0, "dur": 0.01, "sched": {"r0": 4}}
    req = {"kind": "req", "req": "r0", "status": "length", "arrival": 0.0, "first_token": 0.01, "finish": 0.02,
           "num_output": 1, "preemptions": 0}
    events = [head, step, req, {"kind": "end", "t": 0.02}]
    i, key = draw(st.sampled_from([(0, "schema"), (0, "seed"), (1, "dur"), (1, "sched"), (1, "kind"), (2, "status"),
                                   (2, "arrival"), (3, "t")]))
    events[i] = {**events[i], key: draw(st.sampled_from(["stepp", {"r0": 0}, None, [1], True, math.inf, math.nan]))}
    text = "".join(json.dumps(e) + "\n" for e in events)
    argv = draw(st.sampled_from([["plot", "{dir}/t.jsonl", "--out", "{dir}/t.png"],
                                 ["diff", "--traces", "{dir}/t.jsonl", "{dir}/t.jsonl"]]))
    return "trace", {"t.jsonl": text}, argv


def _recording(draw):
    """A recording given to ``fidelity`` with one field of one line made invalid (NEVER: non-finite,
    negative, ill-typed) or one unknown field added."""
    head = {"kind": "header", "format": "vllm-faultsim.recording/1", "model": "llama-3.1-8b", "gpu": "NVIDIA H200",
            "tensor_parallel_size": 1, "dtype": "bfloat16", "vllm": "0.26.0", "torch": "2.11.0", "driver": "580",
            "device": "1x H200", "entry_point": "AsyncLLM",
            "workload": {"rate": 2.0, "n": 1, "prompt_tokens": [64, 64], "output_tokens": [4, 4], "seed": 0},
            "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 8192, "max_model_len": 4096, "block_size": 16,
                       "enable_prefix_caching": True, "async_scheduling": True, "enforce_eager": False,
                       "gpu_memory_utilization": 0.92, "num_gpu_blocks": 5000}}
    req = {"kind": "request", "id": "r0", "arrival": 0.0, "prompt_tokens": 64, "output_tokens": 4,
           "first_token": 0.02, "finish": 0.05}
    step = {"kind": "step", "i": 0, "num_prefill_requests": 1, "sum_prefill_tokens": 64, "sum_prefill_kv_tokens": 0,
            "num_decode_requests": 0, "sum_decode_kv_tokens": 0, "total_tokens": 64, "schedule_start": 0.001,
            "schedule_end": 0.002, "output_start": 0.015, "output_end": 0.016}
    lines = [head, req, step]
    i = draw(st.integers(0, 2))
    key = draw(st.sampled_from(sorted(set(lines[i]) - {"kind"}) + ["bogus_field"]))

    def bad(old):  # a string field takes any string: it gets a non-string
        return draw(st.sampled_from([[1], {"a": 1}, True, 3]) if isinstance(old, str) else NEVER)

    if key in ("workload", "engine"):
        sub = draw(st.sampled_from(sorted(lines[i][key])))
        lines[i] = {**lines[i], key: {**lines[i][key], sub: bad(lines[i][key][sub])}}
    elif key == "bogus_field" and i == 0:  # the header keeps unknown keys: break a field instead
        lines[i] = {**lines[i], "tensor_parallel_size": bad(1)}
    else:
        lines[i] = {**lines[i], key: bad(lines[i].get(key))}
    text = "".join(json.dumps(x) + "\n" for x in lines)
    return "recording", {"r.jsonl": text}, ["fidelity", "{dir}/r.jsonl", "--json", "{dir}/f.json"]


def _trace_format(draw):
    """A public trace file (Azure or BurstGPT CSV, Mooncake JSONL) with one field of one row made
    invalid (or, for Mooncake, a required one missing)."""
    fmt = draw(st.sampled_from(["azure", "burstgpt", "mooncake"]))
    not_count = ["abc", "-5", "1.5", "", "nan", "1e400", "yesterday"]
    if fmt == "mooncake":
        rows = [{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [0, 1]},
                {"timestamp": 1500, "input_length": 300, "output_length": 8}]
        key = draw(st.sampled_from(["timestamp", "input_length", "output_length", "hash_ids"]))
        bad = draw(st.sampled_from({"timestamp": [-1, "x", None, [1], "NaN", "Infinity"],
                                    "input_length": [-3, 3.5, "7", True, None], "output_length": [-1, 2.5, "4", False],
                                    "hash_ids": ["a", [1, "b"], {}, [0.5]]}[key] + ["missing"] * (key != "hash_ids")))
        row = {k: v for k, v in rows[1].items() if k != key}
        if bad != "missing":
            row[key] = bad
        line = json.dumps(row).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
        text = json.dumps(rows[0]) + "\n" + line + "\n"
        name = "t.jsonl"
    else:
        head, good, row = ((["TIMESTAMP", "ContextTokens", "GeneratedTokens"], ["2023-11-16 18:15:46.6805900", "374", "44"],
                            ["2023-11-16 18:15:50.9951690", "396", "109"]) if fmt == "azure" else
                           (["Timestamp", "Model", "Request tokens", "Response tokens", "Log Type"],
                            ["5", "ChatGPT", "472", "18", "Conversation log"], ["45", "GPT-4", "1087", "230", "API log"]))
        col = draw(st.sampled_from([0, 1, 2] if fmt == "azure" else [0, 2, 3]))
        row[col] = draw(st.sampled_from(not_count if col else ["abc", "-5", "", "nan", "inf", "12:00"]))
        text = "".join(",".join(r) + "\n" for r in (head, good, row))
        name = "t.csv"
    files = {name: text, "run.yaml": _yaml({"workload": {"kind": fmt, "path": name}})}
    return "trace_format", files, ["run", "--config", "{dir}/run.yaml"]


SCHEMA_KINDS = {"plan_field": _plan_field, "section": _section, "deploy": _deploy, "search": _search, "trace": _trace,
                "recording": _recording, "trace_format": _trace_format}


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_inputs())
def test_every_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path_factory, capsys, monkeypatch, case):
    kind, files, argv = case
    d = tmp_path_factory.mktemp("bad")
    for name, text in files.items():
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    before = _listing(d)
    monkeypatch.chdir(d)  # the default trace / study folder would land here
    argv = [a.replace("{dir}", str(d)) for a in argv]
    if argv[0] == "run":
        argv += ["--no-progress"]
        if "--trace" not in argv:
            argv += ["--trace", str(d / "trace.jsonl")]
    elif argv[0] in ("study", "deploy", "search"):
        argv += ["--no-progress"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (kind, argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm-faultsim: error: "), (kind, argv, err)
    assert "Traceback" not in err and "__init__()" not in err and "got an unexpected keyword" not in err, err
    assert _listing(d) == before, (kind, argv, _listing(d) - before)  # nothing written, not even a partial trace


def test_bursty_on_off_written_naturally(tmp_path):
    """YAML 1.1 reads a bare ``on:``/``off:`` as booleans: the bursty workload accepts it."""
    (tmp_path / "run.yaml").write_text("workload: {kind: bursty, rate_high: 20, rate_low: 1, on: 1, off: 1, "
                                       "duration: 3, prompt: 32, output: 4}\n")
    assert main(["run", "--config", str(tmp_path / "run.yaml"), "--trace", str(tmp_path / "t.jsonl"),
                 "--no-progress"]) == 0
    assert (tmp_path / "t.jsonl").exists() and not (tmp_path / ".t.jsonl.partial").exists()


def test_prompt_longer_than_max_model_len_uses_vllms_wording(tmp_path, capsys):
    (tmp_path / "w.jsonl").write_text('{"arrival": 0, "prompt_tokens": 300, "output_tokens": 4}\n')
    assert main(["run", "--workload", str(tmp_path / "w.jsonl"), "--max-model-len", "256",
                 "--max-num-batched-tokens", "256", "--trace", str(tmp_path / "t.jsonl"), "--no-progress"]) == 2
    assert ("The decoder prompt (length 300) is longer than the maximum model length of 256"
            in capsys.readouterr().err)


def test_interrupted_trace_refused_by_plot_and_flagged_by_diff(tmp_path, capsys):
    t = tmp_path / "t.jsonl"
    assert main(["run", "--duration", "2", "--trace", str(t), "--no-progress"]) == 0
    cut = tmp_path / "cut.jsonl"
    lines = t.read_text().splitlines()
    cut.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    capsys.readouterr()
    assert main(["plot", str(cut), "--out", str(tmp_path / "p.png")]) == 2
    assert "incomplete trace" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
    assert main(["diff", "--traces", str(t), str(cut)]) == 1
    assert "incomplete" in capsys.readouterr().out


def test_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A write that fails mid-run (ENOSPC) is one line, exit 2, and no trace (not even a partial one)."""
    import errno

    from vllm_faultsim.harness import trace as tr
    real_open = open

    class Full:
        def __init__(self, *a, **k):
            self.fh = real_open(*a, **k)

        def write(self, s):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, n):
            return getattr(self.fh, n)

    monkeypatch.setattr(tr, "open", Full, raising=False)
    code = main(["run", "--duration", "2", "--trace", str(tmp_path / "t.jsonl"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_run_stopped_by_sigterm_leaves_nothing_and_says_so(tmp_path):
    """SIGTERM (what a job runner or ``timeout`` sends) unwinds ``run`` as Ctrl-C does: the partial
    trace is removed, one line on stderr, exit 143. The signal is sent once the partial trace exists
    (the run is under way), never after a fixed time."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "vllm_faultsim.harness.cli", "run", "--duration", "36000", "--rate", "50",
           "--no-progress", "--trace", "t.jsonl"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / ".t.jsonl.partial").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started its trace"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1].strip().splitlines()
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and err == ["vllm-faultsim: terminated (SIGTERM)"], err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_study_keeps_its_points_and_resumes(tmp_path, monkeypatch):
    """A study stopped after two points keeps them (study.csv and the progress file); run again, it
    runs only the rest, and the table equals an uninterrupted run's."""
    from vllm_faultsim.harness.runs import study

    spec = {"base": {"workload": {"kind": "poisson", "rate": 5, "duration": 2, "prompt": 32, "output": 4}},
            "grid": {"workload.rate": [2, 4, 6], "scheduler.max_num_seqs": [4, 8]}, "source": "t"}
    whole = study.run_study(dict(spec), tmp_path / "whole", progress=False)
    calls = []
    real = study.simulate

    def stop_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(study, "simulate", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(dict(spec), tmp_path / "cut", progress=False)
    assert len((tmp_path / "cut" / "study.csv").read_text().splitlines()) == 3  # header + 2 points kept
    ran = []
    monkeypatch.setattr(study, "simulate", lambda *a, **k: ran.append(1) or real(*a, **k))
    assert study.run_study(dict(spec), tmp_path / "cut", progress=False) == whole
    from vllm_faultsim.harness import sweep
    assert len(ran) == len(whole) - 2 and not (tmp_path / "cut" / sweep.CACHE).exists()
    assert (tmp_path / "cut" / "study.csv").read_text() == (tmp_path / "whole" / "study.csv").read_text()


def test_an_overloaded_run_says_so_and_a_stable_one_does_not(tmp_path, capsys):
    """Item 5: arrivals that outpace the engine make TTFT grow with arrival time: the run's summary
    and the study table say ``overloaded``; the same workload at a sustainable rate does not."""
    import json as _json

    from vllm_faultsim.harness.runs import study

    def run(rate):
        assert main(["run", "--rate", str(rate), "--duration", "20", "--prompt", "512", "--output", "128",
                     "--max-num-seqs", "8", "--trace", str(tmp_path / f"t{rate}.jsonl"), "--json",
                     "--no-progress"]) == 0
        return _json.loads(capsys.readouterr().out)

    assert run(80)["overloaded"] is True
    assert run(2)["overloaded"] is False
    rows = study.run_study({"base": {"workload": {"kind": "poisson", "duration": 20, "prompt": 512, "output": 128},
                                     "scheduler": {"max_num_seqs": 8}},
                            "grid": {"workload.rate": [2, 80]}, "source": "t"}, tmp_path / "s", progress=False)
    assert [r["overloaded"] for r in rows] == [False, True]
    assert "overloaded" in (tmp_path / "s" / "study.csv").read_text().splitlines()[0]
