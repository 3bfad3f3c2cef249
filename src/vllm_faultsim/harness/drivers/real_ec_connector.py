"""``FaultsimECConnector``: a real vLLM EC connector whose remote store is a prefetch schedule.

vLLM loads it like any out-of-tree connector (``ECTransferConfig(ec_connector="FaultsimECConnector",
ec_connector_module_path=__name__, ec_role="ec_consumer")``); the driver then binds the shared
prefetch schedule (``bind``) and sets the virtual time (``now``) before each ``schedule()``. Only
the scheduler side exists: there is no worker in the CPU driver. Importing this module imports vLLM.

The schedule (``models.ec_connector.PrefetchSchedule``) answers ``ensure(req_id, identifier, now)``:
the request need not wait for the item (staged, failed -> local encode, not remote); the first
call starts staging it for that request. ``has_item(identifier, now)``: loadable from the store now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# ensure_cache_available policies (ec_connector_extra_config["policy"]): which features a request waits for
POLICIES = {
    "future-only": "PR #41627 (vLLM 0.26.0): only features ending after num_computed_tokens",
    "all-features": "every feature, even one whose tokens are already computed (pre-review variant)",
}


class PrefetchSchedule(Protocol):
    def ensure(self, req_id: str, identifier: str, now: float) -> bool: ...

    def has_item(self, identifier: str, now: float) -> bool: ...


@dataclass
class FaultsimECConnectorMetadata(ECConnectorMetadata):
    loads: list[str] = field(default_factory=list)     # identifiers to load from the store, in alloc order
    deferred: list[str] = field(default_factory=list)  # requests ensure_cache_available deferred (trace only)


class FaultsimECConnector(ECConnectorBase):
    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        policy = vllm_config.ec_transfer_config.get_from_extra_config("policy", "future-only")
        if policy not in POLICIES:
            raise ValueError(f"unknown FaultsimECConnector policy {policy!r} (known: {', '.join(POLICIES)})")
        self.policy = policy
        self.schedule: PrefetchSchedule | None = None
        self.now = 0.0  # the virtual time of the step being scheduled, set by the driver
        self._loads: list[str] = []
        self._deferred: list[str] = []

    def bind(self, schedule: PrefetchSchedule) -> None:
        self.schedule = schedule

    def _schedule(self) -> PrefetchSchedule:
        if self.schedule is None:
            raise RuntimeError("FaultsimECConnector has no prefetch schedule: call bind() first")
        return self.schedule

    # ---- worker side: no worker in the CPU driver ---------------------------------------

    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        return None

    def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
        return None

    # ---- scheduler side -----------------------------------------------------------------

    def has_cache_item(self, identifier: str) -> bool:
        return self._schedule().has_item(identifier, self.now)

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        features = request.mm_features
        if self.policy == "future-only":
            features = [f for f in features
                        if f.mm_position.offset + f.mm_position.length > num_computed_tokens]
        schedule, now, rid = self._schedule(), self.now, request.request_id
        ready = [schedule.ensure(rid, f.identifier, now) for f in features]  # starts every prefetch, no short cut
        if all(ready):
            return True
        self._deferred.append(rid)
        return False

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        identifier = request.mm_features[index].identifier
        if self.has_cache_item(identifier):
            self._loads.append(identifier)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> FaultsimECConnectorMetadata:
        meta = FaultsimECConnectorMetadata(self._loads, self._deferred)
        self._loads, self._deferred = [], []
        return meta
