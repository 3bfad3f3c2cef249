"""vLLM's own per-step outputs on the real CPU driver, as a user's scheduler test reads them (no
private attribute): the SchedulerOutput beside the StepResult, the stand-in KV connector's
metadata with its token counts, an EC item's readiness by step and by time, and vLLM's
``reset_prefix_cache`` (with the preemptions it causes, in vLLM's order)."""

from functools import partial

import pytest

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e .[vllm])")

from vllm_faultsim.harness.drivers.real_scheduler import RealSchedulerCore  # noqa: E402
from vllm_faultsim.harness.drivers.vllm_adapter import VllmStep  # noqa: E402
from vllm_faultsim.harness.workload import MMItem, RequestSpec  # noqa: E402
from vllm_faultsim.models.ec_connector import PrefetchSchedule  # noqa: E402
from vllm_faultsim.models.scheduler import SchedulerConfig  # noqa: E402

STEP = 0.025
Config = partial(SchedulerConfig, max_num_seqs=4, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=200,
                 max_model_len=2048, encoder_compute_budget=512, encoder_cache_size=512)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def step(core, now):
    res = core.schedule(now)
    if res.sched:
        core.update_from_output(res, now + STEP)
    return res


def test_scheduler_output_beside_the_step_result(models):
    core = RealSchedulerCore(Config(), multimodal=False, model_cache_dir=models)
    seen: list[VllmStep] = []
    core.on_step = seen.append
    core.add_request(RequestSpec("a", 0.0, 40, 2), 0.0)
    res = step(core, 0.0)
    last = core.last_step
    assert last.result is res and last.index == 0 and last.now == 0.0
    assert dict(last.scheduler_output.num_scheduled_tokens) == res.sched == {"a": 40}
    assert [r.req_id for r in last.scheduler_output.scheduled_new_reqs] == ["a"]
    assert last.model_runner_output.req_ids == ["a"] and len(last.model_runner_output.sampled_token_ids[0]) == 1
    assert last.kv_connector_metadata is None and last.ec_connector_metadata is None
    step(core, STEP)
    assert [s.index for s in seen] == [0, 1] and core.step_times == [0.0, STEP]
    outs = seen[1].engine_core_outputs
    assert [o.finish_reason is not None for eco in outs.values() for o in eco.outputs] == [True]


def test_stand_in_kv_connector_counts_its_external_tokens(models):
    core = RealSchedulerCore(Config(), multimodal=False, kv_external={"b": 40}, model_cache_dir=models)
    core.kv_connector.external["c"] = 100  # more than the prompt: all but its last token
    for spec in (RequestSpec("a", 0.0, 48, 1), RequestSpec("b", 0.0, 48, 1), RequestSpec("c", 0.0, 48, 1)):
        core.add_request(spec, 0.0)
    res = core.schedule(0.0)
    assert res.computed_before == {"a": 0, "b": 40, "c": 47}
    assert res.sched == {"a": 48, "b": 8, "c": 1}
    assert core.last_step.kv_connector_metadata.num_external_tokens == {"b": 40, "c": 47}
    core.update_from_output(res, STEP)
    assert core.schedule(STEP).sched == {}  # every request was finished by its one output
    assert core.last_step.kv_connector_metadata.num_external_tokens == {}


def test_ec_item_readiness_by_step_and_by_time(models):
    specs = [RequestSpec("deferred", 0.0, 200, 5, (MMItem("img", 0, 100, 0.05),)), RequestSpec("behind", 0.0, 20, 5)]
    core = RealSchedulerCore(Config(), PrefetchSchedule(tuple(specs)), model_cache_dir=models)
    for spec in specs:
        core.add_request(spec, 0.0)
    steps = [step(core, k * STEP) for k in range(3)]
    assert [s.deferred for s in steps] == [["deferred"], ["deferred"], []]
    assert core.last_step.ec_connector_metadata.loads == ["img"]
    assert [core.ec_item_ready("img", step=k) for k in range(3)] == [False, False, True]
    assert not core.ec_item_ready("img", at=0.0499) and core.ec_item_ready("img", at=0.05)
    with pytest.raises(ValueError, match=r"give the time \(at=\) or the step"):
        core.ec_item_ready("img")


def test_reset_prefix_cache_like_vllm(models):
    core = RealSchedulerCore(Config(enable_prefix_caching=True), multimodal=False, model_cache_dir=models)
    core.add_request(RequestSpec("a", 0.0, 64, 1, prefix=(0, 64)), 0.0)
    step(core, 0.0)
    core.add_request(RequestSpec("b", STEP, 64, 1, prefix=(0, 64)), STEP)
    assert step(core, STEP).computed_before == {"b": 48}  # a's blocks: the last one is recomputed
    assert core.reset_prefix_cache()
    core.add_request(RequestSpec("c", 2 * STEP, 64, 1, prefix=(0, 64)), 2 * STEP)
    assert step(core, 2 * STEP).computed_before == {"c": 0}


def test_reset_prefix_cache_preempts_the_running_requests_in_vllms_order(models):
    core = RealSchedulerCore(Config(enable_prefix_caching=True), multimodal=False, model_cache_dir=models)
    for rid in ("r0", "r1", "r2"):
        core.add_request(RequestSpec(rid, 0.0, 16, 4), 0.0)
    step(core, 0.0)
    assert not core.reset_prefix_cache()  # requests hold blocks
    assert core.reset_prefix_cache(reset_running_requests=True)
    res = step(core, STEP)
    assert res.preempted == ["r2", "r1", "r0"]  # running popped from its end
    assert res.sched == {"r0": 17, "r1": 17, "r2": 17} and res.computed_before == {"r0": 0, "r1": 0, "r2": 0}
    assert core.last_step.scheduler_output.preempted_req_ids == {"r0", "r1", "r2"}
