"""vllm-faultsim: a SimPy model of vLLM's engine, fault plans, traces and checkers.

The sim tier (``models``, ``faults``, most of ``harness``) imports neither torch nor vllm;
the real-vLLM drivers in ``harness.drivers.real_*`` import vLLM lazily.
"""

__version__ = "0.1.0"
