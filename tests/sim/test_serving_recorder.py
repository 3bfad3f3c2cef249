"""The serving recorder's per-step request lists (drivers/serving_recorder.py), without vLLM: its
mixin over a stand-in scheduler names the requests each step schedules for the first time, gives a
first token and finishes, and to_recording_steps maps vLLM's suffixed request ids to the
recording's request indices."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from vllm_faultsim.harness import recording as R
from vllm_faultsim.harness.drivers import serving_recorder as SR

pytestmark = pytest.mark.sim


class _Scheduler:
    """The few members of vLLM's Scheduler the recorder reads; schedule() replays ``plan``."""

    def __init__(self, plan):
        self.plan = list(plan)
        self.scheduler_config = NS(async_scheduling=True)
        self.requests = {}
        self.waiting, self.running = [], []

    def schedule(self):
        new, cached, prompt = self.plan.pop(0)
        for rid in new:
            self.requests[rid] = NS(num_prompt_tokens=prompt)
        reqs = [*new, *cached]
        return NS(scheduled_new_reqs=[NS(req_id=r, num_computed_tokens=0) for r in new],
                  scheduled_cached_reqs=NS(req_ids=list(cached), num_computed_tokens=[prompt] * len(cached)),
                  num_scheduled_tokens={r: (prompt if r in new else 1) for r in reqs},
                  total_num_scheduled_tokens=prompt * len(new) + len(cached), preempted_req_ids=set())

    def update_from_output(self, scheduler_output, emitted):
        return {0: NS(outputs=[NS(request_id=r, new_token_ids=[7], finish_reason=f) for r, f in emitted])}

    def get_num_unfinished_requests(self):
        return 1


def test_steps_name_new_first_token_and_finished_requests(monkeypatch):
    monkeypatch.delenv(SR.ENV_STEPS_FILE, raising=False)
    cls = type("Rec", (SR._RecorderMixin, _Scheduler), {"_fs_async": True})
    # engine ids carry vLLM's 8-character suffix; "warm-0" is outside the recording
    a, b, w = "light-0-1a2b3c4d", "light-1-9f8e7d6c", "warm-0-00000000"
    sched = cls([((a, w), (), 8), ((b,), (a, w), 8), ((), (a, b), 8)])
    emitted = [[], [(a, None), (w, "length")], [(a, "length"), (b, None)]]
    for k in range(3):  # async order: step k+1 is scheduled before step k's output (here in order)
        out = sched.schedule()
        sched.update_from_output(out, emitted[k])
    steps = sched.faultsim_steps
    assert [s[-3:] for s in steps] == [[[a, w], [], []], [[b], [a, w], [w]], [[], [b], [a]]]
    rec = SR.to_recording_steps(steps, 0.0, float("inf"), {"light-0": 0, "light-1": 1})
    assert [(s["new_reqs"], s["first_token_reqs"], s["finished_reqs"]) for s in rec] == [
        ([0], [], []), ([1], [0], []), ([], [1], [0])]


def test_request_index_exact_id_first():
    assert SR.request_index("near-3", {"near-3": 4}) == 4           # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION
    assert SR.request_index("near-3-abcdefgh", {"near-3": 4}) == 4
    assert SR.request_index("probe-3-abcdefgh", {"near-3": 4}) is None


def test_columns_carry_the_recording_lists():
    assert SR.REQ_LISTS == R.REQ_LISTS and SR.COLUMNS[-3:] == R.REQ_LISTS
