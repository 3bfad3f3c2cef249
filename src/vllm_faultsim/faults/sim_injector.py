"""The simulator's fault injector: the only reader of a fault plan on the simulated side.

Jepsen's nemesis for the twins: each fault of the plan becomes a call on the hook of the model
it concerns, before the run starts; the models never see a plan.

| fault | hook |
| --- | --- |
| ``slow_steps``, ``kill_engine`` | ``EngineCore.slow_steps``, ``EngineCore.kill`` (models/engine.py) |
| ``ec_prefetch_stall``, ``ec_prefetch_fail`` | ``PrefetchSchedule.stall``, ``.fail`` (models/ec_connector.py) |
| ``kv_transfer_slow``, ``kv_transfer_fail`` | ``TransferEngine.slow_down``, ``.fail_between`` (models/kv_offload.py) |
| ``slow_link``, ``eplb_rank_death`` | ``EplbState.slow_link``, ``.rank_death`` (models/eplb.py) |
| ``kill_engine`` (process model) | the kills ``ProcSim`` takes (models/engine_procs.py) |
| ``slow_steps``, ``kill_engine`` (a deployment's server) | ``Server.slow_steps``, ``.kill`` (models/cluster.py) |
"""

from __future__ import annotations

from .plan import Fault, FaultPlan

EPLB_KINDS = ("slow_link", "eplb_rank_death")


class SimInjector:
    """Applies one plan to the simulated models through their fault hooks."""

    def __init__(self, plan: FaultPlan | None = None):
        self.plan = plan or FaultPlan()

    def kills(self) -> list[Fault]:
        """The ``kill_engine`` faults, in plan order (the engine-process model takes them)."""
        return self.plan.of_kind("kill_engine")

    def signals(self) -> list[str]:
        """The signals the plan's kills deliver (the run checks its liveness profile has them)."""
        return [f.signal for f in self.kills()]

    def eplb_faults(self) -> list[Fault]:
        return self.plan.of_kind(*EPLB_KINDS)

    def arm_engine(self, engine) -> None:
        for f in self.plan.of_kind("slow_steps"):
            engine.slow_steps(f.start, f.end, f.factor)
        for f in self.kills():
            engine.kill(f)

    def arm_server(self, server) -> None:
        """One server's plan of a deployment (faults/rates.py expands one per server)."""
        for f in self.plan.of_kind("slow_steps"):
            server.slow_steps(f.start, f.end, f.factor)
        for f in self.kills():
            server.kill(f)

    def arm_prefetch(self, schedule) -> None:
        for f in self.plan.of_kind("ec_prefetch_stall", "ec_prefetch_fail"):
            if f.kind == "ec_prefetch_stall":
                schedule.stall(f.item, f.delay)
            else:
                schedule.fail(f.item)

    def arm_transfers(self, transfers) -> None:
        for f in self.plan.of_kind("kv_transfer_slow"):
            transfers.slow_down(f.start, f.end, f.factor)
        for f in self.plan.of_kind("kv_transfer_fail"):
            transfers.fail_between(f.start, f.end)

    def arm_eplb(self, state) -> None:
        for f in self.plan.of_kind("slow_link"):
            state.slow_link(f.start, f.end, f.factor)
        for f in self.plan.of_kind("eplb_rank_death"):
            state.rank_death(f)
