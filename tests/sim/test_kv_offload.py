"""The KV offloading model (models/kv_offload.py) on its own: no torch, no vLLM.

The scheduler side is driven by hand, the way vLLM's Scheduler calls it, through upstream's
three scenarios (preemption flush, fence flush, 0.23.0's flush-all on the last step), per policy
and per mutant; plus the transfer engine, the CPU pool's two LRU variants and policy selection.
"""

from __future__ import annotations

import pytest

from vllm_faultsim.faults.plan import validate_plan
from vllm_faultsim.faults.sim_injector import SimInjector
from vllm_faultsim.harness.mutants import offload_policy
from vllm_faultsim.models import kv_offload as ko


class Req:
    """What the model reads of vLLM's Request."""

    def __init__(self, rid: str, prompt: int, block_size: int = 4, salt: int = 0):
        self.request_id = rid
        self.num_prompt_tokens = prompt
        self.num_tokens = prompt
        self.num_computed_tokens = 0
        self.block_hashes = [("h", salt, i) for i in range(prompt // block_size)]
        self.finished = False

    def is_finished(self) -> bool:
        return self.finished


CFG = ko.OffloadConfig(block_size=4, num_cpu_chunks=16, bytes_per_block=1 << 20, bandwidth=1e8, latency=0.0)


def make(version: str, mutant: str | None = None, cfg: ko.OffloadConfig = CFG):
    pol = offload_policy(version, mutant)
    sched = ko.OffloadingConnectorScheduler(cfg, pol)
    worker = ko.OffloadingConnectorWorker(ko.TransferEngine(cfg), pol, sched.names, sched.events)
    return sched, worker


def step(sched, worker, so: ko.SchedOut, t0: float, t1: float):
    """One engine step: build_connector_meta, worker at start and end, update_connector_output."""
    meta = sched.build_connector_meta(so)
    worker.handle_preemptions(meta, t0)
    worker.start_kv_transfers(meta, t0)
    recving, completed = worker.get_finished(meta, t1)
    sched.update_connector_output(completed)
    return meta, sched.events.take() or {}


def prefill(sched, worker, req: Req, blocks: list[int], t1: float = 0.01):
    sched.on_new_request(req)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    meta, kv = step(sched, worker, ko.SchedOut([(req.request_id, blocks, False)], {req.request_id: req.num_tokens}),
                    0.0, t1)
    req.num_computed_tokens = req.num_tokens
    return kv


@pytest.mark.parametrize("version", ko.VERSIONS)
def test_last_step_flush_all_only_in_023(version):
    sched, worker = make(version)
    r0 = Req("r0", 8)
    kv = prefill(sched, worker, r0, [1, 2])
    assert kv["store"] == [["r0:S0", "r0", [0, 1]]]
    r0.finished = True
    sched.request_finished(r0)
    # the next step: no request scheduled, r0 among the finished ids
    meta, kv = step(sched, worker, ko.SchedOut([], {}, finished_req_ids=["r0"]), 0.02, 0.021)
    if version == "0.23":
        assert kv.get("flush") == ["r0:S0"] and kv.get("done") == ["r0:S0"] and kv.get("wait", 0) > 0
        assert not sched._jobs and not sched._req_status
        assert not sched.has_pending_push_work()
    else:
        assert "flush" not in kv and "done" not in kv
        assert sched.has_pending_push_work()  # the engine keeps stepping
        t = 0.021
        while sched.has_pending_push_work():
            meta, kv = step(sched, worker, ko.SchedOut([], {}), t, t + 0.001)
            t += 0.001
        assert kv.get("done") == ["r0:S0"] and "flush" not in kv
        assert 0.041 <= t < 0.043  # 2 blocks x 1 MiB at 100 MB/s = 21 ms after the step-2 submit (t=0.02)


def test_no_flush_all_mutant_strands_the_job():
    sched, worker = make("0.23", "no-flush-all")
    r0 = Req("r0", 8)
    prefill(sched, worker, r0, [1, 2])
    r0.finished = True
    sched.request_finished(r0)
    meta, kv = step(sched, worker, ko.SchedOut([], {}, finished_req_ids=["r0"]), 0.02, 0.021)
    assert "flush" not in kv
    assert sched.pending_jobs() == ["r0:S0"] and not sched.has_pending_push_work()


@pytest.mark.parametrize("version", ko.VERSIONS)
@pytest.mark.parametrize("mutant", [None, "no-preempt-flush"])
def test_preempted_requests_pending_stores_are_flushed(version, mutant):
    sched, worker = make(version, mutant)
    r0 = Req("r0", 8)
    prefill(sched, worker, r0, [1, 2])
    r0.num_computed_tokens = 0  # preempted: blocks freed, back to waiting
    meta, kv = step(sched, worker, ko.SchedOut([], {}, preempted_req_ids=["r0"]), 0.02, 0.021)
    if mutant is None:
        assert kv.get("flush") == ["r0:S0"] and kv.get("done") == ["r0:S0"]
        # ... so a later lookup finds the chunks on CPU and loads them
        hits, load = sched.get_num_new_matched_tokens(r0, 0)
        assert (hits, load) == (8, True)
    else:
        assert "flush" not in kv
        assert sched.pending_jobs() == ["r0:S0"]


@pytest.mark.parametrize("version", ko.VERSIONS)
@pytest.mark.parametrize("mutant", [None, "no-fence-flush"])
def test_reallocated_block_flushes_its_pending_job(version, mutant):
    sched, worker = make(version, mutant)
    r0, r1 = Req("r0", 8), Req("r1", 8, salt=1)
    prefill(sched, worker, r0, [1, 2])
    r0.finished = True
    sched.request_finished(r0)  # its blocks 1, 2 go back to the free queue, the store is in flight
    sched.on_new_request(r1)
    assert sched.get_num_new_matched_tokens(r1, 0) == (0, False)
    meta, kv = step(sched, worker, ko.SchedOut([("r1", [2, 3], False)], {"r1": 8}, finished_req_ids=["r0"]),
                    0.02, 0.021)
    if mutant is None:
        assert kv.get("flush") == ["r0:S0"] and "r0:S0" in kv.get("done", [])
    else:
        assert "flush" not in kv


def test_lookup_defers_while_the_store_is_in_flight_then_loads():
    sched, worker = make("0.24+")
    r0, r1 = Req("r0", 8), Req("r1", 8)  # same tokens: same block hashes
    prefill(sched, worker, r0, [1, 2])
    sched.on_new_request(r1)
    assert sched.get_num_new_matched_tokens(r1, 0) == (None, False)  # HIT_PENDING
    assert sched.events.take() == {"delayed": ["r1"]}
    t = 0.01
    while sched.pending_jobs():
        step(sched, worker, ko.SchedOut([], {}), t, t + 0.01)
        t += 0.01
    assert sched.get_num_new_matched_tokens(r1, 0) == (8, True)
    sched.update_state_after_alloc(r1, [5, 6], 8)
    meta, kv = step(sched, worker, ko.SchedOut([("r1", [5, 6], False)], {}), t, t + 0.05)
    assert kv["load"] == [["r1:L0", "r1", [0, 1]]] and kv["done"] == ["r1:L0"]


def test_full_pool_refuses_the_store_and_retries():
    cfg = ko.OffloadConfig(block_size=4, num_cpu_chunks=2, bytes_per_block=1 << 20, bandwidth=1e8, latency=0.0)
    sched, worker = make("0.24+", cfg=cfg)
    r0, r1 = Req("r0", 8), Req("r1", 8, salt=1)
    prefill(sched, worker, r0, [1, 2])       # both CPU slots pending
    kv = prefill(sched, worker, r1, [3, 4])  # nothing evictable: prepare_store -> None
    assert kv.get("nostore") == [["r1", [0, 1]]] and "store" not in kv
    assert sched._req_status["r1"].next_stored_chunk_idx == 0  # offered again next step


def test_transfer_engine_streams_faults_and_wait():
    plan = validate_plan({"faults": [{"kind": "kv_transfer_slow", "start": 1.0, "end": 2.0, "factor": 10},
                                     {"kind": "kv_transfer_fail", "start": 3.0, "end": 4.0}]}, "t")
    eng = ko.TransferEngine(ko.OffloadConfig(bytes_per_block=1000, bandwidth=1e6, latency=0.001))
    SimInjector(plan).arm_transfers(eng)
    eng.submit(1, "store", 2, 0.0)   # 1 ms + 2 ms
    eng.submit(2, "store", 1, 0.0)   # queued behind job 1 on the store stream
    eng.submit(3, "load", 1, 0.0)    # its own stream
    assert [tr.job_id for tr in eng.poll(0.0025)] == [3]
    assert [tr.job_id for tr in eng.poll(0.01)] == [1, 2]
    eng.submit(4, "store", 1, 1.5)   # slow window: 10 x 2 ms
    assert eng.wait([4], 1.5) == pytest.approx(0.02)
    assert [tr.job_id for tr in eng.poll(1.5)] == [4]  # a waited job is reported at once
    eng.submit(5, "load", 1, 3.5)
    (tr,) = eng.poll(10)
    assert tr.job_id == 5 and not tr.ok


def test_transfer_failure_raises_like_vllms_assert():
    plan = validate_plan({"faults": [{"kind": "kv_transfer_fail", "start": 0.0, "end": 1.0}]}, "f")
    pol = ko.OffloadPolicy("0.24+")
    sched = ko.OffloadingConnectorScheduler(CFG, pol)
    eng = ko.TransferEngine(CFG)
    SimInjector(plan).arm_transfers(eng)
    worker = ko.OffloadingConnectorWorker(eng, pol, sched.names, sched.events)
    prefill(sched, worker, Req("r0", 8), [1, 2])
    with pytest.raises(ko.TransferFailed) as exc:
        step(sched, worker, ko.SchedOut([], {}), 0.02, 1.0)
    assert exc.value.failed == ["r0:S0"]


def _fill(m: ko.CPUOffloadingManager, keys):
    out = m.prepare_store(list(keys))
    m.complete_store(out.keys_to_store)


def test_lru_variants_evict_differently():
    """0.23: one OrderedDict in insertion/touch order; 0.24+: evictable list in completion order."""
    for new, victim in ((False, "a"), (True, "b")):
        m = ko.CPUOffloadingManager(2, new_lru=new)
        out_a = m.prepare_store(["a"])
        _fill(m, ["b"])
        m.complete_store(out_a.keys_to_store)  # a completes after b
        out = m.prepare_store(["c"])
        assert out.evicted_keys == [victim], (new, out)


def test_lru_touch_and_pinned_blocks():
    for new in (False, True):
        m = ko.CPUOffloadingManager(2, new_lru=new)
        _fill(m, ["a", "b"])
        m.touch(["a"])
        assert m.prepare_store(["c"]).evicted_keys == ["b"]
        m.prepare_load(["a"])  # pinned
        assert m.prepare_store(["d"]) is None  # a pinned, c pending: nothing evictable
        m.complete_load(["a"])


def test_policy_selection():
    assert ko.version_policy("0.23.0") == "0.23"
    assert ko.version_policy("0.24.0rc1") == "0.24+"
    assert ko.version_policy("0.26.0") == "0.24+"
    assert ko.version_policy("1.0.0") == "0.24+"
    assert ko.policy_for("0.23").flush_all_when_finished
    assert not ko.policy_for("0.24+").flush_all_when_finished
    assert not offload_policy("0.23", "no-flush-all").flush_all_when_finished
    with pytest.raises(ValueError, match="unknown offload mutant"):
        offload_policy("0.24+", "nope")
    with pytest.raises(ValueError, match="unknown offload policy version"):
        ko.OffloadPolicy("0.25")


def test_policy_env_override(monkeypatch):
    monkeypatch.setenv(ko.POLICY_ENV, "0.23")
    assert ko.policy_for().version == "0.23"
    monkeypatch.delenv(ko.POLICY_ENV)
    monkeypatch.setattr(ko, "installed_vllm_version", lambda: None)
    assert ko.policy_for().version == "0.24+"


# ---- the simulator end to end: simulated Scheduler + offloading hooks + model -----------------

from vllm_faultsim.harness.runs import offload as oc  # noqa: E402


def last_store_step(st) -> int:
    """The index of the step whose output retires r0's store (last_step scenario)."""
    return next(i for i, e in enumerate(st) if "r0:S0" in (e.get("kv") or {}).get("done", ()))


@pytest.mark.parametrize("mode", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("version", ko.VERSIONS)
def test_simulator_last_step(version, mode):
    """Async: the batch scheduled while r0's forward runs is empty (r0 reaches max_tokens with
    what is in flight) and carries nothing; 0.23.0's flush-all comes one batch later, and with
    0.24+ the empty batch queued behind the completion is applied last."""
    case = oc.scenario("last_step", async_scheduling=mode)
    ev = oc.run_case(case, "puresim", policy=version)
    st = [e for e in ev if e["kind"] == "step"]
    done = last_store_step(st)
    if version == "0.23":
        assert len(st) == 2 + mode and done == 1 + mode and st[done]["kv"]["flush"] == ["r0:S0"]
    else:
        assert len(st) > 10 and all("flush" not in (e.get("kv") or {}) for e in st)
        assert done == len(st) - 1 - mode
    assert all(e["sched"] == {} for e in st[1:])
    assert oc.invariants(ev, case.specs, case.offload.tokens_per_chunk) == []


@pytest.mark.parametrize("mode", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("version", ko.VERSIONS)
def test_simulator_preemption_and_fence_flushes(version, mode):
    ev = oc.run_case(oc.scenario("preemption", mode), "puresim", policy=version)
    pre = next(e for e in ev if e["kind"] == "step" and e.get("preempted"))
    assert pre["preempted"] == ["r1"] and pre["kv"]["flush"] == ["r1:S0"]
    ev = oc.run_case(oc.scenario("fence", mode), "puresim", policy=version)
    first_r2 = next(e for e in ev if e["kind"] == "step" and "r2" in e["sched"])
    assert first_r2["kv"]["flush"] == ["r0:S0"]


@pytest.mark.parametrize("mutant,name,version", [("no-preempt-flush", "preemption", "0.24+"),
                                                 ("no-fence-flush", "fence", "0.24+"),
                                                 ("no-flush-all", "last_step", "0.23")])
def test_simulator_mutants_break_an_invariant_or_the_scenario(mutant, name, version):
    case = oc.scenario(name)
    good = oc.run_case(case, "puresim", policy=version)
    bad = oc.run_case(case, "puresim", policy=version, mutant=mutant)
    assert oc.offload_differences(good, bad) or oc.invariants(bad, case.specs, case.offload.tokens_per_chunk)


@pytest.mark.parametrize("mode", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("version", ko.VERSIONS)
def test_simulator_generated_cases_keep_the_invariants(version, mode):
    """Nothing lost, no job pending after the drain, every finished request's prompt chunks
    accounted for, KV blocks conserved after every step -- over generated cases with faults."""
    for seed in range(150):
        case = oc.gen_case(seed, async_scheduling=mode)
        ev = oc.run_case(case, "puresim", policy=version)
        assert oc.invariants(ev, case.specs, case.offload.tokens_per_chunk) == [], (
            f"{case.describe()} [replay: {oc.replay_command(seed, policy=version, side='puresim', async_scheduling=mode)}]")
