"""The harness: workloads, traces, invariants, metrics, the CLI and plugin; drivers of real vLLM, checkers, runs."""
