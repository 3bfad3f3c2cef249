"""The simulator against the real vLLM 0.26.0 Scheduler on CPU: zero divergences over generated
cases, upstream's EC-deferral scenario on both sides, and every mutant caught."""

import os

import pytest

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e '.[vllm]')")

from vllm_faultsim.harness.mutants import SCHEDULER_MUTANTS as MUTANTS  # noqa: E402
from vllm_faultsim.harness.runs.diff import DiffCase, check_case, run_side, search  # noqa: E402
from vllm_faultsim.harness.workload import MMItem, RequestSpec  # noqa: E402
from vllm_faultsim.models.scheduler import SchedulerConfig  # noqa: E402

EXAMPLES = int(os.environ.get("VLLM_FAULTSIM_DIFF_EXAMPLES", "100"))  # per profile; CI: 100 x 3 = 300
SMALL = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, block_size=16, num_gpu_blocks=200,
                        max_model_len=2048, encoder_compute_budget=512, encoder_cache_size=512)


def steps(events):
    return [e for e in events if e["kind"] == "step"]


def test_upstream_ec_deferral_scenario_on_both_sides():
    specs = (RequestSpec("deferred", 0.0, 200, 5, (MMItem("hash0_0", 0, 100, 0.05),)),
             RequestSpec("behind", 0.0, 20, 5))
    case = DiffCase(specs, SMALL)
    for side in ("sim", "real"):
        s = steps(run_side(case, side))
        assert s[0]["sched"] == {"behind": 20} and s[0]["deferred"] == ["deferred"], side
        resumed = next(e for e in s if "deferred" in e["sched"])
        assert resumed["sched"]["deferred"] == 200 and resumed["ec_loaded"] == ["hash0_0"], side
        assert resumed["t"] >= 0.05
    assert check_case(case) is None


@pytest.mark.parametrize("profile", ["text", "mixed", "kv-pressure"])
def test_zero_divergences_over_generated_cases(profile):
    n, case, div = search(EXAMPLES, seed=hash(profile) % 1000, mm=profile != "text",
                          kv_pressure=True if profile == "kv-pressure" else None)
    assert div is None, f"{div.explain()}\nreplay: save with vllm_faultsim.harness.runs.diff.save_case\n{case.to_json()}"
    assert n == EXAMPLES


# One targeted case per mutant: the checker must report a divergence on it.
def _case_stop_at_deferred():
    return DiffCase((RequestSpec("a", 0.0, 200, 3, (MMItem("ia", 0, 100, 0.05),)), RequestSpec("b", 0.0, 20, 3)),
                    SMALL)


def _case_check_all_features():
    # b's prefix-cache hit (32 tokens, from a) covers its first image; only its staging is slow
    a = RequestSpec("a", 0.0, 40, 2, (MMItem("pfx0", 0, 8, 0.0),), (0, 32))
    b = RequestSpec("b", 0.2, 48, 2, (MMItem("pfx0", 0, 8, 0.5),), (0, 32))
    return DiffCase((a, b), SchedulerConfig(**{**SMALL.__dict__, "enable_prefix_caching": True}))


def _case_requeue_back():
    specs = (RequestSpec("a", 0.0, 60, 2, (MMItem("ia", 0, 30, 0.05),)), RequestSpec("b", 0.0, 20, 2),
             RequestSpec("c", 0.0, 20, 2))
    return DiffCase(specs, SchedulerConfig(**{**SMALL.__dict__, "max_num_seqs": 1}))


def _case_full_admission():
    specs = tuple(RequestSpec(f"r{i}", 0.0, 120, 8) for i in range(3))
    return DiffCase(specs, SchedulerConfig(**{**SMALL.__dict__, "num_gpu_blocks": 20, "max_num_batched_tokens": 64}))


MUTANT_CASES = {"ec-stop-at-deferred": _case_stop_at_deferred, "ec-check-all-features": _case_check_all_features,
                "ec-requeue-back": _case_requeue_back, "no-full-admission": _case_full_admission}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_is_caught(mutant):
    case = MUTANT_CASES[mutant]()
    assert check_case(case) is None, "the faithful simulator must agree on the mutant's case"
    div = check_case(case, mutant)
    assert div is not None, f"mutant {mutant} was not caught"
    print(f"{mutant}: {div.where}, field {div.field}")
