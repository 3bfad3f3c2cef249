"""EC deferral beside a KV connector (issue 11 item 6): vLLM 0.26.0 asks the KV connector first and
calls ``ensure_cache_available`` with local + external computed tokens, so an image the remote KV
store already covers is not waited for. The twin (models/scheduler.py + models/external_kv.py)
against the real Scheduler with the stand-in ExternalTokensKVConnector, over generated cases, and
the mutant that gives the EC lookup the local tokens only, caught; under async scheduling the
scheduler defers freeing blocks a batch in flight may still write (vLLM's ``defer_block_free``
with a KV-consumer connector), and the mutant that frees them at once is caught."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e '.[vllm]')")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hseed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vllm_faultsim.faults.plan import FaultPlan  # noqa: E402
from vllm_faultsim.harness.checkers.divergence import first_divergence  # noqa: E402
from vllm_faultsim.harness.drivers.real_scheduler import RealSchedulerCore  # noqa: E402
from vllm_faultsim.harness.mutants import SCHEDULER_MUTANTS  # noqa: E402
from vllm_faultsim.harness.runs.simulate import RunConfig, prefetch_schedule, run_engine  # noqa: E402
from vllm_faultsim.harness.strategies import scheduler_configs, workloads  # noqa: E402
from vllm_faultsim.models.ec_connector import ECConnector  # noqa: E402
from vllm_faultsim.models.external_kv import ExternalTokensConnector  # noqa: E402
from vllm_faultsim.models.request import MMItem, RequestSpec  # noqa: E402
from vllm_faultsim.models.kv_offload import installed_vllm_version  # noqa: E402
from vllm_faultsim.models.scheduler import Scheduler, SchedulerConfig, for_release  # noqa: E402


def side(specs, sched, external, which, scheduler_cls=Scheduler):
    plan = FaultPlan()
    prefetch = prefetch_schedule(specs, plan)
    if which == "sim":
        core = for_release(scheduler_cls, installed_vllm_version())(sched, ECConnector(prefetch))
        core.attach_kv_connector(ExternalTokensConnector(external))
    else:
        core = RealSchedulerCore(sched, ec=prefetch, kv_external=external)
    return run_engine(core, specs, RunConfig(scheduler=sched), plan, side=which, prefetch=prefetch).events


SMALL = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=200,
                        max_model_len=2048, encoder_compute_budget=512, encoder_cache_size=512,
                        async_scheduling=False)


def test_an_image_the_kv_store_covers_is_not_waited_for():
    """A 200-token prompt whose 100-token image (slow prefetch) lies in its first 160 tokens, all of
    which the KV store holds: scheduled at once, the image neither waited for nor encoded."""
    specs = (RequestSpec("r", 0.0, 200, 4, (MMItem("img", 16, 100, 5.0),)),)
    for which in ("sim", "real"):
        first = next(e for e in side(specs, SMALL, {"r": 160}, which) if e["kind"] == "step")
        assert first["sched"] == {"r": 40} and "deferred" not in first and "enc" not in first, which
    bad = next(e for e in side(specs, SMALL, {"r": 160}, "sim", SCHEDULER_MUTANTS["ec-local-tokens-only"].scheduler_cls)
               if e["kind"] == "step")
    assert bad["deferred"] == ["r"]


def _check(specs, sched, seed, scheduler_cls=Scheduler):
    rnd = random.Random(seed)
    external = {s.req_id: rnd.choice([0, s.prompt_len // 2, s.prompt_len]) for s in specs if rnd.random() < 0.6}
    return first_divergence(side(specs, sched, external, "sim", scheduler_cls), side(specs, sched, external, "real"))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_zero_divergences_with_external_tokens(async_scheduling):
    @hseed(42)
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(specs=workloads(mm=True), sched=scheduler_configs(async_scheduling=async_scheduling),
           seed=st.integers(0, 1 << 20))
    def prop(specs, sched, seed):
        div = _check(specs, sched, seed)
        assert div is None, div.explain()

    prop()


@pytest.mark.parametrize(("mutant", "async_scheduling"), [("ec-local-tokens-only", False), ("free-at-once", True)])
def test_the_mutant_is_caught_over_generated_cases(mutant, async_scheduling):
    if mutant == "free-at-once" and for_release(Scheduler, installed_vllm_version()) is not Scheduler:
        pytest.skip("vLLM 0.23.0 has no defer_block_free: its twin frees at once, as the mutant does")
    caught = []

    @hseed(43)
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(specs=workloads(mm=True), sched=scheduler_configs(async_scheduling=async_scheduling),
           seed=st.integers(0, 1 << 20))
    def prop(specs, sched, seed):
        if _check(specs, sched, seed, SCHEDULER_MUTANTS[mutant].scheduler_cls) is not None:
            caught.append(seed)

    prop()
    assert caught, f"{mutant} not caught in 60 generated cases"
