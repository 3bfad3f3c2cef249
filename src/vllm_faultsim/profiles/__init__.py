"""Measured step-time and liveness profiles (JSON; host and vLLM version recorded in each)."""
