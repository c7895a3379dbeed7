"""`make bench`: emorec against the naive peer, on this machine, with the same model (the
embedded SmolLM2-135M-Instruct), data (MELD), prompt wording and LoRA (rank 8, q/k/v/o,
batch 16, lr 5e-4).

Each system runs in its own process (so peak memory is its own): the naive peer
(naive_peer.py), then emorec through its real entrypoint, once per cumulative lever. The peer
and emorec's default (the last row) run `--repeats` times, alternating, and their figures are
per-figure medians: identical runs on this machine differ by 5-10 %.

FLOPs are 4 x non-embedding parameters per token (forward 2N, backward through the activations
2N; a frozen base has no weight gradients), over training time, against a matmul peak measured
here at the same precision, counted two ways on real tokens (padding is waste, not work):
- MFU, model FLOPs: per trained token, i.e. every prompt and answer token of every example (the
  issue's rule; what the model computes for them, however the implementation gets there);
- HFU, executed FLOPs: per token the model actually ran, so the shared prompt prefix counts
  once per batch, not once per example.
Writes experiments/bench/results.json and prints the table and the ratios.

    python -m experiments.bench.bench [--train 480] [--eval 300] [--repeats 3] [--skip-peer]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from experiments.common import matmul_peak

HERE = Path(__file__).parent
# Cumulative levers: each row adds one to the row before; the last row is emorec's default.
# Every row switches off the levers that come after it.
LATER = {
    "shared prompt prefix": ["fast.share_prefix=false"],
    "bf16 frozen base": ["fast.bf16_base=false"],
    "eager attention": ["model.attn_implementation=sdpa"],
    "no LoRA dropout": ["adapter.dropout=0.05"],
    "merged adapter at evaluation": ["fast.merge_adapter=false"],
    "first-token scoring": ["trainer.scoring=answer"],
    "prefix packed into the rows' pass": ["fast.pack=false"],
    "evaluation streams": ["fast.eval_streams=1", "trainer.eval_batch_size=32"],
    "training streams": ["fast.train_streams=1"],
}
# emorec's reference path (emorec.reference: full logits, fixed-size batches, no component of
# emorec.fast), with the default's precision, prompt and LoRA: a row of its own.
REFERENCE = ("reference path (fast=off)", ["fast=off"])
FIRST = [
    ("plain label-scoring loop, fp32, default system prompt", ["trainer.precision=fp32", "prompt.system=null"]),
    ("+ no default system prompt", ["trainer.precision=fp32"]),
    ("+ bf16 autocast", []),
]


def levers() -> list[tuple[str, list[str]]]:
    later = list(LATER)
    rows = [(name, own + [o for k in later for o in LATER[k]]) for name, own in FIRST]
    for i, name in enumerate(later):
        rows.append((f"+ {name}", [o for k in later[i + 1 :] for o in LATER[k]]))
    return rows


def emorec_overrides(overrides: list[str], n_train: int, n_eval: int) -> list[str]:
    """The run's overrides: LoRA on MELD's first examples, no logger, one validation at the end."""
    sizes = [f"dataset.max_train={n_train}", f"dataset.max_dev={n_eval}", f"dataset.max_eval={n_eval}"]
    return ["adapter=lora", "dataset=meld", "logger=none", *sizes, "trainer.val_every_epoch=false", *overrides]


def run_emorec(overrides: list[str], n_train: int, n_eval: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "emorec", *emorec_overrides(overrides, n_train, n_eval), f"hydra.run.dir={tmp}"]
        subprocess.run(args, check=True, capture_output=True, text=True)
        m = json.loads((Path(tmp) / "metrics.json").read_text())
    t = m["train"]
    return {
        "train_examples": t["examples"],
        "train_s": t["seconds"],
        "train_examples_per_s": t["examples_per_s"],
        "train_tokens_per_s": t["tokens_per_s"],
        "tokens": t["tokens"],
        "computed_tokens": t["computed_tokens"],
        "eval_examples_per_s": m["test_examples_per_s"],
        "val_weighted_f1": m["val"]["weighted_f1"],
        "val_accuracy": m["val"]["accuracy"],
        "val_invalid": m["val"]["invalid"],
        "model_load_s": m["model_load_s"],
        "peak_rss_mb": m["peak_rss_mb"],
        "precision": m["precision"],
        "nonembedding_params": m["total_params"] - m["trainable_params"] - m["embedding_params"],
    }


def run_peer(n_train: int, n_eval: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, str(HERE / "naive_peer.py"), "--out", f.name]
        subprocess.run([*cmd, "--train", str(n_train), "--eval", str(n_eval)], check=True)
        return json.loads(Path(f.name).read_text())


def median_row(runs: list[dict]) -> dict:
    """Each numeric figure's median over the runs (the runs themselves are kept)."""
    # Token counts are the same in every run (same data and seed); medians of train_s and of
    # examples/s come from the same run, as one is the other's inverse times a constant.
    medians = {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, float)}
    return {**runs[0], **medians, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=480, help="training examples (batch 16)")
    parser.add_argument("--eval", type=int, default=300, help="dev and test examples")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the peer and of emorec's default")
    parser.add_argument("--skip-peer", action="store_true", help="reuse the peer's figures from the last results")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    if not os.environ.get("EMOREC_DATA_DIR"):
        print("note: EMOREC_DATA_DIR is unset; MELD is read from the cache or downloaded", file=sys.stderr)

    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    threads = torch.get_num_threads()
    print(f"matmul peak: bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s ({threads} threads)")
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    *lever_rows, (default_name, default_overrides) = levers()
    peer_runs, default_runs = [], []
    # The peer and emorec's default alternate, so a slow spell of the machine hits both.
    for k in range(args.repeats):
        if not (args.skip_peer and old.get("rows")):
            print(f"naive peer, run {k + 1} of {args.repeats} ...", flush=True)
            peer_runs.append(run_peer(args.train, args.eval))
        print(f"emorec: {default_name}, run {k + 1} of {args.repeats} ...", flush=True)
        default_runs.append(run_emorec(default_overrides, args.train, args.eval))
    peer = median_row(peer_runs) if peer_runs else old["rows"][0]
    rows = [{"name": "naive peer", "precision": "fp32", **peer}]
    for name, overrides in [REFERENCE, *lever_rows]:
        print(f"emorec: {name} ...", flush=True)
        rows.append({"name": name, "overrides": overrides, **run_emorec(overrides, args.train, args.eval)})
    rows.append({"name": default_name, "overrides": default_overrides, **median_row(default_runs)})
    n = next(r["nonembedding_params"] for r in rows if "nonembedding_params" in r)
    for r in rows:
        peak = peaks[r["precision"]]
        r["mfu"] = 4 * n * r["tokens"] / r["train_s"] / 1e9 / peak
        r["hfu"] = 4 * n * r["computed_tokens"] / r["train_s"] / 1e9 / peak
    result = {"peaks_gflop_per_s": peaks, "threads": threads, "nonembedding_params": n, "rows": rows}
    result["args"] = {"train": args.train, "eval": args.eval, "repeats": args.repeats}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(result: dict) -> None:
    rows, peer = result["rows"], result["rows"][0]
    head = "| system | train ex/s | train tok/s | MFU | HFU | eval ex/s | val wF1 | invalid | peak RSS GB | load s |"
    print(head + "\n|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r['name']} | {r['train_examples_per_s']:.2f} | {r['train_tokens_per_s']:.0f} | {r['mfu']:.0%} "
            f"({r['precision']}) | {r['hfu']:.0%} | {r['eval_examples_per_s']:.1f} | {r['val_weighted_f1']:.3f} | "
            f"{r['val_invalid']} | {r['peak_rss_mb'] / 1024:.2f} | {r['model_load_s']:.2f} |"
        )
    best = rows[-1]
    epoch_min = 9989 / best["train_examples_per_s"] / 60
    print(
        f"\nemorec vs peer: training {best['train_examples_per_s'] / peer['train_examples_per_s']:.1f}x (target 12x; "
        f"one MELD epoch {epoch_min:.1f} min, target 10), evaluation "
        f"{best['eval_examples_per_s'] / peer['eval_examples_per_s']:.1f}x (target 10x), MFU {best['mfu']:.0%} "
        f"(target 50%; HFU {best['hfu']:.0%}), peak RSS {best['peak_rss_mb'] / 1024:.2f} GB (target 3), "
        f"load {best['model_load_s']:.2f} s (target 3), "
        f"val wF1 {best['val_weighted_f1']:.3f} vs {peer['val_weighted_f1']:.3f}"
    )


if __name__ == "__main__":
    main()
