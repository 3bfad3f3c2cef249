"""Drivers of the real vLLM code (scheduler, connectors, engine managers, engine, EPLB worker); vLLM is imported lazily."""
