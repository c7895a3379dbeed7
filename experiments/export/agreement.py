"""The exported model against its run, on a whole test set: `python -m experiments.export.agreement
RUN_DIR [--dtype auto fp32 ...]` exports the run once per dtype (under outputs/export/), labels
the run's test texts with plain transformers in a fresh process (experiments/export/check.py)
and writes results.json here: rows, same labels, the largest probability difference, export
time and folder size, the tokenizer's agreement with the run's own prompt tokens.

Against the run's own predictions.csv, as its evaluation computed them (in bf16 for a bf16
run), and with --fp32-reference also against emorec's own prediction of the same texts in fp32
(`emorec.load(..., trainer.precision=fp32)`), which separates the export from bf16 rounding."""

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from emorec.export import export
from emorec.inference import load

HERE = Path(__file__).parent


def fp32_reference(run_dir: Path, out_root: Path) -> Path:
    """The run's test texts as emorec labels them in fp32, in predictions.csv's columns."""
    with open(run_dir / "predictions.csv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["split"] == "test"]
    trained = load(run_dir, "cpu", ["trainer.precision=fp32"])
    rows = trained.predict(texts)
    path = out_root / f"{run_dir.name}-emorec-fp32.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "text", "prediction", *[f"score_{label}" for label in trained.labels]])
        writer.writerows(["test", r["text"], r["label"], *[r["probs"][lab] for lab in trained.labels]] for r in rows)
    return path


def measure(run_dir: Path, dtype: str, out_root: Path, against: Path | None = None) -> dict:
    out = out_root / f"{run_dir.name}-{dtype}"
    facts = export(run_dir, out, dtype, force=True)
    against = against or run_dir / "predictions.csv"
    args = [sys.executable, str(HERE / "check.py"), json.dumps([[str(out), str(against)]])]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    same, total = facts["tokens"]
    row = {
        "run": run_dir.name,
        "dtype": facts["dtype"],
        "against": "the run's predictions.csv" if against.name == "predictions.csv" else "emorec in fp32",
        "run_precision": facts["metrics"].get("precision"),
        **result[str(out)],
        "emorec_imported": result["emorec imported"],
        "prompt_tokens_same": same,
        "prompt_tokens_of": total,
        "export_s": round(facts["seconds"], 1),
        "folder_mb": round(facts["megabytes"], 1),
    }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dtype", nargs="+", default=["auto"])
    parser.add_argument("--out", type=Path, default=Path("outputs/export"))
    parser.add_argument("--fp32-reference", action="store_true", help="also the fp32 export against emorec in fp32")
    args = parser.parse_args()
    results_path = HERE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    jobs = [(dtype, None) for dtype in args.dtype]
    if args.fp32_reference:
        jobs.append(("fp32", fp32_reference(args.run_dir, args.out)))
    for dtype, against in jobs:
        row = measure(args.run_dir, dtype, args.out, against)
        key = lambda r: (r["run"], r["dtype"], r.get("against"))  # noqa: E731
        results = [r for r in results if key(r) != key(row)] + [row]
        results_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
