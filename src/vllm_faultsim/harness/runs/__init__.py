"""Runs: where the simulator and the real drivers meet (simulate, diff, offload, procs, EPLB, GPU, calibrate, study)."""
