"""The twin's batch-queue loop (models/engine.py ``EngineCore.step_with_batch_queue``) against vLLM
0.26.0's own: the real ``EngineCoreProc.run_busy_loop`` (``_process_input_queue``,
``_process_engine_step``, ``step_with_batch_queue``, ``post_step``) on a core built without its
heavy ``__init__`` (``object.__new__`` plus the attributes the loop reads), a stand-in executor
whose ``execute_model(non_block=True)`` / ``sample_tokens(non_block=True)`` return futures already
resolved, and a scripted scheduler; the twin runs over the same scripted scheduler. Both record
the calls they make (schedule of batch i with its token count, execute of i, block on i, output of
i applied); over generated scripts the sequences must be equal, and the mutants ``batch-queue-1``
and ``outputs-in-same-step`` (harness/mutants.py) must make them differ.

The script says how many tokens each ``schedule()`` call schedules (0 past its end);
``has_requests()`` holds while script entries remain or a batch that scheduled tokens has not had
its output applied (requests finish when their outputs come back).

The twin launches a batch's forward when it schedules it and blocks on a batch right before it
applies its output; vLLM's stand-ins record ``execute`` and ``block`` where they happen, and the
test checks that each ``execute`` follows its ``schedule`` and each ``block`` precedes its
output, so comparing schedules and outputs compares all four.

Idle spinning. With nothing in flight that ran the model, an empty schedule makes vLLM return
without blocking and sleep 1 ms (``_process_engine_step``), then schedule again, applying the empty
batch's output one call later; the twin applies the empty batches at once and sleeps until the
next wake-up (here: 1 ms, a stand-in wake-up source). Such an *idle* batch (empty, scheduled while
no batch with tokens is unapplied) happens exactly when a script has two empty entries in a row
or starts with one; so the exact comparison runs on scripts without those, and a second one runs
on any script with the outputs of idle batches left out on both sides (they carry no tokens: the
order of the decisions is the same). vLLM's 1 ms sleeps (also after an empty schedule that blocked
on a batch with tokens, where the twin goes on at once) change times, not decisions; they are
counted, not compared.
"""

from __future__ import annotations

import queue
from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import simpy
from hypothesis import HealthCheck, find, given, settings, strategies as st

pytest.importorskip("vllm", reason="needs vllm==0.26.0 (pip install -e '.[vllm]')")

from vllm_faultsim.harness.mutants import SCHEDULER_MUTANTS  # noqa: E402
from vllm_faultsim.models.engine import EngineCore  # noqa: E402
from vllm_faultsim.models.step import StepResult  # noqa: E402

BATCH_QUEUE_SIZE = 2  # vLLM 0.26.0's max_concurrent_batches with async scheduling (one GPU, no PP)


class ScriptedScheduler:
    """Both loops' scheduler: vLLM's interface (``has_requests``, ``schedule``,
    ``get_grammar_bitmask``, ``update_from_output``) and the twin's scheduler-core protocol."""

    def __init__(self, script, log: list):
        self.script, self.log = list(script), log
        self.calls = 0
        self.unapplied: set[int] = set()  # batches with tokens whose output has not come back

    def has_requests(self) -> bool:
        return self.calls < len(self.script) or bool(self.unapplied)

    def _schedule(self) -> tuple[int, int]:
        i = self.calls
        self.calls += 1
        n = self.script[i] if i < len(self.script) else 0
        if n:
            self.unapplied.add(i)
        self.log.append(("schedule", i, n))
        return i, n

    def _applied(self, i: int) -> None:
        self.unapplied.discard(i)
        self.log.append(("output", i))

    # vLLM's side
    def schedule(self, throttle_prefills: bool = False):
        i, n = self._schedule()
        return SimpleNamespace(batch=i, total_num_scheduled_tokens=n, pending_structured_output_tokens=False)

    def get_grammar_bitmask(self, scheduler_output):
        return None

    def update_from_output(self, scheduler_output, model_runner_output):
        assert model_runner_output.batch == scheduler_output.batch
        self._applied(scheduler_output.batch)
        return {}

    # the twin's side (models/step.py)
    def add_request(self, spec, now):
        raise AssertionError("the scripted loop has no arrivals")

    def has_unfinished_requests(self) -> bool:
        return self.has_requests()

    def schedule_twin(self, now: float) -> StepResult:
        i, n = self._schedule()
        res = StepResult()
        if n:
            res.sched[f"b{i}"], res.computed_before[f"b{i}"], res.prompt_len[f"b{i}"] = n, 0, n
        res.batch = i
        return res

    def update_twin(self, res: StepResult, now: float):
        self._applied(res.batch)
        return []

    def counts(self):
        return 0, 0

    def shutdown(self):
        pass


class _TwinCore(ScriptedScheduler):
    schedule = ScriptedScheduler.schedule_twin
    update_from_output = ScriptedScheduler.update_twin


class _Output(SimpleNamespace):
    pass


class _ResolvedFuture(Future):
    """A future already resolved; ``result()`` is where the loop blocks on its batch."""

    def __init__(self, value, batch: int, log: list):
        super().__init__()
        self.set_result(value)
        self.batch, self.log = batch, log

    def result(self, timeout=None):
        self.log.append(("block", self.batch))
        return super().result(timeout)


class StandInExecutor:
    """``execute_model(non_block=True)`` and ``sample_tokens(non_block=True)`` as the GPU executor
    answers them under async scheduling: a batch with tokens executes to None and samples its
    output; an empty one executes straight to its (empty) output."""

    def __init__(self, log: list):
        self.log = log
        self.last = None

    def execute_model(self, scheduler_output, non_block=False):
        assert non_block
        i = scheduler_output.batch
        self.log.append(("execute", i))
        self.last = i
        value = None if scheduler_output.total_num_scheduled_tokens else _Output(batch=i)
        return _ResolvedFuture(value, i, self.log)

    def sample_tokens(self, grammar_output, non_block=False):
        assert non_block
        return _ResolvedFuture(_Output(batch=self.last), self.last, self.log)


class _Stop(Exception):
    pass


def run_vllm(script) -> tuple[list, int]:
    """vLLM's own run_busy_loop over `script`, until the core is idle: (calls, 1 ms sleeps)."""
    import vllm.v1.engine.core as core_mod

    log: list = []
    core = object.__new__(core_mod.EngineCoreProc)
    core.scheduler = ScriptedScheduler(script, log)
    core.model_executor = StandInExecutor(log)
    core.batch_queue_size = BATCH_QUEUE_SIZE
    core.batch_queue = deque(maxlen=BATCH_QUEUE_SIZE)
    core.step_fn = core.step_with_batch_queue
    core.is_ec_consumer, core.is_pooling_model = True, False
    core.async_scheduling, core.check_for_draft_tokens = True, False
    core.log_stats = False
    core.vllm_config = SimpleNamespace(observability_config=SimpleNamespace(enable_logging_iteration_details=False))
    core.aborts_queue, core.input_queue, core.output_queue = queue.Queue(), queue.Queue(), queue.Queue()
    core.engines_running = False
    core.shutdown_state = core_mod.EngineShutdownState.RUNNING
    core.process_input_queue_block = True

    def idle(_core):  # _process_input_queue: no work left; the loop would block on its input queue
        raise _Stop

    core._idle_state_callbacks = [idle]
    sleeps = []
    real_sleep = core_mod.time.sleep
    core_mod.time.sleep = lambda s: sleeps.append(s)
    try:
        core.run_busy_loop()
    except _Stop:
        pass
    finally:
        core_mod.time.sleep = real_sleep
    if core._idle_state_callbacks:  # popped when called
        raise AssertionError("vLLM's loop ended without going idle")
    assert all(s == 0.001 for s in sleeps)
    return log, len(sleeps)


class _Wakeup:
    """A wake-up 1 ms ahead (vLLM's idle spin period), always."""

    def next_event(self, now: float):
        return now + 0.001


def run_twin(script, engine_cls=EngineCore) -> list:
    log: list = []
    core = _TwinCore(script, log)
    env = simpy.Environment()
    engine_cls(env, core, (), lambda prefill, decode, context: 0.01, lambda event: None,
               wakeups=(_Wakeup(),), max_concurrent_batches=BATCH_QUEUE_SIZE)
    env.run()
    return log


def decisions(log) -> list:
    return [e for e in log if e[0] in ("schedule", "output")]


def check_structure(log) -> None:
    """vLLM's stand-ins: every batch executes right after it is scheduled and is blocked on right
    before its output is applied, once."""
    for k, e in enumerate(log):
        if e[0] == "schedule":
            assert log[k + 1] == ("execute", e[1]), log
        if e[0] == "output":
            assert log[k - 1] == ("block", e[1]), log
    assert sorted(e[1] for e in log if e[0] == "output") == sorted(e[1] for e in log if e[0] == "schedule")


def without_idle_outputs(log) -> list:
    """The decisions with the outputs of idle batches left out (see the module docstring)."""
    unapplied, idle, out = set(), set(), []
    for e in decisions(log):
        if e[0] == "schedule":
            _, i, n = e
            if n:
                unapplied.add(i)
            elif not unapplied:
                idle.add(i)
            out.append(e)
        else:
            unapplied.discard(e[1])
            if e[1] not in idle:
                out.append(e)
    return out


def no_idle(script) -> bool:
    return bool(script) and script[0] != 0 and all(a or b for a, b in zip(script, script[1:]))


tokens = st.one_of(st.just(0), st.integers(1, 512))
scripts = st.lists(tokens, min_size=0, max_size=24)
# batches with tokens, each followed or not by one empty schedule: every script without idle batches
scripts_without_idle = st.lists(st.tuples(st.integers(1, 512), st.booleans()), min_size=1, max_size=16).map(
    lambda entries: [x for n, empty in entries for x in ((n, 0) if empty else (n,))])


def test_known_script_both_loops():
    """Fill the queue, then block on the oldest: outputs come back one schedule late."""
    log, sleeps = run_vllm([5, 7, 0, 3])
    check_structure(log)
    expected = [("schedule", 0, 5), ("schedule", 1, 7), ("output", 0), ("schedule", 2, 0), ("output", 1),
                ("schedule", 3, 3), ("output", 2), ("schedule", 4, 0), ("output", 3), ("output", 4)]
    assert decisions(log) == expected
    assert decisions(run_twin([5, 7, 0, 3])) == expected
    assert sleeps == 1  # after the empty schedule that blocked on batch 1, with script entries left


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(script=scripts_without_idle)
def test_twin_loop_makes_vllms_calls(script):
    assert no_idle(script)
    log, _ = run_vllm(script)
    check_structure(log)
    assert decisions(run_twin(script)) == decisions(log)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(script=scripts)
def test_twin_loop_with_idle_spins_decides_as_vllm(script):
    log, _ = run_vllm(script)
    check_structure(log)
    assert without_idle_outputs(run_twin(script)) == without_idle_outputs(log)


@pytest.mark.parametrize("mutant", ["batch-queue-1", "outputs-in-same-step"])
def test_loop_mutants_diverge(mutant):
    engine_cls = SCHEDULER_MUTANTS[mutant].engine_cls
    found = find(scripts_without_idle,
                 lambda s: decisions(run_twin(s, engine_cls)) != decisions(run_vllm(s)[0]),
                 settings=settings(max_examples=300, database=None, deadline=None))
    print(f"{mutant}: diverges on script {found}")
    assert decisions(run_twin(found, engine_cls)) != decisions(run_vllm(found)[0])
