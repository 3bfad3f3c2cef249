"""The DP load-balancing twins (models/dp_lb.py) on hand-worked cases: DPLBAsyncMPClient's scan
(start index, ties, rotation, local increments between publications, explicit ranks) and the DP
coordinator's publication rule (first after 50 ms, 100 ms while counts change, 5 s otherwise, the
50 ms quiet wait, the previous step's snapshot)."""

import pytest

from vllm_faultsim.harness.mutants import DP_LB_MUTANTS
from vllm_faultsim.harness.runs.dp_lb import Case, Request, first_divergence, run_case
from vllm_faultsim.models.dp_lb import DPCoordinator, DPLoadBalancer


def test_scan_starts_at_the_clients_share_and_rotates():
    lb = DPLoadBalancer(4, client_count=2, client_index=1)
    assert lb.eng_start_index == 2   # 4 * 1 // 2
    # all empty: each pick is the scan's first engine (ties), then the start moves one on
    assert [lb.choose() for _ in range(4)] == [2, 3, 0, 1]
    assert lb.lb_engines == [[2, 0]] * 4   # each pick added client_count waiting
    assert DPLoadBalancer(3, client_count=2, client_index=1).eng_start_index == 1   # 3 * 1 // 2


def test_ties_go_to_the_first_in_scan_order():
    lb = DPLoadBalancer(3)
    lb.publish([(0, 1), (0, 0), (0, 0)])
    assert lb.choose() == 1   # 1 and 2 tie at score 0: the scan (from 0) meets 1 first
    lb.publish([(0, 0), (0, 0), (0, 0)])
    assert lb.eng_start_index == 1 and lb.choose() == 1   # scan 1, 2, 0: 1 first
    assert lb.choose() == 2   # 1 now has waiting 1 (score 4); scan 2, 0, 1: 2 first


def test_waiting_weighs_four_running_requests():
    counts = [(1, 0), (0, 3)]
    lb = DPLoadBalancer(2)
    lb.publish(counts)
    assert lb.choose() == 1   # 0 * 4 + 3 = 3 < 1 * 4 + 0 = 4
    mutant = DP_LB_MUTANTS["waiting-weight-1"](2)
    mutant.publish(counts)
    assert mutant.choose() == 0   # the mutant: 1 < 3


def test_local_increments_count_every_client_until_the_next_publication():
    lb = DPLoadBalancer(2, client_count=3, client_index=0)
    lb.publish([(0, 5), (0, 0)])
    assert lb.choose() == 1 and lb.lb_engines == [[0, 5], [3, 0]]   # + client_count: 3 waiting * 4 = 12
    assert lb.choose() == 0 and lb.lb_engines == [[3, 5], [3, 0]]   # 5 < 12
    assert lb.choose() == 1   # 17 vs 12
    lb.publish([(0, 5), (0, 0)])   # the coordinator's counts replace the local increments
    assert lb.lb_engines == [[0, 5], [0, 0]] and lb.choose() == 1


def test_publish_copies_the_counts():
    counts = [[0, 0], [0, 0]]
    lb = DPLoadBalancer(2)
    lb.publish(counts)
    lb.choose()
    assert counts == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="published counts for 3 ranks, the client has 2"):
        lb.publish([(0, 0)] * 3)


def test_an_explicit_rank_is_taken_as_is():
    lb = DPLoadBalancer(3, client_count=2, client_index=1)
    lb.publish([(9, 9), (0, 0), (0, 0)])
    assert lb.choose(data_parallel_rank=0) == 0
    assert lb.lb_engines == [[9, 9], [0, 0], [0, 0]] and lb.eng_start_index == 1   # no increment, no rotation
    with pytest.raises(ValueError, match=r"data_parallel_rank 3 is out of range \[0, 3\)\."):
        lb.choose(data_parallel_rank=3)


def test_bad_balancer_arguments():
    with pytest.raises(ValueError, match="num_ranks must be > 1"):
        DPLoadBalancer(1)
    with pytest.raises(ValueError, match=r"client_index must be in \[0, 2\)"):
        DPLoadBalancer(4, client_count=2, client_index=2)


def test_coordinator_publishes_zeros_after_50_ms_then_every_5_s_while_nothing_changes():
    c = DPCoordinator(2)
    assert c.publish_time() == 0.05 and c.maybe_publish(0.049) is None
    assert c.maybe_publish(0.05) == [[0, 0], [0, 0]]
    assert c.publish_time() == 5.05
    assert c.maybe_publish(5.05) == [[0, 0], [0, 0]] and c.publish_time() == 10.05


def test_coordinator_publishes_changed_counts_100_ms_after_the_last_publication():
    c = DPCoordinator(2)
    c.maybe_publish(0.05)
    c.scheduler_stats(1.0, 1, num_waiting_reqs=2, num_running_reqs=1, step_counter=0)
    assert c.publish_time() == 1.05   # 100 ms since 0.05 are long past: the 50 ms quiet wait
    c.scheduler_stats(1.03, 0, 1, 0, step_counter=0)   # same step: no snapshot; the wait starts again
    assert c.publish_time() == 1.08
    assert c.maybe_publish(1.08) == [[1, 0], [2, 1]]
    assert c.publish_time() == 6.08   # nothing changed since
    c.scheduler_stats(1.1, 0, 0, 1, step_counter=1)
    assert c.publish_time() == 1.18   # 100 ms after 1.08
    with pytest.raises(ValueError, match="stats at 1190 ms"):
        c.scheduler_stats(1.19, 0, 0, 1, step_counter=1)   # past the publication: publish first


def test_stats_closer_than_50_ms_hold_the_publication_back():
    c = DPCoordinator(2)
    c.maybe_publish(0.05)
    for i in range(10):   # one engine, same step, every 40 ms
        c.scheduler_stats(1.0 + 0.04 * i, 0, i, 0, step_counter=0)
    assert c.publish_time() == pytest.approx(1.41)


def test_a_newer_step_publishes_the_previous_steps_counts_first():
    c = DPCoordinator(2)
    c.maybe_publish(0.05)
    c.scheduler_stats(1.0, 0, 3, 0, step_counter=4)
    c.scheduler_stats(1.01, 1, 2, 0, step_counter=4)
    c.scheduler_stats(1.02, 0, 0, 3, step_counter=5)   # step 5 begins: step 4's counts are kept
    assert c.publish_time() == 1.02   # a snapshot is held: no quiet wait, and 100 ms are past
    assert c.maybe_publish(1.02) == [[3, 0], [2, 0]]
    assert c.publish_time() == 1.12   # still changed
    assert c.maybe_publish(1.12) == [[0, 3], [2, 0]]
    assert c.publish_time() == 6.12
    c.scheduler_stats(6.0, 1, 0, 1, step_counter=3)   # an older step: applied, no snapshot
    assert c.maybe_publish(c.publish_time()) == [[0, 3], [0, 1]]


def test_runs_are_deterministic_and_dense_engines_leave_the_counts_at_zero():
    reqs = tuple(Request(arrival_ms=7 * i, client=i % 2, steps=1 + i % 5,
                         data_parallel_rank=1 if i % 9 == 0 else None) for i in range(60))
    case = Case(num_ranks=3, client_count=2, requests=reqs, step_ms=15, max_num_seqs=2)
    sim = run_case(case)
    assert sim == run_case(Case.from_json(case.to_json()))
    assert sum(e[0] == "choose" for e in sim) == 60
    assert any(e[0] == "publish" and any(w or r for w, r in e[2]) for e in sim)
    dense = run_case(Case(**{**case.__dict__, "engines_send_stats": False}))
    assert [e[1] for e in dense if e[0] == "publish"] == [50]   # the run ends within 5 s
    assert all(e[2] == [[0, 0]] * 3 for e in dense if e[0] == "publish")
    assert first_divergence(sim, sim) is None
    assert first_divergence(sim, sim[:-1]).startswith(f"event {len(sim) - 1}: one record ends")


def test_the_coordinator_mutant_publishes_the_latest_counts():
    def publications(coordinator_cls):
        c = coordinator_cls(2)
        c.maybe_publish(0.05)
        c.scheduler_stats(1.0, 0, 3, 0, step_counter=4)
        c.scheduler_stats(1.01, 0, 0, 3, step_counter=5)
        return c.publish_time(), c.maybe_publish(c.publish_time())

    assert publications(DPCoordinator) == (1.01, [[3, 0], [0, 0]])
    assert publications(DP_LB_MUTANTS["no-previous-step"]) == (1.06, [[0, 3], [0, 0]])
