"""Fidelity on the committed real recordings (benchmarks/results/recordings: vLLM 0.26.0 as served on
one H200, three models x three loads; and the held-out set r2/, recorded later with fresh seeds),
per recording, in three modes:

- ``zero-shot``: serving CPU costs and step-time correction fitted on the *other models'* six
  recordings (nothing of this model or recording: leave-one-model-out; per-request, per-layer and
  per-layer-kind costs carry over);
- ``calibrated``: fitted on the other two loads of the same model (leave-one-load-out);
- ``calibrated-all``: fitted on the other eight recordings (leave-one-out);
- ``calibrated, cpu``: ``calibrated`` with every serving cost scaled to the replayed run's CPU
  speed, read from its recorded ``schedule()`` times (``fidelity.at_cpu_speed``; none of its
  latencies): the host's CPU speed changes from run to run.

An r2 recording is never fitted on: its ``calibrated`` fit is the three original recordings of its
model, ``calibrated-all`` all nine, ``zero-shot`` the six of the other models.

The fit is ``vllm-faultsim fidelity --fit`` (harness/runs/fidelity.py ``fit``); aiconfigurator-core
gives the forward time in every mode, corrected (``decode_scale``) only from the fit recordings of
the replayed recording's model (none in zero-shot).

    python benchmarks/fidelity_table.py [--out benchmarks/results/fidelity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_faultsim.harness.runs import fidelity as F

RECORDINGS = Path(__file__).parent / "results" / "recordings"
HELD_OUT = RECORDINGS / "r2"
MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen3-30b-a3b")
LOADS = ("light", "near", "overload")
METRICS = ("ttft", "tpot", "e2e", "step")


def fit_sets(model: str, recording: Path) -> dict[str, list[Path]]:
    """The recordings each mode fits on for `recording` (of `model`): never `recording` itself."""
    path = lambda m, l: RECORDINGS / f"{m}-{l}.jsonl.gz"  # noqa: E731
    return {"zero-shot": [path(m, l) for m in MODELS if m != model for l in LOADS],
            "calibrated": [path(model, l) for l in LOADS if path(model, l) != recording],
            "calibrated-all": [path(m, l) for m in MODELS for l in LOADS if path(m, l) != recording]}


def recordings() -> list[tuple[str, Path]]:
    """(model, path): the nine originals, then the held-out r2 recordings present."""
    out = [(m, RECORDINGS / f"{m}-{l}.jsonl.gz") for m in MODELS for l in LOADS]
    for p in sorted(HELD_OUT.glob("*.jsonl.gz")):
        out += [(m, p) for m in MODELS if p.name.startswith(m + "-")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'recording':<24} {'mode':<15} " + " ".join(f"{m.upper():>14}" for m in METRICS) + "   (MAPE % (bias %))")
    for model, path in recordings():
        name = str(path.relative_to(RECORDINGS))
        for mode, fit_on in fit_sets(model, path).items():
            fitted = F.fit(fit_on, model=F.load(path).header["model"])
            runs = [(mode, fitted)] + ([("calibrated, cpu", F.at_cpu_speed(fitted, fit_on, path))]
                                       if mode == "calibrated" else [])
            for label, over in runs:
                f = F.fidelity(path, over)
                rows.append({"recording": name, "held_out_set": path.parent == HELD_OUT, "mode": label,
                             "fit_on": [p.name for p in fit_on], "fitted": over, **{m: f.metrics[m] for m in METRICS}})
                print(f"{F.stem(name):<24} {label:<15} " + " ".join(
                    f"{f.metrics[m]['mape_pct']:>6.1f} ({f.metrics[m]['bias_pct']:+5.0f})" if f.metrics[m].get("n")
                    else f"{'-':>14}" for m in METRICS), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
