"""SLO search (harness/runs/search.py) and sweeps (harness/sweep.py): the cheapest point found (checked
against every point simulated), pruning counted and sound, same result twice, bad specs exit 2 with
one line, an interrupted search resumes from the cache, Ray and serial runs identical."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from vllm_faultsim.harness import sweep
from vllm_faultsim.harness.cli import main
from vllm_faultsim.harness.runs import search, study

pytestmark = [pytest.mark.sim,
              pytest.mark.skipif(importlib.util.find_spec("aiconfigurator_core") is None,
                                 reason="the search's GPU data: aiconfigurator-core (CPython >= 3.11)")]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

SPEC = {
    "name": "tiny",
    "model": "meta-llama/Meta-Llama-3.1-8B",
    "workload": {"kind": "poisson", "rate": 12.0, "duration": 4.0, "prompt": 256, "output": 32},
    "base": {"seed": 3, "scheduler": {"max_model_len": 4096}},
    "slo": {"ttft_ms": {"percentile": 90, "max": 150}, "tpot_ms": {"percentile": 50, "max": 40}, "goodput": 0.9},
    "space": {"system": ["h100_sxm", "h200_sxm", "b200_sxm"], "max_num_seqs": [2, 64],
              "max_num_batched_tokens": [1024]},
}


def _spec(**over):
    return search.check_search({**SPEC, **over}, "t.yaml")


def test_cheapest_found_and_costlier_points_pruned(tmp_path):
    spec = _spec()
    res = search.run_search(spec, tmp_path, progress=False)
    rows = res["rows"]
    assert len(rows) == 6 and res["simulated"] + res["pruned"] == 6
    # every point, simulated: the search's answer is the cheapest that meets the SLOs
    every = [{**p, **search.search_point(search._payload(p, spec, None))} for p in search.enumerate_points(spec)]
    cheapest = min((p for p in every if p["meets"]), key=lambda p: p["cost_per_hour"])
    best = res["best"]["no faults"]
    assert (best["system"], best["max_num_seqs"]) == (cheapest["system"], cheapest["max_num_seqs"]) == ("h100_sxm", 64)
    assert not any(p["meets"] for p in every if p["max_num_seqs"] == 2 and p["system"] != "b200_sxm")  # missed
    cost_pruned = [r for r in rows if (r["pruned"] or "").startswith("cost")]
    assert len(cost_pruned) == 2 and all(r["system"] == "b200_sxm" for r in cost_pruned)  # the wave: 4 cheapest
    assert (tmp_path / "search.csv").read_text().count("\n") == 7
    assert not (tmp_path / sweep.CACHE).exists()


def test_same_result_twice(tmp_path):
    a = search.run_search(_spec(), tmp_path / "a", progress=False)
    b = search.run_search(_spec(), tmp_path / "b", progress=False)
    assert a["rows"] == b["rows"] and (tmp_path / "a" / "search.csv").read_bytes() == \
        (tmp_path / "b" / "search.csv").read_bytes()


def test_memory_and_capacity_pruning_sound(tmp_path):
    """A 70B model does not fit one H100 (pruned on memory, never simulated); at 100 req/s a point
    whose capacity bound is below the rate is pruned, and simulated anyway it misses the SLOs (the
    bound is an upper bound: the simulated throughput stays under it)."""
    spec70 = search.check_search({**SPEC, "model": "meta-llama/Meta-Llama-3.1-70B",
                                  "space": {"system": ["h100_sxm"], "tensor_parallel_size": [1, 2]}}, "t.yaml")
    pts = search.enumerate_points(spec70)
    assert pts[0]["pruned"].startswith("memory") and pts[0]["tensor_parallel_size"] == 1
    spec = _spec(workload={"kind": "poisson", "rate": 100.0, "duration": 3.0, "prompt": 256, "output": 32})
    res = search.run_search(spec, tmp_path, progress=False)
    cap = [r for r in res["rows"] if (r["pruned"] or "").startswith("capacity")]
    assert {r["max_num_seqs"] for r in cap} == {2} and len(cap) == 3
    p = next(p for p in search.enumerate_points(spec) if p["pruned"] and p["pruned"].startswith("capacity"))
    r = search.search_point(search._payload(p, spec, None))
    assert not r["meets"]
    assert r["throughput_rps"] <= p["capacity_bound_rps"]


@pytest.mark.parametrize("field, value, needle", [
    ("slo", {"ttft_ms": {"percentile": 0, "max": 100}}, "slo.ttft_ms.percentile: must be > 0 (got 0)"),
    ("slo", {"goodput": 0.9}, "slo: goodput counts requests meeting ttft_ms/tpot_ms"),
    ("slo", {"ttft": 1}, "slo: unknown field 'ttft' (fields: ttft_ms, tpot_ms, goodput, availability)"),
    ("space", {"system": "h100_sxm"}, "space.system: must be a list (got 'h100_sxm')"),
    ("space", {"system": ["l40s"]}, "cost_per_gpu_hour.l40s is missing"),
    ("space", {"system": ["h100_sxm"], "max_num_seqs": [0]}, "space.max_num_seqs[0]: must be >= 1 (got 0)"),
    ("space", {"system": ["h100_sxm"], "servers": [1], "data_parallel_size": [1]}, "not both"),
    ("cost_per_gpu_hour", {"h100_sxm": -1}, "cost_per_gpu_hour.h100_sxm: must be > 0 (got -1)"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization: must be <= 1 (got 1.5)"),
    ("workload", {"kind": "poisson", "rate": -1, "duration": 1}, "base/workload"),
    ("colour", "red", "unknown field 'colour' (fields: name, description, model, "),
    ("faults", {"engine_mtbf_s": -5}, "faults.engine_mtbf_s: must be > 0 (got -5)"),
    ("deployment", {"router": "random"}, "deployment.router: must be one of"),
    ("deployment", {"servers": 2}, "deployment.servers: set by the search (space.servers), got 2"),
])
def test_bad_specs_exit_2_with_one_line(tmp_path, capsys, field, value, needle):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPEC, field: value}))
    assert main(["search", "--spec", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and str(path) in err, err
    assert not (tmp_path / "o").exists()


def test_servers_and_faults(tmp_path):
    """Servers behind a router and a fault profile: without faults one server is the cheapest; with
    an engine dying every 10 s on average (restart 2 s) it misses the SLOs and two servers are needed; the
    points that missed without faults are pruned from the fault search, never simulated."""
    spec = _spec(space={"system": ["h100_sxm"], "servers": [1, 2], "max_num_seqs": [2, 64],
                        "max_num_batched_tokens": [1024]},
                 slo={"ttft_ms": {"percentile": 90, "max": 150}, "availability": 0.9},
                 faults={"engine_mtbf_s": 10.0}, deployment={"restart_s": 2.0, "router": "least_outstanding",
                                                            "retry": {"attempts": 3, "backoff_s": 0.5}})
    res = search.run_search(spec, tmp_path, progress=False)
    clean, faulty = res["best"]["no faults"], res["best"]["faults"]
    assert (clean["servers"], clean["max_num_seqs"], clean["gpus"]) == (1, 64, 1)
    assert faulty is not None and faulty["servers"] == 2 and faulty["engine_deaths"] > 0
    skipped = [r for r in res["rows"] if r["pruned"] == "faults: fails without faults"]
    assert skipped and all(r["max_num_seqs"] == 2 for r in skipped)
    one = next(r for r in res["rows"] if r["scenario"] == "faults" and r["servers"] == 1 and not r["pruned"])
    assert not one["meets"] and one["availability"] < 0.9


def test_interrupted_search_resumes_from_the_cache(tmp_path, monkeypatch):
    spec = _spec()
    whole = search.run_search(spec, tmp_path / "whole", progress=False)
    real, calls = search.simulate_deployment, []

    def stop_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(search, "simulate_deployment", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(spec, tmp_path / "cut", progress=False)
    assert len((tmp_path / "cut" / sweep.CACHE).read_text().splitlines()) == 2
    ran = []
    monkeypatch.setattr(search, "simulate_deployment", lambda *a, **k: ran.append(1) or real(*a, **k))
    again = search.run_search(spec, tmp_path / "cut", progress=False)
    assert len(ran) == whole["simulated"] - 2 and again["ran"] == len(ran)
    assert again["rows"] == whole["rows"] and not (tmp_path / "cut" / sweep.CACHE).exists()


def test_sweep_cache_ignores_a_cut_line_and_says_serial(tmp_path):
    notes = []
    configs = [{"x": i} for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        with sweep.Sweep(tmp_path, workers=1, progress=False, note=notes.append) as sw:
            sw.map(_double_or_stop, configs + [{"x": -1}])
    assert len(notes) == 1 and "serially" in notes[0]
    with open(tmp_path / sweep.CACHE, "a") as fh:
        fh.write('{"key": "abc", "resu')  # the line being written when it stopped
    with sweep.Sweep(tmp_path, workers=1, progress=False, note=notes.append) as sw:
        assert sw.map(_double_or_stop, configs) == [{"y": 0}, {"y": 2}, {"y": 4}] and sw.ran == 0
    assert not (tmp_path / sweep.CACHE).exists()


def test_a_small_sweep_runs_serially_unless_workers_are_asked_for(tmp_path, monkeypatch):
    """Fewer than RAY_MIN_POINTS_PER_CORE points a core: serial (Ray's start would cost more), said
    once; one more point than that, or an explicit --workers, would go to Ray."""
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sweep, "ray_importable", lambda: True)
    notes = []
    few = 2 * sweep.RAY_MIN_POINTS_PER_CORE - 1
    with sweep.Sweep(tmp_path, progress=False, note=notes.append) as sw:
        assert sw.serial(few) and not sw.serial(few + 1)
        assert sw.map(_double_or_stop, [{"x": i} for i in range(3)]) == [{"y": 0}, {"y": 2}, {"y": 4}]
    assert len(notes) == 1 and "3 points, fewer than 8 a core" in notes[0] and "serially" in notes[0]
    assert not sweep.Sweep(tmp_path, workers=2, progress=False).serial(3)
    assert not sweep.Sweep(tmp_path, progress=False, points=few + 1).serial(3)  # a search's waves count as one


def _double_or_stop(config: dict) -> dict:
    if config["x"] < 0:
        raise KeyboardInterrupt
    return {"y": 2 * config["x"]}


@needs_ray
def test_ray_shut_down_on_ctrl_c(tmp_path):
    """The sweep's own local cluster (2 CPUs, no dashboard): Ctrl-C in the driver while points run
    (KeyboardInterrupt as the first result comes back) stops the sweep, the finished point stays
    cached, and Ray is shut down."""
    import ray

    from vllm_faultsim.harness.runs.simulate import config_from_dict

    cfgs = [{"config": config_from_dict({"workload": {"kind": "poisson", "rate": r, "duration": 1.0, "prompt": 32,
                                                      "output": 4}}).to_dict(), "plan": []} for r in (2.0, 4.0)]

    def ctrl_c(i, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with sweep.Sweep(tmp_path, workers=2, progress=False) as sw:
            sw.map(study.study_point, cfgs, on_result=ctrl_c)
    assert not ray.is_initialized()
    assert len((tmp_path / sweep.CACHE).read_text().splitlines()) == 1


_SWEEP_CHILD = """
import os, signal, sys, time
from pathlib import Path
from vllm_faultsim.harness import sweep
from vllm_faultsim.harness.runs import study
from vllm_faultsim.harness.runs.simulate import config_from_dict

out, mode = Path(sys.argv[1]), sys.argv[2]
def point(duration):
    w = {"kind": "poisson", "rate": 20.0, "duration": duration, "prompt": 32, "output": 4}
    return {"config": config_from_dict({"workload": w}).to_dict(), "plan": []}
fired = []
if mode == "after":  # a caller's own handler, as the command line installs
    signal.signal(signal.SIGTERM, lambda s, f: fired.append(s))
    with sweep.Sweep(out, workers=2, progress=False) as sw:
        sw.map(study.study_point, [point(1.0), point(2.0)])
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)
    print("handled" if fired else "unhandled")
else:  # the default handler: SIGTERM once the first point is back, the rest still running
    with sweep.Sweep(out, workers=2, progress=False) as sw:
        sw.map(study.study_point, [point(0.5)] + [point(36000.0)] * 3,
               on_result=lambda i, r: (out / "first").write_text("x"))
"""


def _sweep_child(tmp_path, mode):
    """The sweep of ``_SWEEP_CHILD`` in a process of its own, its TMPDIR a short folder (so the
    sweep's Ray scratch folder goes inside it), which is returned with the process."""
    import os
    import subprocess
    import sys
    import tempfile

    short = tempfile.mkdtemp(prefix="vt", dir="/tmp")
    env = {**os.environ, "TMPDIR": short}
    proc = subprocess.Popen([sys.executable, "-c", _SWEEP_CHILD, str(tmp_path), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, short


@needs_ray
def test_sigterm_after_a_ray_sweep_still_reaches_the_callers_handler(tmp_path):
    """``ray.shutdown`` puts the OS-level SIGTERM handler back to what it found at ``ray.init``
    (the default) while Python still names the caller's: the sweep re-installs the caller's
    handler after the shutdown, so a SIGTERM after the sweep (``study`` writing its table) reaches
    it instead of ending the process silently."""
    import shutil

    proc, short = _sweep_child(tmp_path, "after")
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0 and out.strip() == "handled", (proc.returncode, out, err[-2000:])


@needs_ray
def test_sigterm_in_a_ray_sweep_with_the_default_handler_removes_the_scratch_folder(tmp_path):
    """An API caller that never set a SIGTERM handler: Ray's own (``sys.exit``) stays, so SIGTERM
    mid-sweep unwinds through the sweep's ``__exit__``: the cluster is shut down, the finished
    point stays cached and the Ray scratch folder is removed (putting the caller's default back
    would end the process on the spot and leave them)."""
    import os
    import shutil
    import signal
    import time

    proc, short = _sweep_child(tmp_path, "default")
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "first").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        assert any(n.startswith("vfs-ray-") for n in os.listdir(short))
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
        left = os.listdir(short)
    finally:
        proc.kill()
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode not in (0, -signal.SIGTERM), (proc.returncode, err[-2000:])
    assert not [n for n in left if n.startswith("vfs-ray-")], left
    assert len((tmp_path / sweep.CACHE).read_text().splitlines()) == 1


@pytest.fixture
def ray_cluster():
    """A local Ray cluster of 2 CPUs without a dashboard, shut down after the test."""
    from vllm_faultsim.harness.drivers.scratch import socket_dir
    import ray

    with socket_dir("vfs-ray-", room=66) as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
        try:
            yield ray
        finally:
            ray.shutdown()


@needs_ray
def test_ray_and_serial_identical(tmp_path, ray_cluster):
    """The same search and study on Ray and serially: the same rows, the same CSV bytes."""
    spec = _spec()
    serial = search.run_search(spec, tmp_path / "s", progress=False, workers=1)
    on_ray = search.run_search(spec, tmp_path / "r", progress=False, workers=2)
    assert serial["rows"] == on_ray["rows"] and on_ray["ran"] == serial["ran"] > 0
    assert (tmp_path / "s" / "search.csv").read_bytes() == (tmp_path / "r" / "search.csv").read_bytes()
    st = {"base": {"workload": {"kind": "poisson", "duration": 2.0, "prompt": 64, "output": 8}},
          "grid": {"workload.rate": [5.0, 10.0, 20.0]}, "source": "t"}
    assert study.run_study(dict(st), tmp_path / "ss", progress=False, workers=1) == \
        study.run_study(dict(st), tmp_path / "sr", progress=False, workers=2)
    assert (tmp_path / "ss" / "study.csv").read_bytes() == (tmp_path / "sr" / "study.csv").read_bytes()


def test_the_readme_examples_load():
    """The README's worked capacity questions (examples/search/*.yaml) are valid specs."""
    from pathlib import Path

    specs = sorted((Path(__file__).parents[2] / "examples" / "search").glob("*.yaml"))
    assert len(specs) == 3
    for path in specs:
        spec = search.load_search(str(path))
        assert spec["space"]["system"] == ["h100_sxm", "h200_sxm", "b200_sxm"]


@pytest.fixture
def external_ray_cluster(monkeypatch):
    """A Ray cluster of its own (``ray start --head --block``, 2 CPUs, token authentication off for it
    and this driver), as a user's existing cluster would be; its processes are stopped after the test."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from vllm_faultsim.harness.drivers.scratch import socket_dir

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket_dir("vfs-rayx-", room=66) as tmp:
        head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                 "--num-cpus=2", f"--port={port}", "--include-dashboard=false",
                                 f"--temp-dir={tmp}", "--disable-usage-stats"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()


@needs_ray
def test_study_on_an_existing_cluster(tmp_path, external_ray_cluster, monkeypatch):
    """`study --ray-address` runs the points on a cluster started outside the process (the head is
    up once a driver connects: the sweep retries nothing, so wait for it first) and disconnects
    from it: the same CSV bytes as a serial run."""
    import time

    import ray

    for _ in range(60):
        try:
            ray.init(address=external_ray_cluster, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # the head is still starting
            time.sleep(1)
    ray.shutdown()
    inits = []  # every ray.init of the study: the existing cluster's address, no local cluster
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **kw: inits.append(kw.get("address")) or real_init(*a, **kw))
    st = {"base": {"workload": {"kind": "poisson", "duration": 2.0, "prompt": 64, "output": 8}},
          "grid": {"workload.rate": [5.0, 10.0, 20.0]}}
    (tmp_path / "st.yaml").write_text(yaml.safe_dump(st))
    assert main(["study", "--spec", str(tmp_path / "st.yaml"), "--out", str(tmp_path / "serial"),
                 "--workers", "1", "--no-progress"]) in (0, None)
    assert main(["study", "--spec", str(tmp_path / "st.yaml"), "--out", str(tmp_path / "ext"),
                 "--ray-address", external_ray_cluster, "--no-progress"]) in (0, None)
    assert not ray.is_initialized() and inits == [external_ray_cluster]
    assert (tmp_path / "serial" / "study.csv").read_bytes() == (tmp_path / "ext" / "study.csv").read_bytes()
