"""Faults: plans as data (plan.py) and one injector per side (sim_injector.py, real_injector.py)."""
