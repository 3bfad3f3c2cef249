"""RealSchedulerCore: the scheduler-core protocol on vLLM's real v1 Scheduler (CPU). The fixed-step
tests drive the synchronous Scheduler (``async_scheduling=False``); the async ones vLLM's
AsyncScheduler through the twin's batch-queue loop."""

from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e .[vllm])")

from vllm_faultsim.harness.drivers.real_scheduler import RealSchedulerCore  # noqa: E402
from vllm_faultsim.harness.workload import MMConfig, MMItem, RequestSpec, poisson  # noqa: E402
from vllm_faultsim.models.ec_connector import PrefetchSchedule  # noqa: E402
from vllm_faultsim.models.scheduler import SchedulerConfig  # noqa: E402

STEP = 0.025


# a small engine, synchronous scheduling (drive() applies each step's output before the next)
Config = partial(SchedulerConfig, max_num_seqs=4, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=200,
                 max_model_len=2048, encoder_compute_budget=512, encoder_cache_size=512, async_scheduling=False)


class Prefetch(PrefetchSchedule):
    """The simulator's prefetch schedule, recording the connector's ensure() calls."""

    def __init__(self, specs):
        super().__init__(tuple(specs))
        self.calls: list[tuple[str, str, float]] = []

    def ensure(self, req_id: str, ident: str, now: float) -> bool:
        self.calls.append((req_id, ident, now))
        return super().ensure(req_id, ident, now)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def drive(core, specs, max_steps=10_000):
    """A fixed-step loop: arrivals at step starts, schedule, output at the step's end."""
    steps, finished, pending, now = [], [], list(specs), 0.0
    for _ in range(max_steps):
        while pending and pending[0].arrival <= now:
            core.add_request(pending.pop(0), now)
        if not core.has_unfinished_requests():
            if not pending:
                return steps, finished
            now = pending[0].arrival
            continue
        res = core.schedule(now)
        steps.append(res)
        if res.sched:
            finished += core.update_from_output(res, now + STEP)
        now += STEP
    raise AssertionError("workload did not finish")


def test_ec_deferral_lets_the_request_behind_run(models):
    """Upstream's test_ec_connector_ensure_cache_available_defers_request, on the virtual clock."""
    specs = [RequestSpec("deferred", 0.0, 200, 5, (MMItem("hash0_0", 0, 100, 0.05),)),
             RequestSpec("behind", 0.0, 20, 5)]
    ec = Prefetch(specs)
    core = RealSchedulerCore(Config(), ec, model_cache_dir=models)
    for spec in specs:
        core.add_request(spec, 0.0)

    res = core.schedule(0.0)
    assert res.sched == {"behind": 20}
    assert res.deferred == ["deferred"] and res.ec_loaded == [] and res.enc == {}
    sched = core.scheduler  # nothing allocated for the deferred request: KV blocks of "behind" only
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 200 - 1 - 2
    assert sched.encoder_cache_manager.num_free_slots == 512
    assert core.counts() == (1, 1)
    core.update_from_output(res, STEP)

    res = core.schedule(STEP)  # still in flight: skipped again, checked before `waiting`
    assert res.sched == {"behind": 1} and res.deferred == ["deferred"]
    core.update_from_output(res, 2 * STEP)

    res = core.schedule(2 * STEP)  # ready: scheduled in full, its encoder output loaded from the store
    assert res.sched == {"behind": 1, "deferred": 200}
    assert res.computed_before == {"behind": 21, "deferred": 0}
    assert res.deferred == [] and res.ec_loaded == ["hash0_0"] and res.enc == {}
    assert ec.calls == [("deferred", "hash0_0", t) for t in (0.0, STEP, 2 * STEP)]


def test_item_not_in_the_store_is_encoded_locally(models):
    spec = RequestSpec("r0", 0.0, 200, 2, (MMItem("img", 50, 100, None),))
    core = RealSchedulerCore(Config(), Prefetch([spec]), model_cache_dir=models)
    core.add_request(spec, 0.0)
    res = core.schedule(0.0)
    assert res.sched == {"r0": 200} and res.enc == {"r0": [0]} and res.ec_loaded == [] and res.deferred == []


def test_ensure_cache_available_checks_only_future_features(models):
    """Upstream's test_ec_connector_pending_prefetch_only_checks_future_mm_features."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    spec = RequestSpec("r0", 0.0, 96, 1, (MMItem("past", 0, 32, 1.0), MMItem("future", 64, 32, None)))
    feats = [MultiModalFeatureSpec(data=None, modality="image", identifier=m.identifier,
                                   mm_position=PlaceholderRange(offset=m.offset, length=m.length))
             for m in spec.mm]
    req = SimpleNamespace(request_id="r0", mm_features=feats)
    for policy, checked in (("future-only", ["future"]), ("all-features", ["past", "future"])):
        ec = Prefetch([spec])
        conn = RealSchedulerCore(Config(), ec, ec_policy=policy, model_cache_dir=models).ec_connector
        ready = conn.ensure_cache_available(req, 32)  # "past" ends at 32: its tokens are computed
        assert [c[1] for c in ec.calls] == checked
        assert ready == (policy == "future-only")


@pytest.mark.parametrize("policy", ["future-only", "all-features"])
def test_prefix_cache_hit_covering_the_image_needs_no_staging(models, policy):
    """b's 64-token prefix hit (a's blocks, same image) covers its image: only "all-features" waits
    for b's own, slow staging of it."""
    a = RequestSpec("a", 0.0, 100, 2, (MMItem("img", 0, 32, 0.0),), prefix=(0, 64))
    b = RequestSpec("b", 0.1, 100, 2, (MMItem("img", 0, 32, 1.0),), prefix=(0, 64))
    ec = Prefetch([a, b])
    core = RealSchedulerCore(Config(enable_prefix_caching=True), ec, ec_policy=policy, model_cache_dir=models)
    steps, _ = drive(core, [a, b])
    first = next(s for s in steps if "b" in s.sched)
    assert first.computed_before["b"] == 64 and first.sched["b"] == 36 and first.enc == {}
    waited = [s for s in steps if "b" in s.deferred]
    if policy == "future-only":
        assert not waited and not [c for c in ec.calls if c[0] == "b"]
    else:
        assert len(waited) == 40  # 1.0 s of 25 ms steps


def test_kv_pressure_preempts_in_preemption_order(models):
    """r0's 4th 32-token chunk needs 2 blocks with none free: r2 then r1 are preempted."""
    cfg = Config(num_gpu_blocks=9, long_prefill_token_threshold=32)  # 8 usable: block 0 is the null block
    core = RealSchedulerCore(cfg, multimodal=False, model_cache_dir=models)
    specs = [RequestSpec("r0", 0.0, 128, 1), RequestSpec("r1", 0.0, 8, 6), RequestSpec("r2", 0.0, 8, 6)]
    steps, finished = drive(core, specs)
    assert steps[0].sched == {"r0": 32, "r1": 8, "r2": 8}
    assert steps[3].sched == {"r0": 32} and steps[3].preempted == ["r2", "r1"]
    assert steps[4].sched == {"r1": 11, "r2": 11}  # resumed: prompt + 3 outputs recomputed
    assert steps[4].computed_before == {"r1": 0, "r2": 0}
    assert [(f.req_id, f.status, f.num_output) for f in finished] == [
        ("r0", "length", 1), ("r1", "length", 6), ("r2", "length", 6)]


def test_chunked_prefill_samples_only_when_the_prompt_is_done(models):
    cfg = Config(max_num_batched_tokens=64, max_model_len=256)
    core = RealSchedulerCore(cfg, multimodal=False, model_cache_dir=models)
    specs = [RequestSpec("long", 0.0, 150, 3), RequestSpec("short", 0.0, 30, 2, stop_at=1)]
    steps, finished = drive(core, specs)
    assert [s.sched for s in steps] == [{"long": 64}, {"long": 64}, {"long": 22, "short": 30},
                                        {"long": 1}, {"long": 1}]
    assert [s.computed_before for s in steps[:3]] == [{"long": 0}, {"long": 64}, {"long": 128, "short": 0}]
    assert [(f.req_id, f.status, f.num_output) for f in finished] == [
        ("short", "stop", 1), ("long", "length", 3)]


def test_same_inputs_same_steps(models):
    specs = poisson(40, num_requests=24, prompt={"uniform": [64, 300]}, output={"uniform": [1, 20]}, seed=3,
                    mm=MMConfig(fraction=0.5, tokens=48, prefetch={"uniform": [0.0, 0.1]}, reuse=0.3))
    runs = []
    for _ in range(2):
        ec = Prefetch(specs)
        runs.append(drive(RealSchedulerCore(Config(max_num_batched_tokens=256), ec, model_cache_dir=models), specs))
    assert runs[0] == runs[1]
    steps, finished = runs[0]
    assert len(finished) == len(specs)
    assert any(s.deferred for s in steps) and any(s.ec_loaded for s in steps)


def test_encoder_budget_below_the_models_item_is_refused(models):
    with pytest.raises(ValueError, match="raised the encoder budget"):
        RealSchedulerCore(replace(Config(), encoder_compute_budget=8, encoder_cache_size=8), model_cache_dir=models)


def test_fail_all_and_misuse(models):
    core = RealSchedulerCore(Config(), multimodal=False, model_cache_dir=models)
    with pytest.raises(ValueError, match="text-only"):
        core.add_request(RequestSpec("img", 0.0, 64, 1, (MMItem("i", 0, 16),)), 0.0)
    for i in range(3):
        core.add_request(RequestSpec(f"r{i}", 0.0, 16, 4), 0.0)
    first = core.schedule(0.0)
    core.schedule(STEP)
    with pytest.raises(ValueError, match="latest schedule"):
        core.update_from_output(first, STEP)
    assert core.fail_all() == ["r0", "r1", "r2"]
    assert not core.has_unfinished_requests() and core.counts() == (0, 0)


def test_config_vllm_rejects_is_one_line(models):
    with pytest.raises(ValueError, match=r"^vLLM rejects the scheduler config: Value error, max_num_batched_tokens "
                                         r"\(256\) is smaller than max_model_len \(2048\)[^\n]*$"):
        RealSchedulerCore(Config(max_num_batched_tokens=256, enable_chunked_prefill=False), model_cache_dir=models)


# ---- async scheduling: vLLM's AsyncScheduler ------------------------------------------------

def test_async_mode_builds_vllms_async_scheduler(models):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    on = RealSchedulerCore(Config(async_scheduling=True), multimodal=False, model_cache_dir=models)
    off = RealSchedulerCore(Config(), multimodal=False, model_cache_dir=models)
    assert isinstance(on.scheduler, AsyncScheduler) and on.async_scheduling
    assert not isinstance(off.scheduler, AsyncScheduler) and not off.async_scheduling
    assert on.scheduler.vllm_config.max_concurrent_batches == 2
    assert off.scheduler.vllm_config.max_concurrent_batches == 1


def test_async_outputs_come_back_oldest_first(models):
    """Two batches in flight: the second decode is scheduled on a placeholder; outputs are applied
    oldest first, each with the token its batch sampled."""
    from vllm_faultsim.models.step import sampled_token

    core = RealSchedulerCore(Config(async_scheduling=True), multimodal=False, model_cache_dir=models)
    core.add_request(RequestSpec("r", 0.0, 20, 4), 0.0)
    first = core.schedule(0.0)
    second = core.schedule(STEP)
    assert first.sched == {"r": 20} and second.sched == {"r": 1} and second.computed_before == {"r": 20}
    assert first.sampling == {"r"} and second.sampling == {"r"}
    assert core.scheduler.requests["r"].num_output_placeholders == 2
    with pytest.raises(ValueError, match="oldest batch in flight"):
        core.update_from_output(second, STEP)
    assert core.update_from_output(first, STEP) == []
    assert core.last_step.index == 1  # the latest schedule(); the output applied was step 0's
    assert list(core.scheduler.requests["r"].output_token_ids) == [sampled_token("r", 1, None)]
    core.update_from_output(second, 2 * STEP)
    assert list(core.scheduler.requests["r"].output_token_ids) == [sampled_token("r", k, None) for k in (1, 2)]


def test_async_samples_are_what_a_worker_fed_at_schedule_time_samples(models):
    """Through the twin's batch-queue loop, under KV pressure (preemptions with a batch in flight)
    and EOS stops (outputs in flight dropped): every batch's ModelRunnerOutput is what
    DeterministicRunner, the dry run's worker, samples when it gets the SchedulerOutput at
    schedule() (as execute_model(non_block=True) does); every request's tokens are
    sampled_token(1..n)."""
    from vllm_faultsim.faults.plan import FaultPlan
    from vllm_faultsim.harness.drivers.vllm_adapter import DeterministicRunner
    from vllm_faultsim.harness.runs.simulate import RunConfig, run_engine
    from vllm_faultsim.models.step import sampled_token

    cfg = Config(async_scheduling=True, num_gpu_blocks=12, max_num_batched_tokens=64, enable_prefix_caching=True)
    specs = poisson(200, num_requests=16, prompt={"uniform": [8, 90]}, output={"uniform": [2, 30]}, seed=5)
    specs = tuple(RequestSpec(s.req_id, s.arrival, s.prompt_len, s.output_len, stop_at=s.output_len // 2 or None)
                  if i % 3 == 0 else s for i, s in enumerate(specs))
    stop_at = {s.req_id: s.stop_at for s in specs}
    core = RealSchedulerCore(cfg, multimodal=False, model_cache_dir=models)
    worker, fed, applied, tokens = DeterministicRunner(stop_at), {}, [], {}
    schedule = core.schedule

    def schedule_and_feed(now):
        res = schedule(now)
        out = worker.execute_model(core.last_step.scheduler_output)
        fed[core.last_step.index] = dict(zip(out.req_ids, out.sampled_token_ids))
        return res

    def on_step(step):
        mro = step.model_runner_output
        applied.append((step.index, dict(zip(mro.req_ids, mro.sampled_token_ids))))
        for eco in step.engine_core_outputs.values():
            for o in eco.outputs:
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)

    core.schedule, core.on_step = schedule_and_feed, on_step
    result = run_engine(core, specs, RunConfig(scheduler=cfg), FaultPlan(), side="real")
    assert [i for i, _ in applied] == sorted(fed)  # every batch applied, oldest first
    assert all(sampled == fed[i] for i, sampled in applied)
    assert result.summary["preemptions"] > 0  # a victim preempted with its decode in flight
    for s in specs:
        n = s.stop_at or s.output_len
        assert tokens[s.req_id] == [sampled_token(s.req_id, k, s.stop_at) for k in range(1, n + 1)], s.req_id
