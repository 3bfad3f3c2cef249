"""DP load balancing, twin against vLLM 0.26.0's own code on CPU (harness/runs/dp_lb.py): generated
request streams through 1-4 front-end clients (``DPLBAsyncMPClient.get_core_engine_for_request``
and its stats-update task), the DP coordinator's stats loop (``DPCoordinatorProc``, on a virtual
clock) and 2-8 stand-in engine queues whose counts follow the requests routed to them; every
publication and every request's rank must be the same on both sides. Each mutant of
``DP_LB_MUTANTS`` (harness/mutants.py: the balancer's ``waiting-weight-1``, the coordinator's
``no-previous-step``) must diverge on some of the same generated cases."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e .[vllm])")

from vllm_faultsim.harness.drivers.real_dp_lb import skip_reason  # noqa: E402
from vllm_faultsim.harness.mutants import DP_LB_MUTANTS  # noqa: E402
from vllm_faultsim.harness.runs.dp_lb import Case, Request, first_divergence, replay_command, run_case  # noqa: E402

EXAMPLES = 200


@st.composite
def cases(draw) -> Case:
    num_ranks = draw(st.integers(2, 8))
    client_count = draw(st.integers(1, 4))
    n = draw(st.integers(1, 120))
    gap = draw(st.sampled_from([2, 10, 40]))   # mean arrival gap, ms: overload to light load
    explicit = draw(st.sampled_from([0.0, 0.1, 0.5]))   # share of requests with data_parallel_rank
    t, requests = 0, []
    for _ in range(n):
        t += draw(st.integers(0, 2 * gap))
        rank = draw(st.integers(0, num_ranks - 1)) if draw(st.floats(0, 1)) < explicit else None
        requests.append(Request(arrival_ms=t, client=draw(st.integers(0, client_count - 1)),
                                steps=draw(st.integers(1, 40)), data_parallel_rank=rank))
    return Case(num_ranks=num_ranks, client_count=client_count, requests=tuple(requests),
                step_ms=draw(st.integers(5, 40)), max_num_seqs=draw(st.integers(1, 8)),
                stats_delay_ms=draw(st.integers(0, 5)), publish_delay_ms=draw(st.integers(0, 5)),
                route_delay_ms=draw(st.integers(0, 5)), engines_send_stats=draw(st.booleans() | st.just(True)))


def test_twin_chooses_the_ranks_vllm_chooses(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(f"diff tier (DP load balancing): {reason}")
    seen = {"cases": 0, "choices": 0, "publications": 0}
    caught = {m: [] for m in DP_LB_MUTANTS}   # the cases each mutant diverges on

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases())
    def check(case):
        real, sim = run_case(case, "real"), run_case(case, "sim")
        div = first_divergence(sim, real)
        if div:
            path = tmp_path / "case.json"
            path.write_text(case.to_json())
            raise AssertionError(f"twin vs vLLM: {div}\nreplay: {replay_command(str(path))}")
        seen["cases"] += 1
        seen["choices"] += sum(e[0] == "choose" for e in real)
        seen["publications"] += sum(e[0] == "publish" for e in real)
        for mutant, cases_caught in caught.items():
            if first_divergence(run_case(case, "sim", mutant), real):
                cases_caught.append(case)

    check()
    print(f"\n{seen['cases']} cases, {seen['choices']} choices and {seen['publications']} publications identical")
    for mutant, cases_caught in caught.items():
        print(f"mutant {mutant} diverges on {len(cases_caught)} of {seen['cases']} cases")
    missed = [m for m, c in caught.items() if not c]
    assert not missed, f"mutants never diverged: {missed} (the generated cases cannot show their rule)"
    for mutant, cases_caught in caught.items():
        first = min(cases_caught, key=lambda c: len(c.requests))   # the smallest diverging case
        path = tmp_path / f"{mutant}.json"
        path.write_text(first.to_json())
        div = first_divergence(run_case(first, "sim", mutant), run_case(first, "real"))
        print(f"  {mutant}, smallest diverging case ({div}):\n    {replay_command(str(path), mutant)}")
