"""Engine-core deaths on the GPU: kill trials of the serving layout under a fault plan.

:func:`kill_trial` runs ``AsyncLLM`` with the engine core in its own process (the serving
layout), sends requests, then kills the engine core as the plan's ``kill_engine`` fault says,
through the real-side injector (``faults.real_injector.EngineCoreKill``: SIGKILL, SIGTERM, or an
exit from inside the engine via ``real_engine.ENV_EXIT_FILE``), and times the client's detection
(``engine_dead``) and every in-flight request's fate. :func:`kill_trials_parallel` runs many
trials, a few engines at a time. vLLM is imported on first use.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ...faults.plan import FaultPlan, validate_plan
from ...faults.real_injector import EngineCoreKill
from ...models.request import RequestSpec
from ..workload import spec_from_dict, spec_to_dict
from .real_engine import ENV_EXIT_FILE, prompt_for, sampling_for


@dataclass
class KillResult:
    signal: str
    pid: int
    kill_at: float              # seconds after the first request was sent
    detect_s: float | None      # kill -> client's engine_dead flag
    fates: dict[str, str]       # req -> finished | aborted | EngineDeadError | <other error> | hung
    fail_s: dict[str, float]    # req -> kill -> the moment its generate() raised / ended
    exitcode: int | None
    in_flight: list[str]        # requests neither finished nor failed when the kill was sent
    after_death: str            # what a new generate() did after detection
    async_scheduling: bool      # the engine's resolved mode (async: two batches in flight)
    tokens_seen: dict[str, int]  # req -> output tokens the client had received when generate() ended
    failed_proc_name: str | None = None  # what the liveness monitor named (None: a clean exit)


async def _kill_trial_async(engine_kwargs: dict, specs: list[RequestSpec], kill: EngineCoreKill,
                            exit_file: str | None, hang_timeout: float) -> KillResult:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
    resources = llm.engine_core.resources
    proc = resources.engine_manager.processes[0]
    fates: dict[str, str] = {}
    ended: dict[str, float] = {}
    seen: dict[str, int] = {}
    t_kill = [None]

    async def one(spec: RequestSpec, t0: float):
        await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - t0)))
        try:
            last = None
            async for out in llm.generate(prompt_for(spec), sampling_for(spec), request_id=spec.req_id):
                last = out
                seen[spec.req_id] = len(out.outputs[0].token_ids)
            reason = last.outputs[0].finish_reason if last is not None else None
            fates[spec.req_id] = "aborted" if reason == "abort" else "finished"
        except EngineDeadError:
            fates[spec.req_id] = "EngineDeadError"
        except asyncio.CancelledError:
            fates[spec.req_id] = "hung"
            raise
        except Exception as exc:  # any other error is recorded by name
            fates[spec.req_id] = type(exc).__name__
        ended[spec.req_id] = time.perf_counter()

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(s, t0)) for s in specs]
    await asyncio.sleep(kill.at)
    in_flight = [s.req_id for s in specs if s.req_id not in fates]
    detected = threading.Event()
    detect = [None]

    def watch():
        while not resources.engine_dead and time.perf_counter() - t_kill[0] < hang_timeout:
            time.sleep(0.0002)
        if resources.engine_dead:
            detect[0] = time.perf_counter() - t_kill[0]
        detected.set()

    def exit_trigger(code: int) -> None:
        if exit_file is None:
            raise ValueError("exit faults need the engine started with VLLM_FAULTSIM_EXIT_FILE")
        Path(exit_file).write_text(str(code))

    t_kill[0] = time.perf_counter()
    threading.Thread(target=watch, daemon=True).start()
    kill.apply(proc.pid, exit_trigger)
    done, pending = await asyncio.wait(tasks, timeout=hang_timeout)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    while not detected.is_set():
        await asyncio.sleep(0.001)
    failed_name = getattr(resources.engine_manager, "failed_proc_name", None)
    after = "no error"
    try:
        async for _ in llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, detokenize=False),
                                    request_id="after-death"):
            pass
    except Exception as exc:
        after = type(exc).__name__
    proc.join(timeout=10)
    exitcode = proc.exitcode
    llm.shutdown()
    if exit_file:
        Path(exit_file).unlink(missing_ok=True)
    fail_s = {r: ended[r] - t_kill[0] for r in in_flight if r in ended}
    return KillResult(kill.signal, proc.pid, kill.at, detect[0], {r: fates.get(r, "hung") for r in (s.req_id for s in specs)},
                      fail_s, exitcode, in_flight, after, bool(llm.vllm_config.scheduler_config.async_scheduling),
                      {s.req_id: seen.get(s.req_id, 0) for s in specs}, failed_name)


def kill_trial(engine_kwargs: dict, specs: list[RequestSpec], plan: FaultPlan, *, exit_file: str | None = None,
               hang_timeout: float = 30.0) -> KillResult:
    """One engine (AsyncLLM, engine core in its own process) serving ``specs`` (arrivals in
    seconds after the start), killed as ``plan``'s one ``kill_engine`` fault says (``at`` seconds
    in; SIGKILL, SIGTERM, exit1, exit0; applied by ``faults.real_injector.EngineCoreKill``). A
    request still running ``hang_timeout`` seconds after the kill is "hung"."""
    kill = EngineCoreKill(plan)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if exit_file:
        os.environ[ENV_EXIT_FILE] = exit_file
        Path(exit_file).unlink(missing_ok=True)
    return asyncio.run(_kill_trial_async(engine_kwargs, specs, kill, exit_file, hang_timeout))


def kill_trials_parallel(engine_kwargs: dict, specs: list[RequestSpec], plans: list[FaultPlan], *,
                         workers: int = 4, workdir: str | Path, hang_timeout: float = 30.0,
                         timeout: float = 540.0) -> list[dict]:
    """Run one :func:`kill_trial` per plan in ``workers`` processes, each its own client of one
    engine at a time (``python -m vllm_faultsim.harness.drivers.engine_kill JOB RESULTS``);
    results as dicts (KillResult fields, plus ``error`` for a trial that could not run)."""
    for plan in plans:
        EngineCoreKill(plan)  # every plan is checked before anything runs
    import subprocess
    import sys

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kw = {k: (v if isinstance(v, (str, int, float, bool, dict, list, type(None))) else str(v))
          for k, v in engine_kwargs.items()}
    procs = []
    for w in range(workers):
        mine = [p.to_dict() for p in plans[w::workers]]
        if not mine:
            continue
        job = {"engine": kw, "specs": [spec_to_dict(s) for s in specs], "plans": mine,
               "exit_file": str(workdir / f"exit-{w}"), "hang_timeout": hang_timeout}
        jp, rp = workdir / f"job-{w}.json", workdir / f"results-{w}.jsonl"
        jp.write_text(json.dumps(job))
        rp.unlink(missing_ok=True)
        log = open(workdir / f"worker-{w}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", __name__, str(jp), str(rp)],
                                       stdout=log, stderr=subprocess.STDOUT), rp, log))
    t_end = time.monotonic() + timeout
    for p, _, log in procs:
        try:
            p.wait(timeout=max(1.0, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    out = []
    for _, rp, _ in procs:
        if rp.exists():
            out += [json.loads(line) for line in rp.read_text().splitlines() if line.strip()]
    return out


def _kill_main(job_path: str, results_path: str) -> int:
    from dataclasses import asdict

    job = json.loads(Path(job_path).read_text())
    specs = [spec_from_dict(d, f"r{i}") for i, d in enumerate(job["specs"])]
    for i, d in enumerate(job["plans"]):
        plan = validate_plan(d, f"kill-trial-{i}")
        try:
            res = asdict(kill_trial(job["engine"], specs, plan, exit_file=job["exit_file"],
                                    hang_timeout=job["hang_timeout"]))
        except Exception as exc:  # recorded, the next trial still runs
            f = plan.faults[0]
            res = {"signal": f.signal, "kill_at": f.at, "error": f"{type(exc).__name__}: {exc}"}
        with open(results_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":  # python -m vllm_faultsim.harness.drivers.engine_kill JOB.json RESULTS.jsonl
    import sys
    if len(sys.argv) == 3:
        sys.exit(_kill_main(sys.argv[1], sys.argv[2]))
    print("usage: python -m vllm_faultsim.harness.drivers.engine_kill JOB.json RESULTS.jsonl", file=sys.stderr)
    sys.exit(2)

