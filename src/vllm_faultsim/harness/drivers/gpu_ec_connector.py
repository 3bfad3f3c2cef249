"""``GpuFaultsimECConnector``: the EC connector of the GPU tier, ``FaultsimECConnector``'s scheduler
side plus a worker side for a real model runner.

vLLM loads it by module path (``engine_args(..., ec_policy=...)`` names it: ``ec_connector_module_path``),
in the engine-core process and in the worker process. Importing this module imports vLLM.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .real_ec_connector import FaultsimECConnector

def _log_event(path: str, event: dict) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "t": time.time(), **event}) + "\n")


class GpuFaultsimECConnector(FaultsimECConnector):
    """``FaultsimECConnector`` (scheduler side: prefetch readiness from the shared
    schedule) plus a worker side for a real model runner. The remote store is the
    prefetch schedule's: an item it reports loadable is materialised by
    ``start_load_caches`` as an encoder output of the item's shape (the weights are dummy,
    so are the embeddings). ``save_caches`` (items encoded locally) copies the output to
    host memory asynchronously, ``save_delay`` seconds each (a slow store): those are the
    pending operations ``shutdown()`` drains (PR #42423). Lifecycle events go, one JSON line
    each with the process id, to ``event_log``."""

    def __init__(self, vllm_config, role):
        super().__init__(vllm_config, role)
        cfg = vllm_config.ec_transfer_config
        self.event_log = cfg.get_from_extra_config("event_log", "") or ""
        self.save_delay = float(cfg.get_from_extra_config("save_delay", 0.0) or 0.0)
        self.role_name = getattr(role, "name", str(role)).lower()
        self._sizes: dict[str, int] = {}
        self._pool = None
        self._pending: list = []
        self.store: dict[str, Any] = {}
        self.loaded = self.saved = 0
        mc = vllm_config.model_config
        self._hidden = mc.get_hidden_size()
        self._dtype = mc.dtype
        _log_event(self.event_log, {"event": "init", "role": self.role_name})

    # scheduler side: remember each loaded item's size for the worker
    def update_state_after_alloc(self, request, index: int) -> None:
        feature = request.mm_features[index]
        self._sizes[feature.identifier] = feature.mm_position.get_num_embeds() \
            if hasattr(feature.mm_position, "get_num_embeds") else feature.mm_position.length
        super().update_state_after_alloc(request, index)

    def build_connector_meta(self, scheduler_output):
        meta = super().build_connector_meta(scheduler_output)
        meta.sizes = {i: self._sizes[i] for i in meta.loads}
        return meta

    # worker side
    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        import torch
        meta = self._get_connector_metadata()
        for ident in getattr(meta, "loads", ()):
            if ident in encoder_cache:
                continue
            stored = self.store.get(ident)
            if stored is not None:
                encoder_cache[ident] = stored.to("cuda", non_blocking=True)
            else:
                n = meta.sizes[ident]
                encoder_cache[ident] = torch.zeros(n, self._hidden, dtype=self._dtype, device="cuda")
            self.loaded += 1

    def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
        if not self.is_producer:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ec-save")
        host = encoder_cache[mm_hash].to("cpu", non_blocking=False)

        def put(key=mm_hash, value=host):
            time.sleep(self.save_delay)
            self.store[key] = value
            return key

        self._pending.append(self._pool.submit(put))

    def shutdown(self) -> None:
        pending = [f for f in self._pending if not f.done()]
        drained = 0
        for f in self._pending:
            f.result()
            drained += 1
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        in_flight = 0
        if self.schedule is not None and hasattr(self.schedule, "ready_at"):
            in_flight = sum(1 for at in self.schedule.ready_at.values() if at > self.now)
        _log_event(self.event_log, {
            "event": "shutdown", "role": self.role_name, "pending_at_shutdown": len(pending),
            "drained": drained, "left": sum(1 for f in self._pending if not f.done()),
            "saved": len(self.store), "loaded": self.loaded, "prefetch_in_flight": in_flight})
        super().shutdown()
