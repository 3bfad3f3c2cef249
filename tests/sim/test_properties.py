"""Properties over generated workloads and fault plans: invariants hold after every step, every
request ends finished or failed, and the same seed gives the same trace."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vllm_faultsim.harness.runs.simulate import RunConfig, simulate
from vllm_faultsim.harness.strategies import fault_plans, request_specs, scheduler_configs, workloads
from vllm_faultsim.harness.trace import dumps
from vllm_faultsim.models.ec_connector import ECConnector, PrefetchSchedule
from vllm_faultsim.models.scheduler import Scheduler

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(specs=workloads(), sched=scheduler_configs(),
       plan=fault_plans(kinds=("slow_steps", "ec_prefetch_stall", "ec_prefetch_fail", "kill_engine")))
def test_invariants_hold_and_every_request_ends(specs, sched, plan):
    res = simulate(RunConfig(scheduler=sched), plan, specs=specs)   # raises InvariantViolation otherwise
    ends = {e["req"]: e for e in res.events if e["kind"] == "req"}
    assert sorted(ends) == sorted(s.req_id for s in specs)
    for s in specs:
        e = ends[s.req_id]
        assert e["arrival"] <= e["finish"]
        if e["status"] != "failed":
            assert e["arrival"] <= e["first_token"] <= e["finish"]
            assert e["num_output"] == (s.stop_at or s.output_len)
    steps = [e for e in res.events if e["kind"] == "step"]
    # t and dur are each rounded to 9 decimals in the trace: their sum may overshoot by 1e-9
    assert all(a["t"] + a["dur"] <= b["t"] + 2e-9 for a, b in zip(steps, steps[1:]))


@settings(max_examples=25, deadline=None)
@given(specs=workloads(), sched=scheduler_configs(), plan=fault_plans())
def test_same_inputs_same_trace_bytes(specs, sched, plan):
    run = lambda: "\n".join(dumps(e) for e in simulate(RunConfig(scheduler=sched), plan, specs=specs).events)
    assert run() == run()


class SchedulerMachine(RuleBasedStateMachine):
    """Add requests and step in any interleaving; the core's invariants hold throughout."""

    def __init__(self):
        super().__init__()
        self.sched = None
        self.now = 0.0
        self.added = self.finished = 0

    @rule(cfg=scheduler_configs())
    @precondition(lambda self: self.sched is None)
    def start(self, cfg):
        self.prefetch = PrefetchSchedule(())
        self.sched = Scheduler(cfg, ECConnector(self.prefetch))

    @rule(data=st.data())
    @precondition(lambda self: self.sched is not None and self.added < 16)
    def add(self, data):
        spec = data.draw(request_specs(self.added))
        for m in spec.mm:
            self.prefetch.latency[(spec.req_id, m.identifier)] = m.prefetch
        self.sched.add_request(spec, self.now)
        self.added += 1

    @rule(dt=st.sampled_from([0.001, 0.01, 0.1]))
    @precondition(lambda self: self.sched is not None)
    def step(self, dt):
        res = self.sched.schedule(self.now)
        self.now += dt
        self.finished += len(self.sched.update_from_output(res, self.now))

    @invariant()
    def consistent(self):
        if self.sched is not None:
            assert self.sched.check() is None
            running, waiting = self.sched.counts()
            assert running + waiting + self.finished == self.added
            assert running <= self.sched.config.max_num_seqs


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
