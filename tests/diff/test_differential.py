"""The simulator against the real vLLM 0.26.0 Scheduler on CPU, in both scheduling modes: zero
divergences over generated cases (the same cases with async scheduling off, vLLM's ``Scheduler``
and the synchronous loop, and on, vLLM's ``AsyncScheduler`` and the twin of
``EngineCore.step_with_batch_queue``), upstream's EC-deferral scenario on both sides, and every
mutant caught."""

import os
import zlib
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis import seed as hseed

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e '.[vllm]')")

from vllm_faultsim.harness.checkers.divergence import first_divergence  # noqa: E402
from vllm_faultsim.harness.mutants import ASYNC, KV_CONNECTOR, SCHEDULER_MUTANTS  # noqa: E402
from vllm_faultsim.harness.runs.diff import DiffCase, check_case, run_side, search  # noqa: E402
from vllm_faultsim.harness.runs.simulate import RunConfig, prefetch_schedule, run_engine  # noqa: E402
from vllm_faultsim.harness.strategies import fault_plans, scheduler_configs, workloads  # noqa: E402
from vllm_faultsim.models.ec_connector import ECConnector  # noqa: E402
from vllm_faultsim.harness.workload import MMItem, RequestSpec  # noqa: E402
from vllm_faultsim.models.kv_offload import installed_vllm_version, version_policy  # noqa: E402
from vllm_faultsim.models.scheduler import Scheduler, SchedulerConfig, for_release  # noqa: E402

EXAMPLES = int(os.environ.get("VLLM_FAULTSIM_DIFF_EXAMPLES", "100"))  # per profile and mode; CI: 100 x 3 x 2
SMALL = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=200,
                        max_model_len=2048, encoder_compute_budget=512, encoder_cache_size=512)
MODES = {"sync": False, "async": True}
PROFILES = {"text": dict(mm=False), "mixed": dict(mm=True), "kv-pressure": dict(mm=True, kv_pressure=True)}


def seed_of(profile: str) -> int:
    return zlib.crc32(profile.encode()) % 1000  # stable across processes (hash() of a str is not)


def in_mode(case: DiffCase, mode: str) -> DiffCase:
    return replace(case, scheduler=replace(case.scheduler, async_scheduling=MODES[mode]))


def steps(events):
    return [e for e in events if e["kind"] == "step"]


@pytest.mark.parametrize("mode", MODES)
def test_upstream_ec_deferral_scenario_on_both_sides(mode):
    specs = (RequestSpec("deferred", 0.0, 200, 5, (MMItem("hash0_0", 0, 100, 0.05),)),
             RequestSpec("behind", 0.0, 20, 5))
    case = in_mode(DiffCase(specs, SMALL), mode)
    for side in ("sim", "real"):
        s = steps(run_side(case, side))
        assert s[0]["sched"] == {"behind": 20} and s[0]["deferred"] == ["deferred"], side
        resumed = next(e for e in s if "deferred" in e["sched"])
        assert resumed["sched"]["deferred"] == 200 and resumed["ec_loaded"] == ["hash0_0"], side
        assert resumed["t"] >= 0.05
    assert check_case(case) is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("profile", PROFILES)
def test_zero_divergences_over_generated_cases(profile, mode):
    """Against the installed release (0.23.0's free queue: a recomputed request's prefix hits
    follow it, models/scheduler.py for_release)."""
    n, case, div = search(EXAMPLES, seed=seed_of(profile), async_scheduling=MODES[mode], **PROFILES[profile])
    assert div is None, f"{div.explain()}\nreplay: save with vllm_faultsim.harness.runs.diff.save_case\n{case.to_json()}"
    assert n == EXAMPLES


def test_async_decodes_overlap_and_outputs_come_back_a_step_late():
    """Under async scheduling a decode is scheduled while the previous one's token is in flight:
    one request of 3 outputs takes a prefill and 2 decodes, the last batch samples nothing more
    (max_tokens reached with what is in flight), on both sides."""
    case = DiffCase((RequestSpec("r", 0.0, 20, 3),), SMALL)
    for side in ("sim", "real"):
        s = steps(run_side(case, side))
        assert [e["sched"] for e in s] == [{"r": 20}, {"r": 1}, {"r": 1}, {}], side
        assert s[2]["finished"] == ["r"], side  # the third output comes back with the third batch
    assert check_case(case) is None


# The installed release's encoder-freeing rule (models/scheduler.py for_release) and the other one:
# 0.26.0 frees an encoder input at num_computed_tokens - num_output_placeholders (scheduler.py:2050),
# 0.23.0 at num_computed_tokens (the twin's rule before 7b2ed65 too), a batch earlier under async.
# OTHER_RELEASE is the installed release's twin with that rule alone flipped (0.23.0 differs in others
# too: for_release).
RELEASE_0_23 = version_policy(installed_vllm_version() or "0.26.0") == "0.23"
_INSTALLED = for_release(Scheduler, installed_vllm_version())
OTHER_RELEASE = type("OtherEncoderFreeing", (_INSTALLED,),
                     {"free_encoder_past_placeholders": not _INSTALLED.free_encoder_past_placeholders})


def test_encoder_input_is_freed_after_the_outputs_in_flight():
    """0.26.0: an image that ends at its prompt's end stays in the encoder cache until the batch
    after the one that finished the prefill came back, so the second image (the cache holds one)
    waits a step; 0.23.0 frees it a batch earlier. The twin follows the installed release, and the
    other release's rule diverges from it."""
    cfg = replace(SMALL, encoder_compute_budget=100, encoder_cache_size=100)
    case = DiffCase((RequestSpec("a", 0.0, 100, 5, (MMItem("ia", 0, 100, None),)),
                     RequestSpec("b", 0.0, 100, 5, (MMItem("ib", 0, 100, None),))), cfg)
    late = [{"a": 100}, {"a": 1}, {"a": 1}, {"a": 1, "b": 100}]
    early = [{"a": 100}, {"a": 1}, {"a": 1, "b": 100}]
    real = run_side(case, "real")
    want, other = (early, late) if RELEASE_0_23 else (late, early)
    assert [e["sched"] for e in steps(real)[:len(want)]] == want
    assert check_case(case) is None
    wrong = sim_events(case, OTHER_RELEASE)
    assert [e["sched"] for e in steps(wrong)[:len(other)]] == other
    assert first_divergence(wrong, real) is not None


def sim_events(case: DiffCase, scheduler_cls) -> list[dict]:
    prefetch = prefetch_schedule(case.specs, case.plan)
    core = scheduler_cls(case.scheduler, ECConnector(prefetch))
    return run_engine(core, case.specs, RunConfig(scheduler=case.scheduler, seed=case.seed), case.plan,
                      side="sim", prefetch=prefetch).events


@st.composite
def encoder_pressure_cases(draw, async_scheduling: bool):
    """Generated multimodal cases whose encoder cache holds just the largest image, some requests'
    last image moved to their prompt's end (its freeing waits for the outputs in flight)."""
    specs = []
    for spec in draw(workloads(mm=True)):
        if spec.mm and draw(st.booleans()):
            last, before = spec.mm[-1], spec.mm[:-1]
            offset = spec.prompt_len - last.length
            if offset >= (before[-1].offset + before[-1].length if before else 0):
                spec = replace(spec, mm=before + (replace(last, offset=offset),))
        specs.append(spec)
    size = max([16] + [m.length for spec in specs for m in spec.mm])  # 16: tiny-llava's image
    sched = replace(draw(scheduler_configs(async_scheduling=async_scheduling)), encoder_cache_size=size,
                    encoder_compute_budget=size)
    return DiffCase(tuple(specs), sched, draw(fault_plans()), 0)


@pytest.mark.parametrize("mode", MODES)
def test_zero_divergences_under_encoder_cache_pressure(mode):
    """The generated matrix's encoder caches (300/600 tokens) never fill: here they hold one image.
    The other release's freeing rule (OTHER_RELEASE) diverges from the installed one's on some of
    these async cases (0.26.0: 4 of the 100; 51 of 500 with another seed), never on the sync ones."""
    seen = {"cases": 0, "old_rule_differs": 0}

    @hseed(seed_of("encoder-pressure"))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=encoder_pressure_cases(MODES[mode]))
    def prop(case):
        div = check_case(case)
        assert div is None, f"{div.explain()}\n{case.to_json()}"
        seen["cases"] += 1
        seen["old_rule_differs"] += first_divergence(sim_events(case, OTHER_RELEASE),
                                                     run_side(case, "sim")) is not None

    prop()
    print(f"encoder pressure ({mode}): {seen}")
    assert seen["cases"] == EXAMPLES
    if MODES[mode]:
        assert seen["old_rule_differs"] > 0, seen
    else:  # no placeholders: the rules agree
        assert seen["old_rule_differs"] == 0, seen


# One targeted case per mutant: the checker must report a divergence on it.
def _case_stop_at_deferred():
    return DiffCase((RequestSpec("a", 0.0, 200, 3, (MMItem("ia", 0, 100, 0.05),)), RequestSpec("b", 0.0, 20, 3)),
                    SMALL)


def _case_check_all_features():
    # b's prefix-cache hit (32 tokens, from a) covers its first image; only its staging is slow
    a = RequestSpec("a", 0.0, 40, 2, (MMItem("pfx0", 0, 8, 0.0),), (0, 32))
    b = RequestSpec("b", 0.2, 48, 2, (MMItem("pfx0", 0, 8, 0.5),), (0, 32))
    return DiffCase((a, b), replace(SMALL, enable_prefix_caching=True))


def _case_requeue_back():
    specs = (RequestSpec("a", 0.0, 60, 2, (MMItem("ia", 0, 30, 0.05),)), RequestSpec("b", 0.0, 20, 2),
             RequestSpec("c", 0.0, 20, 2))
    return DiffCase(specs, replace(SMALL, max_num_seqs=1))


def _case_full_admission():
    specs = tuple(RequestSpec(f"r{i}", 0.0, 120, 8) for i in range(3))
    return DiffCase(specs, replace(SMALL, num_gpu_blocks=20, max_num_batched_tokens=64))


def _case_one_request():
    # no placeholders: the second decode waits for the first's token (a step with nothing for r);
    # a queue of 1 or outputs applied at once: the last decode runs past max_tokens' in-flight check
    return DiffCase((RequestSpec("r", 0.0, 20, 3),), SMALL)


def _case_cache_with_placeholders():
    # bs 4, 7 usable blocks: b is preempted (step 5) while its decode is in flight; vLLM had cached
    # its blocks up to num_computed_tokens - placeholders (8 tokens), so it resumes with an 8-token
    # hit and recomputes 5; cached at num_computed_tokens (12), the mutant's b recomputes 1
    return DiffCase((RequestSpec("a", 0.0, 8, 6), RequestSpec("b", 0.0, 8, 6)),
                    replace(SMALL, block_size=4, num_gpu_blocks=8, max_num_batched_tokens=64, max_model_len=64,
                            enable_prefix_caching=True))


def _case_free_in_order():
    # max_num_seqs 1, bs 4: r3 caches the 32-token prefix; r0 and r1 (101 and 173 tokens) run
    # next, freeing their blocks; vLLM 0.26.0 puts the hashless ones first in the free queue, so r1
    # takes them and the prefix stays cached for r2 (a 32-token hit: 1 token scheduled); freed in
    # order (0.23.0's rule), the prefix blocks are evicted first and r2 computes 5
    specs = (RequestSpec("r3", 0.0, 32, 1, prefix=(1, 32)), RequestSpec("r4", 0.0, 1, 1),
             RequestSpec("r0", 0.5, 101, 17), RequestSpec("r1", 0.5, 173, 1),
             RequestSpec("r2", 0.5, 33, 1, prefix=(1, 32)))
    return DiffCase(specs, replace(SMALL, max_num_seqs=1, max_num_batched_tokens=32, block_size=4, num_gpu_blocks=83,
                                   max_model_len=332, enable_prefix_caching=True))


MUTANT_CASES = {"ec-stop-at-deferred": _case_stop_at_deferred, "ec-check-all-features": _case_check_all_features,
                "ec-requeue-back": _case_requeue_back, "no-full-admission": _case_full_admission,
                "no-placeholders": _case_one_request, "batch-queue-1": _case_one_request,
                "outputs-in-same-step": _case_one_request, "cache-with-placeholders": _case_cache_with_placeholders,
                "free-in-order": _case_free_in_order}
# (ec-local-tokens-only needs a KV connector offering external tokens: tests/diff/test_ec_kv_order.py)
MUTANT_MODES = [(m, mode) for m in sorted(set(SCHEDULER_MUTANTS) - set(KV_CONNECTOR))
                for mode in (("async",) if m in ASYNC else tuple(MODES))]


def _rule_of_the_installed_release(mutant: str) -> dict:
    """The rules a mutant sets that the installed release's twin already follows (0.23.0 frees in
    order: free-in-order is its own rule there)."""
    cls = SCHEDULER_MUTANTS[mutant].scheduler_cls
    own = ({k: v for k, v in vars(cls).items() if not k.startswith("_") and not callable(v)}
           if cls not in (None, Scheduler) else {})
    return own if own and all(getattr(_INSTALLED, k, None) == v for k, v in own.items()) else {}


@pytest.mark.parametrize(("mutant", "mode"), MUTANT_MODES)
def test_mutant_is_caught(mutant, mode):
    if same := _rule_of_the_installed_release(mutant):
        pytest.skip(f"vLLM {installed_vllm_version()} follows the mutant's rule itself ({same}): nothing to catch")
    case = in_mode(MUTANT_CASES[mutant](), mode)
    assert check_case(case) is None, "the faithful simulator must agree on the mutant's case"
    div = check_case(case, mutant)
    assert div is not None, f"mutant {mutant} was not caught"
    print(f"{mutant} ({mode}): {div.where}, field {div.field}")


# The async matrix itself catches the async mutants (stopping at the first divergence, unshrunk);
# cache-with-placeholders only shows where a request is preempted with a decode in flight and its
# blocks are hit when it resumes (about 1 in 75 KV-pressure text cases with prefix caching): the
# matrix's 100 KV-pressure cases do not show it, 600 of them with prefix caching on do.
MATRIX_CATCHES = {"no-placeholders": dict(PROFILES["text"]), "batch-queue-1": dict(PROFILES["text"]),
                  "outputs-in-same-step": dict(PROFILES["text"]),
                  "cache-with-placeholders": dict(mm=False, kv_pressure=True, prefix_caching=True)}


@pytest.mark.parametrize("mutant", ASYNC)
def test_async_mutant_is_caught_by_generated_cases(mutant):
    examples = 600 if mutant == "cache-with-placeholders" else EXAMPLES
    n, case, div = search(examples, seed=seed_of("text"), mutant=mutant, shrink=False, **MATRIX_CATCHES[mutant])
    assert div is not None, f"mutant {mutant} not caught in {n} generated async cases"
    print(f"{mutant}: caught at generated case {n}: {div.where}, field {div.field}")
