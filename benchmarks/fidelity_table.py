"""Fidelity on the committed real recordings (benchmarks/results/recordings): zero-shot (the
config the header gives, nothing fitted) and calibrated (serving CPU costs and step-time
corrections fitted on the *other* two loads of the same model: ``vllm-faultsim fidelity --fit``).

    python benchmarks/fidelity_table.py [--out benchmarks/results/fidelity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_faultsim.harness.runs import fidelity as F

RECORDINGS = Path(__file__).parent / "results" / "recordings"
MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen3-30b-a3b")
LOADS = ("light", "near", "overload")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'recording':<24} {'mode':<10} " + " ".join(f"{m:>8}" for m in ("TTFT", "TPOT", "E2E", "step")) + "   (MAPE %)")
    for model in MODELS:
        for load in LOADS:
            path = RECORDINGS / f"{model}-{load}.jsonl.gz"
            others = [RECORDINGS / f"{model}-{o}.jsonl.gz" for o in LOADS if o != load]
            fitted = F.fit(others)
            for mode, over in (("zero-shot", None), ("calibrated", fitted)):
                f = F.fidelity(path, over)
                row = {"recording": path.name, "mode": mode, "fit_on": [p.name for p in others] if over else [],
                       "fitted": over, **{m: f.metrics[m] for m in ("ttft", "tpot", "e2e", "step")}}
                rows.append(row)
                print(f"{model + '-' + load:<24} {mode:<10} "
                      + " ".join(f"{f.metrics[m]['mape_pct']:>8.1f}" for m in ("ttft", "tpot", "e2e", "step")))
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
