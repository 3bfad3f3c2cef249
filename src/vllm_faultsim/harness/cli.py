"""The ``vllm-faultsim`` command line.

    vllm-faultsim run     one simulation -> trace (JSONL) + summary
    vllm-faultsim study   a what-if grid (embedded default without arguments) -> table, CSV, PNG
    vllm-faultsim search  SLO search: the cheapest configuration meeting the SLOs -> table, CSV, Pareto plot
    vllm-faultsim deploy  a deployment (DP ranks, or servers behind a router) under faults from rates
    vllm-faultsim diff    simulator vs the real vLLM Scheduler (CPU), on generated or replayed cases;
                          --traces A B compares two traces (no vllm needed)
    vllm-faultsim procs   engine-process fault matrix: the real vLLM managers vs the model (CPU)
    vllm-faultsim fidelity RECORDING   a recorded real run replayed: MAPE, bias, quantiles, a picture
    vllm-faultsim calibrate   a step-time profile fitted on the real engine (a CUDA GPU)
    vllm-faultsim plot TRACE  a trace's timeline as a PNG
    vllm-faultsim check-plan PLAN   validate a fault plan

Bad input (fault plan, config, workload, profile) exits with code 2 and one line on stderr;
an invariant violation exits with 1 and prints the command that replays it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from .named_setup import DEFAULT_SETUP, available_setups


def _usage_errors():
    from ..faults.plan import PlanError
    from ..harness.workload import WorkloadError
    from ..models.step_time import ProfileError
    from .runs.simulate import ConfigError
    return (PlanError, ConfigError, WorkloadError, ProfileError)


def _run_config(args):
    from .config_file import read_config_file
    from .runs.simulate import ConfigError, config_from_dict
    d = dict(read_config_file(args.config)) if args.config else {}
    d.setdefault("workload", {"kind": "poisson", "rate": 20.0, "duration": 60.0, "prompt": 512, "output": 128})
    if args.workload:
        d["workload"] = {"kind": "jsonl", "path": args.workload}
    for key in ("rate", "duration", "prompt", "output"):
        if getattr(args, key) is not None:
            d["workload"][key] = getattr(args, key)
    sched = d.setdefault("scheduler", {})
    for key in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size", "max_model_len"):
        if getattr(args, key) is not None:
            sched[key] = getattr(args, key)
    if args.seed is not None:
        d["seed"] = args.seed
    if args.setup is not None:
        d["setup"] = None if args.setup == "none" else args.setup
    elif not args.config:  # no config file: the named real setup (a file says its own setup, or none)
        d["setup"] = DEFAULT_SETUP
    if args.profile is not None:
        if args.profile.endswith(".json") and Path(args.profile).is_file():
            try:
                Path(args.profile).read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{args.profile}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                                  f"{exc.start}): a step-time profile is a UTF-8 JSON file") from None
        d["profile"] = args.profile
    try:
        return config_from_dict(d)
    except _usage_errors() as exc:  # named by the config file the run came from
        if not args.config or str(exc).startswith(f"{args.config}:"):
            raise
        raise type(exc)(f"{args.config}: {exc}") from None


def _quietly(fn) -> None:
    try:
        fn()
    except OSError:
        pass


def _output_path(path: str, option: str, *, folder: bool = False) -> Path:
    """An output path that can be written: its folder exists and is writable; a file (``folder``:
    a folder) or nothing is there yet. Else a one-line ConfigError, before anything runs."""
    import os

    from .runs.simulate import ConfigError
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.exists() or p.is_symlink():
        if folder and not p.is_dir():
            raise ConfigError(f"{option} {path}: exists and is not a folder")
        if not folder and not p.is_file():
            raise ConfigError(f"{option} {path}: exists and is not a regular file "
                              f"({'a folder' if p.is_dir() else 'a device or special file'})")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: no folder {str(parent)!r} to write into")
    if not os.access(parent, os.W_OK | os.X_OK) or str(parent.resolve()).startswith(("/proc", "/sys")):
        raise ConfigError(f"{option} {path}: the folder {str(parent)!r} is not writable")
    return p


def _replay_command(args) -> str:
    return "vllm-faultsim " + " ".join(shlex.quote(a) for a in args.argv)


def cmd_run(args) -> int:
    from ..faults.plan import load_plan
    from .runs.simulate import ConfigError
    from .invariants import InvariantViolation
    from .progress import progress_bar
    from .runs.simulate import admitted, iter_workload, last_arrival, plan_applicability_errors, simulate

    plan = load_plan(args.plan)
    cfg = _run_config(args)
    specs = iter_workload(cfg)  # streamed: a generated workload is generated as the run reaches it
    plan_applicability_errors(plan, cfg, specs)
    horizon = round(last_arrival(specs), 1)  # the bar covers the arrivals (not generated twice)
    final = _output_path(args.trace, "--trace")
    partial = final.with_name(f".{final.name}.partial")  # renamed to the final name once the run ends
    try:
        with progress_bar(total=horizon, unit="sim-s", desc="run", disable=args.no_progress,
                          bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} sim-s [{elapsed}<{remaining}]") as bar:
            # each request is checked for admission as the run pulls it: a bad one ends the run, exit 2
            res = simulate(cfg, plan, trace_path=partial, keep=frozenset(),
                           specs=admitted(specs, cfg.scheduler, args.workload or args.config),
                           progress=lambda now: bar.update(min(now, horizon) - bar.n) if now - bar.n >= 0.1 else None)
        partial.replace(final)
    except InvariantViolation as exc:
        kept = final.with_name(final.name + ".partial")
        _quietly(lambda: partial.replace(kept))
        print(f"vllm-faultsim: {exc}\n  seed {cfg.seed}; replay: {_replay_command(args)}\n  "
              f"the trace up to the violation: {kept} (incomplete: no end event)", file=sys.stderr)
        return 1
    except OSError as exc:
        _quietly(partial.unlink)
        raise ConfigError(f"--trace {args.trace}: cannot write the trace ({exc.strerror or exc}); nothing written") from None
    except BaseException:
        _quietly(partial.unlink)  # interrupted: no trace under its name, and no partial one left
        raise
    # the queue grew without bound: derived from the requests (not in the trace's end event)
    summary = {**res.summary, "overloaded": res.overloaded}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(len(k) for k in summary)
        for k, v in summary.items():
            print(f"{k.ljust(width)}  {'-' if v is None else v}")
        if summary["overloaded"]:
            print("OVERLOADED: time to first token grows with arrival time (the queue grows without bound); "
                  "lower the rate or add capacity")
        from ..models.step_time import describe
        from .runs.simulate import step_time_model
        print(f"setup {cfg.setup or 'none'}; step time {describe(step_time_model(cfg))}")
        print(f"trace: {args.trace}  (timeline: vllm-faultsim plot {args.trace})")
    return 0


def cmd_study(args) -> int:
    from .runs.study import format_table, load_study, plot, run_study, setup_line

    spec = load_study(args.spec)
    out = _out_folder(args.out)
    rows = run_study(spec, out, progress=not args.no_progress, workers=args.workers, ray_address=args.ray_address)
    print(setup_line(spec))
    print(format_table(rows))
    print(f"\ncsv: {out / 'study.csv'}")
    if plot(rows, spec, out / "study.png"):
        print(f"plot: {out / 'study.png'}")
    else:
        print("plot: skipped (matplotlib not installed: pip install 'vllm-faultsim[plot]')")
    return 0


def cmd_search(args) -> int:
    from .runs.search import load_search, report, run_search

    spec = load_search(args.spec)
    out = _out_folder(args.out)
    result = run_search(spec, out, progress=not args.no_progress, workers=args.workers, ray_address=args.ray_address)
    print(report(result, out))
    return 0


def _out_folder(path: str) -> Path:
    """An output folder: an existing folder, or one that can be made (one-line ConfigError)."""
    from .runs.simulate import ConfigError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder")
    if not out.exists():
        _output_path(path, "--out", folder=True)
    return out


def _sweep_arguments(parser) -> None:
    """Where a sweep's points run (harness/sweep.py)."""
    parser.add_argument("--workers", type=_at_least_one, help="points run at once: a local Ray cluster of this "
                        "many CPUs (default: all cores); 1: serially, without Ray")
    parser.add_argument("--ray-address", help="run the points on an existing Ray cluster (ray.init(address=...))")


def cmd_diff(args) -> int:
    import importlib.util

    from .checkers.divergence import first_divergence
    from .mutants import SCHEDULER_MUTANTS
    from .runs.diff import DiffCase, check_case, report, save_case, search
    from .runs.simulate import ConfigError

    if args.mutant and args.mutant not in SCHEDULER_MUTANTS:
        raise ConfigError(f"unknown mutant {args.mutant!r} (known: {', '.join(SCHEDULER_MUTANTS)})")
    if args.traces:  # streamed: the traces are read side by side, never held whole
        from .trace import TraceFile
        left, right = TraceFile(args.traces[0]), TraceFile(args.traces[1])
        try:
            div = first_divergence(left, right, sides=("left", "right"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read trace: {exc}") from None
        ended = [t.last_kind == "end" for t in (left, right)]
        cut = [path for path, e in zip(args.traces, ended) if not e]
        note = f"{' and '.join(cut)} {'is' if len(cut) == 1 else 'are'} incomplete (no end event: interrupted or failed run)"
        if div is None and ended[0] != ended[1]:
            print(f"traces agree as far as both go, but {note}")
            return 1
        print("traces agree" if div is None else div.explain())
        if cut:
            print(f"note: {note}")
        return 0 if div is None else 1
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("diff needs the real vLLM: pip install 'vllm-faultsim[vllm]' (vllm==0.26.0)")
    if args.replay:
        try:
            case = DiffCase.from_json(Path(args.replay).read_text(encoding="utf-8"), args.replay)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{args.replay}: not a replayable case ({exc})") from None
        div = check_case(case, args.mutant)
        print("no divergence" if div is None else div.explain())
        return 0 if div is None else 1
    from .progress import progress_bar
    with progress_bar(total=args.examples, desc="diff", unit="case", disable=args.no_progress) as bar:
        n, case, div = search(args.examples, args.seed, mutant=args.mutant, mm=args.kind != "text",
                              kv_pressure={"any": None, "yes": True, "no": False}[args.kv_pressure],
                              async_scheduling=args.async_ == "yes", progress=bar.update)
    mode = "async" if args.async_ == "yes" else "sync"
    if div is None:
        print(f"{n} cases, 0 divergences ({mode} scheduling, seed {args.seed}"
              f"{', mutant ' + args.mutant if args.mutant else ''})")
        return 0
    path = save_case(case, args.out)
    print(f"{n} cases tried; divergence found and shrunk:\n{report(case, div, path, args.mutant)}")
    return 1


def _read_trace(path: str, into: Callable[[Iterable[dict]], Any] = list):
    """The trace at `path`, streamed through its checks into `into` (a list of its events by default)."""
    from .runs.simulate import ConfigError
    from .trace import iter_trace
    try:
        return into(iter_trace(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read trace: {exc}") from None


def cmd_plot(args) -> int:
    import importlib.util

    from .runs.simulate import ConfigError
    from .timeline import plot_timeline, timeline_of

    # the input is judged first, with or without matplotlib; streamed: the series are kept, not the events
    tl = _read_trace(args.trace, timeline_of)
    if tl.last_kind != "end":
        raise ConfigError(f"{args.trace}: incomplete trace (no end event after line {tl.events}: the run was "
                          "interrupted or failed); plot draws complete runs only")
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("plot needs matplotlib: pip install 'vllm-faultsim[plot]'")
    out = args.out or str(Path(args.trace).with_suffix(".png"))
    _output_path(out, "--out")
    try:
        plot_timeline(tl, out, title=f"{args.trace} ({tl.header.get('side', '?')}, seed {tl.header.get('seed')})")
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the plot ({exc.strerror or exc})") from None
    print(f"plot: {out}")
    return 0


def cmd_deploy(args) -> int:
    from .runs.deploy import deploy_main
    return deploy_main(args, _output_path)


def cmd_fidelity(args) -> int:
    from .runs.fidelity import fidelity_main
    return fidelity_main(args)


def cmd_check_plan(args) -> int:
    from ..faults.plan import load_plan

    plan = load_plan(args.plan)
    print(f"{args.plan}: ok, {len(plan.faults)} fault(s): {', '.join(f.kind for f in plan.faults) or 'none'}")
    return 0


# Subcommands that run the real vLLM: their options live in their modules, imported only when used.
DELEGATED = {"procs": "runs.procs", "calibrate": "runs.calibrate"}


def cmd_delegated(args) -> int:
    import importlib
    import importlib.util

    from .runs.simulate import ConfigError

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{args.command} needs the real vLLM: pip install 'vllm-faultsim[vllm]' (vllm==0.26.0)")
    module = importlib.import_module(f"{__package__}.{DELEGATED[args.command]}")
    sub = argparse.ArgumentParser(prog=f"vllm-faultsim {args.command}", description=module.__doc__.split("\n\n")[0])
    module.add_arguments(sub)
    return module.main(sub.parse_args(args.rest))


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-faultsim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="one simulation: trace + summary")
    r.add_argument("--config", help="run config (YAML): setup, scheduler, workload, seed, step_time, serving, ...; "
                   "fields it lacks take RunConfig's defaults (no setup: the placeholder profile)")
    r.add_argument("--setup", help=f"named real setup (packaged: {', '.join(available_setups())}; or a YAML path; "
                   f"'none'): vLLM engine arguments, step time and serving costs of a model on a GPU "
                   f"(default without --config: {DEFAULT_SETUP}, Llama-3.1-8B on one H200, vLLM 0.26.0's "
                   "`vllm serve` defaults, aiconfigurator step time)")
    r.add_argument("--plan", help="fault plan (YAML or JSON)")
    r.add_argument("--workload", help="JSONL workload to replay (arrival, prompt_tokens, output_tokens, mm)")
    r.add_argument("--trace", default="vllm-faultsim-trace.jsonl", help="trace output (default: %(default)s)")
    r.add_argument("--seed", type=int)
    r.add_argument("--profile", help="linear step-time profile name or JSON path, in place of the setup's "
                   "step time ('default' is an uncalibrated PLACEHOLDER, not a measured GPU)")
    r.add_argument("--rate", type=float, help="Poisson arrival rate (req/s)")
    r.add_argument("--duration", type=float, help="seconds of arrivals")
    r.add_argument("--prompt", type=int, help="prompt tokens")
    r.add_argument("--output", type=int, help="output tokens")
    for name in ("max-num-seqs", "max-num-batched-tokens", "num-gpu-blocks", "block-size", "max-model-len"):
        r.add_argument(f"--{name}", type=int)
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("study", help="what-if grid; no arguments: the embedded default study")
    s.add_argument("--spec", help="study spec (YAML); default: the embedded study")
    s.add_argument("--out", default="vllm-faultsim-study", help="output folder (default: %(default)s)")
    s.add_argument("--no-progress", action="store_true")
    _sweep_arguments(s)
    s.set_defaults(func=cmd_study)

    se = sub.add_parser("search", help="SLO search: the cheapest configuration (GPU, TP, replicas, engine "
                        "arguments) meeting TTFT/TPOT/goodput SLOs, with and without a fault profile")
    se.add_argument("--spec", required=True, help="search spec (YAML): workload, slo, space, cost, faults")
    se.add_argument("--out", default="vllm-faultsim-search", help="output folder: search.csv, pareto.png "
                    "(default: %(default)s)")
    se.add_argument("--no-progress", action="store_true")
    _sweep_arguments(se)
    se.set_defaults(func=cmd_search)

    d = sub.add_parser("diff", help="simulator vs the real vLLM Scheduler on CPU (needs vllm)")
    d.add_argument("--examples", type=_at_least_one, default=100, help="generated cases (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default: %(default)s)")
    d.add_argument("--kind", choices=("mixed", "text"), default="mixed", help="workload kind")
    d.add_argument("--kv-pressure", choices=("any", "yes", "no"), default="any")
    d.add_argument("--async", dest="async_", choices=("yes", "no"), default="yes",
                   help="async scheduling on both sides (AsyncScheduler, batch queue of 2) or the sync path "
                        "(default: %(default)s, as vLLM 0.26.0 serves; --replay takes the case's own mode)")
    d.add_argument("--mutant", help="a deliberately wrong simulator policy, to see the checker catch it")
    d.add_argument("--replay", help="replay a saved case (JSON)")
    d.add_argument("--traces", nargs=2, metavar=("LEFT", "RIGHT"), help="compare two saved traces offline")
    d.add_argument("--out", default="vllm-faultsim-diff", help="where failing cases go (default: %(default)s)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_diff)

    for name, help_ in (("procs", "engine-process fault matrix: the real vLLM manager/monitor vs the model (needs vllm)"),
                        ("calibrate", "fit a step-time profile on the real engine (needs vllm and a CUDA GPU)")):
        sub.add_parser(name, help=help_, add_help=False).set_defaults(func=cmd_delegated)

    pl = sub.add_parser("plot", help="a trace's timeline as a PNG (steps, requests, TTFT, faults)")
    pl.add_argument("trace", help="a trace written by run (or by a real driver)")
    pl.add_argument("--out", help="the PNG (default: the trace's name with .png)")
    pl.set_defaults(func=cmd_plot)

    f = sub.add_parser("fidelity", help="replay a recorded real vLLM run; simulated vs measured TTFT/TPOT/E2E/step time")
    f.add_argument("recording", nargs="+", help="recording(s), vllm-faultsim.recording/1 (.jsonl or .jsonl.gz)")
    f.add_argument("--config", help="run config (YAML/JSON) merged over the one the header gives")
    f.add_argument("--trace", help="write the simulator's trace here (one recording)")
    f.add_argument("--json", help="write the numbers here (JSON)")
    f.add_argument("--out", default="vllm-faultsim-fidelity", help="folder for the pictures (default: %(default)s)")
    f.add_argument("--fit", nargs="+", metavar="REC", help="calibrate (serving CPU costs, step-time scale) on these "
                   "recordings first, then report on RECORDING (held out when not among them)")
    f.add_argument("--cpu-speed", action="store_true", help="with --fit: scale the fitted serving costs to each "
                   "replayed run's CPU speed, read from its recorded schedule() times against the fit recordings' "
                   "(none of its latencies; needs step lines): the engine core's CPU speed moves from host to host")
    f.set_defaults(func=cmd_fidelity)

    dp = sub.add_parser("deploy", help="a deployment: DP ranks or servers behind a router, retries, faults from rates")
    dp.add_argument("--spec", help="deployment spec (YAML): deployment, fault_rates, run (harness/runs/deploy.py)")
    dp.add_argument("--replay", metavar="TRACE", help="run again what a deployment trace's header says (same bytes)")
    dp.add_argument("--seed", type=int, help="seed of the workload and the faults (default: the run config's)")
    dp.add_argument("--trace", default="vllm-faultsim-deploy.jsonl", help="trace output (default: %(default)s)")
    dp.add_argument("--json", action="store_true", help="print the summary as JSON")
    dp.add_argument("--no-progress", action="store_true")
    dp.set_defaults(func=cmd_deploy)

    c = sub.add_parser("check-plan", help="validate a fault plan")
    c.add_argument("plan")
    c.set_defaults(func=cmd_check_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in DELEGATED:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.argv, args.rest = argv, rest
    on_main_thread = threading.current_thread() is threading.main_thread()
    _SIGTERM.clear()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    try:
        return args.func(args)
    except _usage_errors() as exc:
        print(f"vllm-faultsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _SIGTERM.is_set():
            print("vllm-faultsim: terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("vllm-faultsim: interrupted", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


_SIGTERM = threading.Event()


def _terminated(signum, frame) -> None:
    """SIGTERM unwinds the command as Ctrl-C does (a library on the way, Ray, may re-raise it as a
    plain KeyboardInterrupt: the event says which): no partial trace left (``run``), every
    finished study point kept, workers stopped."""
    _SIGTERM.set()
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
