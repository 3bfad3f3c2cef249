"""The scheduler model's decisions on small hand-checked cases (vLLM 0.26.0 semantics)."""

import pytest

from vllm_faultsim.faults.plan import FaultPlan
from vllm_faultsim.harness.mutants import SCHEDULER_MUTANTS
from vllm_faultsim.harness.runs.simulate import prefetch_schedule
from vllm_faultsim.harness.workload import MMItem, RequestSpec
from vllm_faultsim.models.ec_connector import ECConnector, PrefetchSchedule
from vllm_faultsim.models.kv_cache import BlockPool
from vllm_faultsim.models.scheduler import Scheduler, SchedulerConfig


def spec(rid, prompt, output=4, mm=(), stop_at=None, arrival=0.0):
    return RequestSpec(rid, arrival, prompt, output, tuple(mm), None, stop_at)


def make(specs, scheduler_cls=Scheduler, **cfg):
    sch = scheduler_cls(SchedulerConfig(**cfg))
    for s in specs:
        sch.add_request(s, 0.0)
    return sch


def step(sch, now=0.0):
    res = sch.schedule(now)
    fin = sch.update_from_output(res, now)
    assert sch.check(deep=True) is None
    return res, fin


def test_chunked_prefill_splits_by_token_budget_then_decodes():
    sch = make([spec("a", 100, output=3)], max_num_batched_tokens=64, num_gpu_blocks=64)
    assert step(sch)[0].sched == {"a": 64}
    res, fin = step(sch)
    assert res.sched == {"a": 36} and fin == []          # prefill completes: first token sampled
    assert step(sch)[0].sched == {"a": 1}
    res, fin = step(sch)
    assert [(f.req_id, f.status, f.num_output) for f in fin] == [("a", "length", 3)]
    assert not sch.has_unfinished_requests()


def test_max_num_seqs_and_fcfs_order():
    sch = make([spec(r, 10) for r in "abc"], max_num_seqs=2, num_gpu_blocks=64)
    assert list(step(sch)[0].sched) == ["a", "b"]
    assert sch.counts() == (2, 1)


def test_stop_token_finishes_early():
    sch = make([spec("a", 8, output=10, stop_at=2)], num_gpu_blocks=64)
    step(sch)
    _, fin = step(sch)
    assert [(f.status, f.num_output) for f in fin] == [("stop", 2)]


def test_preemption_frees_the_last_running_request_and_requeues_it_first():
    # 8-token blocks, 7 usable: a and b (16-token prompts) take 2 blocks each and grow.
    sch = make([spec("a", 16, output=40), spec("b", 16, output=40), spec("c", 16, output=40)],
               block_size=8, num_gpu_blocks=8, max_num_seqs=4)
    preempted = []
    for _ in range(30):
        res, _ = step(sch)
        preempted += res.preempted
        if res.preempted:
            assert sch.waiting[0].req_id == res.preempted[-1]      # back at the front of waiting
            assert sch.waiting[0].num_computed_tokens == 0           # recompute
            break
    assert preempted == ["c"], preempted                            # the last admitted goes first


def test_full_sequence_must_fit_before_admission():
    # 5 usable blocks of 16 tokens: a 100-token prompt (7 blocks) is never admitted, even chunked.
    sch = make([spec("big", 100)], block_size=16, num_gpu_blocks=6, max_num_batched_tokens=16)
    assert step(sch)[0].sched == {}
    mutant = make([spec("big", 100)], block_size=16, num_gpu_blocks=6, max_num_batched_tokens=16,
                  scheduler_cls=SCHEDULER_MUTANTS["no-full-admission"].scheduler_cls)
    assert step(mutant)[0].sched == {"big": 16}


def _ec(specs, plan=None, **cfg):
    prefetch = prefetch_schedule(tuple(specs), plan or FaultPlan())
    sch = Scheduler(SchedulerConfig(num_gpu_blocks=200, **cfg), ECConnector(prefetch))
    for s in specs:
        sch.add_request(s, 0.0)
    return sch


def test_upstream_ec_deferral_scenario():
    """PR #41627's test: the image request is skipped while in flight; the text one behind runs."""
    deferred = spec("deferred", 200, mm=[MMItem("hash0_0", 0, 100, prefetch=0.05)])
    behind = spec("behind", 20)
    sch = _ec([deferred, behind])
    res = sch.schedule(0.0)
    assert res.sched == {"behind": 20} and res.deferred == ["deferred"]
    sch.update_from_output(res, 0.01)
    res = sch.schedule(0.06)                      # the prefetch finished at 0.05
    assert res.sched == {"behind": 1, "deferred": 200}
    assert res.ec_loaded == ["hash0_0"] and res.enc == {}


def test_deferred_requests_keep_their_order_and_go_first():
    a = spec("a", 50, mm=[MMItem("ia", 0, 20, prefetch=0.1)])
    b = spec("b", 50, mm=[MMItem("ib", 0, 20, prefetch=0.1)])
    c = spec("c", 30)
    sch = _ec([a, b, c], max_num_seqs=8)
    res = sch.schedule(0.0)
    assert res.deferred == ["a", "b"] and list(res.sched) == ["c"]
    assert [r.req_id for r in sch.skipped_waiting] == ["a", "b"]


def test_failed_prefetch_falls_back_to_local_encode():
    from vllm_faultsim.faults.plan import validate_plan
    a = spec("a", 50, mm=[MMItem("ia", 0, 20, prefetch=0.01)])
    sch = _ec([a], plan=validate_plan([{"kind": "ec_prefetch_fail", "item": "ia"}]))
    assert sch.schedule(0.0).deferred == ["a"]
    res = sch.schedule(0.02)
    assert res.sched == {"a": 50} and res.enc == {"a": [0]} and res.ec_loaded == []


def test_only_future_features_are_checked():
    """A request resumed past its first image waits only for images after num_computed_tokens."""
    req = spec("x", 40, mm=[MMItem("old", 0, 10, prefetch=10.0), MMItem("new", 20, 10, prefetch=0.0)])
    prefetch = PrefetchSchedule((req,))
    ec = ECConnector(prefetch)
    assert ec.ensure_cache_available(req, num_computed_tokens=15) is True
    assert ECConnector(prefetch, "all-features").ensure_cache_available(req, 15) is False


def test_encoder_budget_clips_tokens_before_an_image():
    a = spec("a", 100, mm=[MMItem("ia", 40, 50, prefetch=None)])
    sch = _ec([a], encoder_compute_budget=30, encoder_cache_size=100)
    res = sch.schedule(0.0)
    assert res.sched == {"a": 40} and res.enc == {}


def test_prefix_cache_hit_skips_computed_blocks_and_caps_at_num_tokens_minus_one():
    a = RequestSpec("a", 0.0, 64, 10, (), (7, 64))
    b = RequestSpec("b", 0.0, 64, 10, (), (7, 64))   # the same 64 prompt tokens
    sch = make([a], block_size=16, num_gpu_blocks=32, enable_prefix_caching=True)
    step(sch)
    sch.add_request(b, 0.0)
    res, _ = step(sch)
    assert res.computed_before["b"] == 48 and res.sched["b"] == 16   # 4 full blocks, capped at 63 tokens
    shared = set(sch.pool.req_blocks["a"][:3]) & set(sch.pool.req_blocks["b"])
    assert len(shared) == 3 and all(sch.pool.ref_cnt[x] == 2 for x in shared)


def test_the_free_queue_without_prefix_caching_hands_out_blocks_as_vllm():
    """Without prefix caching (the free queue a list, front last): allocation takes the front, one
    block each in order for the decode cohort's takers; a freed request's blocks rejoin the front,
    its last block first; 0.23.0's free_blocks appends them to the back instead."""
    pool = BlockPool(10)
    assert pool.allocate("a", 3) == [1, 2, 3] and pool.allocate("b", 2) == [4, 5]
    pool.allocate_each(["b", "a"])
    assert pool.req_blocks == {"a": [1, 2, 3, 7], "b": [4, 5, 6]}
    pool.free_request("a")
    assert pool.allocate("c", 6) == [7, 3, 2, 1, 8, 9] and pool.allocate("d", 1) == []
    assert pool.conservation_error(deep=True) is None
    for hashless_first, order in ((True, [2, 1, 4, 5]), (False, [4, 5, 2, 1])):
        pool = BlockPool(6, hashless_first=hashless_first)
        pool.allocate("a", 3)
        pool.free_blocks([2, 1])
        assert pool.allocate("b", 4) == order


def test_freed_cached_blocks_are_evicted_last_and_reused():
    a = RequestSpec("a", 0.0, 33, 1, (), (3, 33))
    sch = make([a], block_size=16, num_gpu_blocks=8, enable_prefix_caching=True)
    step(sch)                                   # a finishes after one step (1 output token)
    assert not sch.has_unfinished_requests()
    free = list(sch.pool.free)
    hashed = [b for b in free if b in sch.pool.block_hash]
    assert len(hashed) == 2 and free[-2:] == hashed        # cached blocks at the back
    sch.add_request(RequestSpec("b", 0.0, 40, 1, (), (3, 33)), 0.0)
    assert step(sch)[0].computed_before["b"] == 32


def test_resumed_past_an_image_does_not_wait_for_it():
    """With a prefix-cache hit covering the first image, only the later image is awaited."""
    img_a = MMItem("pic", 0, 16, prefetch=0.0)
    late = MMItem("late", 40, 8, prefetch=0.5)
    first = RequestSpec("first", 0.0, 48, 1, (img_a,), (1, 32))
    second = RequestSpec("second", 0.0, 64, 1, (img_a, late), (1, 32))
    prefetch = PrefetchSchedule((first, second))
    sch = Scheduler(SchedulerConfig(num_gpu_blocks=64, enable_prefix_caching=True), ECConnector(prefetch))
    sch.add_request(first, 0.0)
    res = sch.schedule(0.0)
    sch.update_from_output(res, 0.0)
    sch.add_request(second, 0.0)
    res = sch.schedule(0.0)
    assert res.deferred == ["second"]            # "late" is in flight; the hit covers "pic"
    sch.update_from_output(res, 0.0)
    res = sch.schedule(0.6)
    assert res.computed_before["second"] == 32 and res.sched["second"] == 32
    assert res.ec_loaded == ["late"]


def test_config_with_chunked_prefill_off_needs_a_budget_of_max_model_len():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(256\) is smaller than max_model_len \(2048\)"):
        SchedulerConfig(max_num_batched_tokens=256, max_model_len=2048, enable_chunked_prefill=False).validate()
    SchedulerConfig(max_num_batched_tokens=2048, max_model_len=2048, enable_chunked_prefill=False).validate()
