"""The GPU tier's dry run on a CPU-only machine: ``DryRunExecutor`` in place of the GPU worker.

``VLLM_FAULTSIM_DRYRUN=1`` checks the GPU tier's plumbing where no GPU is: vLLM's CUDA build is
told it runs on a CPU platform (:func:`use_cpu_platform`, applied when this module is imported,
so that spawned engine processes inherit it) and ``engine_args`` names :class:`DryRunExecutor`
as the executor (``distributed_executor_backend``). The scheduler, input and output processing
and the engine loop are real; decisions are meaningful, timings are not, and there is no worker
process (no KV transfers, no worker side of the EC connector).

``DryRunExecutor`` subclasses a vLLM type: it is built on first attribute access (PEP 562), so
importing this module does not import vLLM.
"""

from __future__ import annotations

import os

DRYRUN = os.environ.get("VLLM_FAULTSIM_DRYRUN") == "1"
EXECUTOR = f"{__name__}.DryRunExecutor"


def _build_dry_run_executor():
    from concurrent.futures import Future

    import torch
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from .vllm_adapter import DeterministicRunner

    def done(out, non_block: bool):
        if not non_block:
            return out
        f: Future = Future()
        f.set_result(out)
        return f

    class DryRunExecutor(Executor):
        """``vllm_adapter.DeterministicRunner`` in place of the GPU worker: every other part of
        the engine is real. For checking this harness where no GPU is. Under async scheduling
        the engine calls ``execute_model(non_block=True)`` when it schedules a batch, then
        ``sample_tokens(non_block=True)``: the runner samples at ``execute_model``, as a worker
        that follows the requests from the ``SchedulerOutput`` alone would, and ``sample_tokens``
        hands that output over."""

        uses_ray = False
        supports_pp = False

        @classmethod
        def supports_async_scheduling(cls) -> bool:
            return True

        def _init_executor(self) -> None:
            self._runner = DeterministicRunner()
            self._sampled = None

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
            name = method if isinstance(method, str) else getattr(method, "__name__", "")
            if name == "get_kv_cache_spec":
                bs = self.cache_config.block_size
                out = [{"model.layers.0.self_attn.attn": FullAttentionSpec(
                    block_size=bs, num_kv_heads=1, head_size=8, dtype=torch.float16)}]
            elif name == "determine_available_memory":
                out = [1 << 30]
            elif name == "get_supported_tasks":
                out = [("generate",)]
            elif name in ("get_kv_connector_handshake_metadata", "compile_or_warm_up_model"):
                out = []
            else:
                out = [None]
            return done(out, non_block)

        def execute_model(self, so, non_block=False):
            self._sampled = self._runner.execute_model(so)
            return done(self._sampled, non_block)

        def sample_tokens(self, grammar_output, non_block=False):
            return done(self._sampled, non_block)

        def check_health(self) -> None:
            return None

        def shutdown(self) -> None:
            return None

    DryRunExecutor.__module__ = __name__
    DryRunExecutor.__qualname__ = "DryRunExecutor"
    return DryRunExecutor


def use_cpu_platform() -> None:
    """Make vLLM's CUDA build treat this machine as a CPU platform. vLLM's CPU platform turns
    async scheduling off ("not required on CPU"); the CUDA platform it stands in for leaves the
    resolved mode alone, so the dry run keeps it."""
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    class DryRunPlatform(CpuPlatform):
        @classmethod
        def check_and_update_config(cls, vllm_config) -> None:
            mode = vllm_config.scheduler_config.async_scheduling
            super().check_and_update_config(vllm_config)
            vllm_config.scheduler_config.async_scheduling = mode

    platforms._current_platform = DryRunPlatform()


if DRYRUN:
    use_cpu_platform()


def __getattr__(name: str):
    if name != "DryRunExecutor":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = _build_dry_run_executor()
    return cls
