"""Fidelity on the committed real recordings (benchmarks/results/recordings: vLLM 0.26.0 as served on
one H200; the nine originals, three models x three loads; the set r2/, recorded later with fresh
seeds; the set r3/, recorded on a third machine session: the 8B at vLLM's default ``max_num_seqs``
1024 near and over capacity, a second MoE model (Mixtral-8x7B) at three loads, the 1B and 8B at 64
again), per recording, in these modes:

- ``zero-shot``: serving CPU costs and step-time correction fitted on the *other models'*
  recordings (nothing of this model: leave-one-model-out; per-request, per-layer and
  per-layer-kind costs carry over);
- ``calibrated``: fitted on the same model's recordings of the other sets (an original: on the
  other two original loads, leave-one-load-out; a model recorded in one set only, Mixtral: the other
  loads of that set);
- ``calibrated, cpu``: ``calibrated`` with every serving cost scaled to the replayed run's CPU
  speed, read from its recorded ``schedule()`` times (``fidelity.at_cpu_speed``; none of its
  latencies): the host's CPU speed changes from run to run;
- ``calibrated-all``: fitted on every recording of the other sets (an original: the other eight
  originals).

So an r2 recording is calibrated on the originals with r3 as extra fit data, an r3 recording on the
originals and r2: a held-out set is never fitted on for its own rows (Mixtral's calibrated rows
excepted, as said). The set r4/ (the 8B at 64 at three loads, recorded on a fifth machine session
with a fresh seed, each header with ``cpu_during_run``) is held out from everything: its rows are
fitted on the originals, r2 and r3, and no other row is fitted on it.

The fit is ``vllm-faultsim fidelity --fit`` (harness/runs/fidelity.py ``fit``); aiconfigurator-core
gives the forward time in every mode, corrected (``decode_scale``) only from the fit recordings of
the replayed recording's model (none in zero-shot).

    python benchmarks/fidelity_table.py [--sets original,r2,r3,r4] [--out benchmarks/results/fidelity.json]
    python benchmarks/fidelity_table.py --sets r4 --out benchmarks/results/fidelity_r4.json   # the held-out r4 alone
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_faultsim.harness.runs import fidelity as F

RECORDINGS = Path(__file__).parent / "results" / "recordings"
SETS = {"original": RECORDINGS, "r2": RECORDINGS / "r2", "r3": RECORDINGS / "r3", "r4": RECORDINGS / "r4"}
HELD_OUT = ("r4",)  # fitted on every other set, never fitted on for another set's rows
MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen3-30b-a3b", "mixtral-8x7b")
METRICS = ("ttft", "tpot", "e2e", "step")


def recordings() -> list[tuple[str, str, Path]]:
    """(set, model, path) of every committed recording, set by set."""
    return [(name, m, p) for name, d in SETS.items() for p in sorted(d.glob("*.jsonl.gz"))
            for m in MODELS if p.name.startswith(m + "-")]


def fit_sets(recording: tuple[str, str, Path], every: list[tuple[str, str, Path]]) -> dict[str, list[Path]]:
    """The recordings each mode fits on for `recording`: never one of its own set (but for the
    originals' leave-one-out rows and a model recorded in one set only), never itself."""
    kind, model, path = recording
    every = [r for r in every if r[0] == kind or r[0] not in HELD_OUT]
    if kind == "original":
        others = [(s, m, p) for s, m, p in every if s == kind and p != path]
    else:
        others = [(s, m, p) for s, m, p in every if s != kind]
    same = [p for _, m, p in others if m == model] or [p for s, m, p in every if s == kind and m == model and p != path]
    return {"zero-shot": [p for _, m, p in others if m != model], "calibrated": same,
            "calibrated-all": [p for _, _, p in others]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated rows to compute, of: {', '.join(SETS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity.json"))
    args = ap.parse_args()
    every, rows = recordings(), []
    print(f"{'recording':<32} {'mode':<15} " + " ".join(f"{m.upper():>14}" for m in METRICS) + "   (MAPE % (bias %))")
    for rec in every:
        kind, _, path = rec
        if kind not in args.sets.split(","):
            continue
        name = str(path.relative_to(RECORDINGS))
        modes = fit_sets(rec, every)
        for mode, fit_on in modes.items():
            if not fit_on or (mode == "calibrated-all" and fit_on == modes["zero-shot"]):  # Mixtral: the same fit
                continue
            fitted = F.fit(fit_on, model=F.load(path).header["model"])
            runs = [(mode, fitted)] + ([("calibrated, cpu", F.at_cpu_speed(fitted, fit_on, path))]
                                       if mode == "calibrated" else [])
            for label, over in runs:
                f = F.fidelity(path, over)
                rows.append({"recording": name, "set": kind, "mode": label,
                             "fit_on": [str(p.relative_to(RECORDINGS)) for p in fit_on], "fitted": over,
                             **{m: f.metrics[m] for m in METRICS}})
                print(f"{F.stem(name):<32} {label:<15} " + " ".join(
                    f"{f.metrics[m]['mape_pct']:>6.1f} ({f.metrics[m]['bias_pct']:+5.0f})" if f.metrics[m].get("n")
                    else f"{'-':>14}" for m in METRICS), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
