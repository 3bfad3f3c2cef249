"""Memory bounded by what is in flight: workloads generated lazily, the engine pulling each request
as its clock reaches it, per-request checks as requests are pulled (issue 15 item 4)."""

import hashlib
import subprocess
import sys

import pytest

from vllm_faultsim.faults.plan import FaultPlan
from vllm_faultsim.harness.runs.simulate import RunConfig, build_workload, iter_workload, run_engine, with_scheduler
from vllm_faultsim.harness.workload import Generated
from vllm_faultsim.models.ec_connector import ECConnector, PrefetchSchedule
from vllm_faultsim.models.engine import EngineCore
from vllm_faultsim.models.request import MMItem, RequestSpec
from vllm_faultsim.models.scheduler import Scheduler

pytestmark = pytest.mark.sim

BURSTY = {"kind": "bursty", "rate_high": 40, "rate_low": 2, "on": 5, "off": 5, "duration": 40,
          "prompt": {"uniform": [200, 900]}, "output": {"lognormal": {"median": 40, "sigma": 0.8, "max": 200}},
          "mm": {"fraction": 0.5, "tokens": 120, "prefetch": {"uniform": [0.05, 0.4]}, "reuse": 0.3}}
POISSON = {"kind": "poisson", "rate": 30, "num_requests": 500, "output": 64, "start": 2.5,
           "prompt": {"lognormal": {"median": 600, "sigma": 1.0, "max": 4000}}, "mm": {"fraction": 0.3, "tokens": 100}}


@pytest.mark.parametrize("workload, digest", [
    (BURSTY, "d0b820b8bd4a077ba8badfbedab9e4c8b2e6572a17beeeda498c9c6918bf646f"),
    (POISSON, "5ece56c82926c33a960109cad3a4711295c069eb82e905274484cb3574b31ba1")])
def test_lazy_generation_gives_the_specs_of_the_list_built_up_front(workload, digest):
    """The digests are those of the workloads as generate() built them whole (before 2026-12-02)."""
    cfg = RunConfig(workload=workload, seed=7)
    lazy = iter_workload(cfg)
    assert isinstance(lazy, Generated)
    assert hashlib.sha256(repr(tuple(lazy)).encode()).hexdigest() == digest
    assert tuple(lazy) == build_workload(cfg)  # each pass generates the same requests again


def test_the_engine_pulls_each_request_only_once_the_previous_one_arrived():
    cfg = with_scheduler(RunConfig(workload={"kind": "poisson", "rate": 20, "duration": 20, "prompt": 256,
                                             "output": 16}), max_num_seqs=8)
    specs = build_workload(cfg)
    envs, pulled = [], []

    class Spy(EngineCore):
        def __init__(self, env, *args, **kw):
            envs.append(env)
            super().__init__(env, *args, **kw)

    def workload():
        for s in specs:
            pulled.append(envs[0].now)
            yield s

    prefetch = PrefetchSchedule()
    res = run_engine(Scheduler(cfg.scheduler, ECConnector(prefetch)), workload(), cfg, FaultPlan(), side="sim",
                     keep=frozenset(), full_trace=False, prefetch=prefetch, engine_cls=Spy)
    assert res.summary["requests"] == len(specs) == len(pulled)
    assert pulled[0] == 0.0  # one request ahead: the first is pulled when the engine starts
    for k in range(1, len(specs)):
        assert pulled[k] >= specs[k - 1].arrival, k


def test_star_prefetch_faults_apply_to_items_added_after_they_are_armed():
    p = PrefetchSchedule()
    p.stall("*", 0.5)
    p.fail("img1")
    p.add(RequestSpec("r0", 0.0, 300, 4, (MMItem("img0", 0, 100, 0.25),)))
    p.add(RequestSpec("r1", 0.0, 300, 4, (MMItem("img1", 0, 100, 0.25),)))
    assert not p.ensure("r0", "img0", 1.0) and p.ensure("r0", "img0", 1.75)
    assert p.has_item("img0", 1.75)
    assert p.ensure("r1", "img1", 1.0) is False and p.ensure("r1", "img1", 1.75)
    assert not p.has_item("img1", 2.0)  # failed staging: never in the remote store
    q = PrefetchSchedule()
    q.fail("*")
    q.add(RequestSpec("r0", 0.0, 300, 4, (MMItem("img0", 0, 100, 0.25),)))
    q.ensure("r0", "img0", 0.0)
    assert not q.has_item("img0", 1.0)


def test_a_generated_request_vllm_refuses_fails_the_run_when_reached(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("scheduler: {max_model_len: 2048}\n"
                   "workload: {kind: poisson, rate: 20, duration: 30, output: 64,\n"
                   "           prompt: {lognormal: {median: 600, sigma: 1.0, max: 8000}}}\n")
    trace = tmp_path / "t.jsonl"
    p = subprocess.run([sys.executable, "-m", "vllm_faultsim.harness.cli", "run", "--config", str(cfg),
                        "--trace", str(trace), "--no-progress"], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"vllm-faultsim: error: {cfg}: request r3: The decoder prompt (length 2466) is longer than the maximum "
        "model length of 2048. Make sure that `max_model_len` is no smaller than the number of text tokens."]
    assert list(tmp_path.iterdir()) == [cfg]  # nothing written, no partial trace left


def test_a_jsonl_replay_in_arrival_order_is_read_lazily_another_whole_and_sorted(tmp_path):
    from vllm_faultsim.harness.workload import JsonlReplay, jsonl_workload, load_jsonl
    lines = [f'{{"arrival": {0.1 * i:.1f}, "prompt_tokens": {100 + i}, "output_tokens": 8}}' for i in range(30)]
    ordered, shuffled = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ordered.write_text("\n".join(lines) + "\n")
    shuffled.write_text("\n".join(lines[1::2] + lines[::2]) + "\n")
    lazy = jsonl_workload(ordered)
    assert isinstance(lazy, JsonlReplay) and tuple(lazy) == tuple(lazy) == load_jsonl(ordered)
    whole = jsonl_workload(shuffled)
    assert isinstance(whole, tuple) and whole == load_jsonl(shuffled)
    assert [s.arrival for s in whole] == sorted(s.arrival for s in whole)


def test_the_prefetch_schedule_drops_each_request_once_it_is_done():
    """After a multimodal run the EC schedule holds no request: each is dropped at its req event
    (what landed stays loadable: ``landed``), so it holds what is in flight, not the workload."""
    cfg = RunConfig(workload={"kind": "poisson", "rate": 5, "duration": 120, "prompt": 600, "output": 32,
                              "mm": {"fraction": 0.6, "tokens": 120, "prefetch": {"uniform": [0.05, 0.4]}, "reuse": 0.3}},
                    seed=3)
    prefetch = PrefetchSchedule()
    seen = []

    def staged(specs):
        for s in specs:
            prefetch.add(s)
            seen.append(len(prefetch.items))
            yield s

    res = run_engine(Scheduler(cfg.scheduler, ECConnector(prefetch)), staged(iter_workload(cfg)), cfg, FaultPlan(),
                     side="sim", keep=frozenset(), full_trace=False, prefetch=prefetch)
    assert res.summary["finished"] == res.summary["requests"] > 500
    assert prefetch.items == {} and prefetch.latency == {} and prefetch.ready_at == {} and prefetch.landed
    assert max(seen) < sum(1 for s in iter_workload(cfg) if s.mm) / 20  # in flight, not the workload


def test_a_public_trace_file_is_checked_once_then_read_as_pulled(tmp_path):
    from vllm_faultsim.harness import trace_formats as tf
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(f'{{"timestamp": {1000 * i}, "input_length": {100 + i}, "output_length": 4}}\n'
                            for i in range(50)))
    cfg = RunConfig(workload={"kind": "mooncake", "path": str(path), "rate": 5.0})
    lazy = iter_workload(cfg)
    assert isinstance(lazy, tf.TimedReplay) and tuple(lazy) == tuple(lazy)
    specs = tuple(lazy)
    assert len(specs) == 50 and lazy.last_arrival == specs[-1].arrival == 9.8  # 49 gaps at 5 req/s


@pytest.mark.parametrize("workload, expected", [
    ({"kind": "poisson", "rate": 10, "duration": 30, "start": 2}, 32.0),
    ({"kind": "poisson", "rate": 10, "num_requests": 50}, 5.0),
    ({"kind": "bursty", "rate_high": 9, "rate_low": 1, "on": 2, "off": 3, "duration": 17}, 17.0)])
def test_the_progress_bar_is_sized_from_the_description(workload, expected):
    from vllm_faultsim.harness.runs.simulate import last_arrival
    specs = iter_workload(RunConfig(workload=workload))
    assert last_arrival(specs) == expected
    assert max(s.arrival for s in specs) <= expected * 1.5


def test_diff_traces_streams_and_matches_fates_in_any_order(tmp_path):
    """The checker reads both traces side by side: request events in another order agree; a changed
    fate is reported for the earliest request of the left trace; left's reading error comes first."""
    import json
    from vllm_faultsim.harness.checkers.divergence import first_divergence
    from vllm_faultsim.harness.runs.simulate import simulate
    from vllm_faultsim.harness.trace import TraceFile, TraceError
    cfg = RunConfig(workload={**POISSON, "num_requests": 120})
    base = tmp_path / "a.jsonl"
    simulate(cfg, trace_path=base, keep=frozenset())
    lines = base.read_text().splitlines()
    reqs = [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "req"]

    def write(name, ls):
        (tmp_path / name).write_text("\n".join(ls) + "\n")
        return TraceFile(tmp_path / name)

    moved = [line for i, line in enumerate(lines) if i not in set(reqs)]
    moved = write("moved.jsonl", moved[:-1] + [lines[i] for i in reversed(reqs)] + moved[-1:])
    assert first_divergence(TraceFile(base), moved) is None and moved.last_kind == "end"
    changed = list(lines)
    for i in (reqs[70], reqs[3]):
        e = json.loads(changed[i])
        e["num_output"] += 1
        changed[i] = json.dumps(e)
    div = first_divergence(TraceFile(base), write("changed.jsonl", changed))
    assert (div.where, div.field) == (f"request {json.loads(lines[reqs[3]])['req']}", "num_output")
    bad_early, bad_late = list(lines), list(lines)
    bad_early[5], bad_late[-3] = '{"kind": "step"}', "not json"
    with pytest.raises(ValueError, match="bad_late.jsonl"):
        first_divergence(write("bad_late.jsonl", bad_late), write("bad_early.jsonl", bad_early))
    with pytest.raises(TraceError, match="bad_early.jsonl"):
        first_divergence(TraceFile(base), TraceFile(tmp_path / "bad_early.jsonl"))
