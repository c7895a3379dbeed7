"""`make gpu-check`, second half (the first is `pytest -m gpu`): emorec on one CUDA GPU.

1. The main job (LoRA on MELD, the embedded model's shape and tokenizer, randomly initialised:
   the weights are drawn on the CPU, so both runs start alike) on a MELD-sized subset, on the
   CPU in fp32 and on the GPU in fp32 and in its default precision: losses finite and falling,
   metrics within a tolerance of the CPU run.
2. Issue 38's acceptance (`step`, experiments/gpu/step_check.py): matmul peaks at the step's
   shapes, the training step's variants cold and warm, a kernel profile, numerics, and the
   naive and tuned peers; the earlier benchmark (`small`, `large`) on request:
3. The benchmark on the same GPU: emorec against the naive peer (HF Trainer + PEFT, bf16
   autocast, generate + parse; experiments/bench/naive_peer.py) on a SmolLM2-135M-shaped and a
   Qwen2.5-7B-shaped model (randomly initialised on the GPU, no download), with emorec's prefix
   sharing variants (packed pass through SDPA, prefix cache, none) and emorec's own generation
   as the evaluation baseline. Examples/s, tokens/s, MFU against a bf16 matmul peak measured
   here (4 x non-embedding parameters per trained token: LoRA, frozen base), peak GPU memory.

Each section's result is written as it finishes (--out, JSON), so a run cut short keeps what it
did; --quick runs tiny sizes (to try the script on a CPU: --device cpu --quick).

    EMOREC_DATA_DIR=... python -m experiments.gpu.gpu_check --out gpu_check.json
"""

import argparse
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from emorec.errors import instantiate
from emorec.run import run
from emorec.schema import register
from experiments.bench import naive_peer
from experiments.common import matmul_peak
from experiments.gpu import fsdp_check, step_check

REPO = Path(__file__).resolve().parent.parent.parent


def bf16_peak_tflops(device: str) -> float:
    """TFLOP/s of dense bf16 matmuls on `device` (8192^3 on a GPU), as the CPU bench measures."""
    sizes = (8192,) if device != "cpu" else (1024,)
    return matmul_peak(torch.bfloat16, seconds=1.0, device=device, sizes=sizes) / 1e3


def free(device: str) -> None:
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


# Not a config override: the bench's own switch, for one experiment emorec has no option for
# yet (torch's SDPA without its cuDNN backend, which plans each new attention shape).
NO_CUDNN_SDPA = "no-cudnn-sdpa"


def emorec_run(overrides: list[str]) -> dict:
    """One run through the real config and run(), in this process."""
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(NO_CUDNN_SDPA not in overrides and cudnn)
    overrides = [o for o in overrides if o != NO_CUDNN_SDPA]
    try:
        with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["logger=none", f"output_dir={tmp}", *overrides])
            metrics = run(cfg)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    free("cuda" if torch.cuda.is_available() else "cpu")
    return metrics


def figures(m: dict, nonembedding: int, peak: float) -> dict:
    t = m["train"]
    return {
        "train_examples_per_s": t["examples_per_s"],
        "train_tokens_per_s": t["tokens_per_s"],
        "mfu": 4 * nonembedding * t["tokens_per_s"] / 1e12 / peak,
        "eval_examples_per_s": m["test_examples_per_s"],
        "val_weighted_f1": m["val"]["weighted_f1"],
        "val_accuracy": m["val"]["accuracy"],
        "invalid": m["val"]["invalid"],
        "peak_gpu_mb": m.get("peak_gpu_mb"),
        "precision": m["precision"],
        "fast": m["fast"],
        "first_losses": t["losses"][:3],
        "last_losses": t["losses"][-3:],
    }


def main_job(device: str, sizes: list[str], tokenizer: list[str]) -> dict:
    """CPU fp32, GPU fp32, GPU default precision; the checks."""
    base = ["adapter=lora", "dataset=meld", "model=random_smollm2_135m", *tokenizer, *sizes]
    runs = {
        "cpu fp32": emorec_run([*base, "trainer.device=cpu", "trainer.precision=fp32"]),
        f"{device} fp32": emorec_run([*base, f"trainer.device={device}", "trainer.precision=fp32"]),
        f"{device} default": emorec_run([*base, f"trainer.device={device}"]),
    }
    cpu = runs["cpu fp32"]
    out = {"runs": {}, "checks": {}}
    for name, m in runs.items():
        losses = m["train"]["losses"]
        k = max(1, len(losses) // 5)
        tol = 0.02 if "fp32" in name else 0.05
        checks = {
            "losses finite": all(math.isfinite(x) for x in losses),
            "losses fall": sum(losses[-k:]) / k < sum(losses[:k]) / k,
            f"test accuracy within {tol} of the CPU's": abs(m["test"]["accuracy"] - cpu["test"]["accuracy"]) <= tol,
            f"test weighted F1 within {tol} of the CPU's": abs(m["test"]["weighted_f1"] - cpu["test"]["weighted_f1"])
            <= tol,
            "final loss within 2 % of the CPU's": abs(losses[-1] - cpu["train"]["losses"][-1])
            <= 0.02 * abs(cpu["train"]["losses"][-1]),
        }
        out["checks"][name] = checks
        out["runs"][name] = {
            "test_accuracy": m["test"]["accuracy"],
            "test_weighted_f1": m["test"]["weighted_f1"],
            "losses": losses,
            "train_examples_per_s": m["train"]["examples_per_s"],
            "eval_examples_per_s": m["test_examples_per_s"],
            "precision": m["precision"],
            "fast": m["fast"],
        }
    out["passed"] = all(all(c.values()) for c in out["checks"].values())
    return out


def bench(model: str, device: str, n_train: int, n_eval: int, peak: float, tokenizer: list[str], rounds=2) -> dict:
    """The peer and emorec's variants on one model shape, each measured warm (see below)."""
    sizes = [f"dataset.max_train={n_train}", f"dataset.max_dev={n_eval}", f"dataset.max_eval={n_eval}"]
    base = ["adapter=lora", "dataset=meld", f"model={model}", *tokenizer, *sizes, f"trainer.device={device}"]
    base += ["trainer.val_every_epoch=false", "trainer.log_every=10", "trainer.checkpoint_every=0"]
    variants = {
        "emorec default": [],
        "prefix cache (fast.pack=false)": ["fast.pack=false"],
        "no prefix sharing (fast.share_prefix=false)": ["fast.share_prefix=false"],
        "reference path (fast=off)": ["fast=off"],
        "emorec default, SDPA without cuDNN": [NO_CUDNN_SDPA],
    }
    rows, cold = {}, {}
    nonembedding = None
    # Two rounds, the second in reverse order, and the second's figures kept: a run's first
    # meeting with each batch shape pays one-off costs (cuBLAS heuristics, cuDNN attention
    # plans, lazily loaded kernels) that a short run would otherwise count as training time,
    # for whichever variant happens to run first.
    for round_ in range(rounds):
        for name, extra in list(variants.items())[:: 1 if round_ % 2 == 0 else -1]:
            print(f"[gpu_check] {model}: {name} (round {round_ + 1})", flush=True)
            m = emorec_run([*base, *extra])
            nonembedding = m["total_params"] - m["trainable_params"] - m["embedding_params"]
            if name in rows:
                cold[name] = rows[name]["train_examples_per_s"]
            rows[name] = figures(m, nonembedding, peak)
    # Generate-then-parse with emorec's model and engine: the evaluation baseline on this GPU.
    print(f"[gpu_check] {model}: generate", flush=True)
    m = emorec_run([*base, "trainer.predict=generate", "dataset.max_train=16"])
    rows["emorec generate + parse (evaluation only)"] = {
        "eval_examples_per_s": m["test_examples_per_s"],
        "invalid": m["val"]["invalid"],
        "val_weighted_f1": m["val"]["weighted_f1"],
    }
    print(f"[gpu_check] {model}: naive peer", flush=True)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", *tokenizer])

    def load():
        # The peer's own way: fp32 weights (bf16 autocast), transformers' default attention (SDPA).
        return instantiate(cfg.model.load, dtype=torch.float32, device=device, attn_implementation="sdpa")

    for _ in range(rounds):  # the peer too is measured warm
        p = naive_peer.peer(load, n_train, n_eval, device=device)
        free(device)
    p["mfu"] = 4 * nonembedding * p["train_tokens_per_s"] / 1e12 / peak
    rows["naive peer"] = p
    best = rows["emorec default"]
    ratios = {
        "train_vs_peer": best["train_examples_per_s"] / p["train_examples_per_s"],
        "eval_vs_peer_generate": best["eval_examples_per_s"] / p["eval_examples_per_s"],
        "eval_vs_emorec_generate": best["eval_examples_per_s"]
        / rows["emorec generate + parse (evaluation only)"]["eval_examples_per_s"],
    }
    return {"nonembedding_params": nonembedding, "rows": rows, "ratios": ratios, "cold_train_examples_per_s": cold}


def profiled(overrides: list[str], wait: int = 3, active: int = 5) -> dict:
    """One run's training steps under torch.profiler (after `wait` + 2 warm-up steps, `active`
    steps): wall and GPU-busy milliseconds per step, kernels per step, and the host operations
    that take the most time. The profiler steps with the loop through a LogLoss that also waits
    for the GPU at each step (so wall times are the GPU's too)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    import emorec.run as emorec_run_module

    marks: list[float] = []
    prof = profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=wait, warmup=2, active=active)
    )
    real = emorec_run_module.LogLoss

    class Stepping(real):
        def on_step(self, progress, epoch):
            super().on_step(progress, epoch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            prof.step()

    emorec_run_module.LogLoss = Stepping
    try:
        with prof:
            m = emorec_run(overrides)
    finally:
        emorec_run_module.LogLoss = real
    first = wait + 2
    walls = [b - a for a, b in zip(marks[first - 1 :], marks[first : first + active])]
    events = prof.key_averages()
    # Kernels only: user annotations (ProfilerStep*, Optimizer.step#...) also have a CUDA-side
    # row, and counting them put "GPU busy" above the wall time (issue 38).
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not is_annotation(e.key)]
    ops = [e for e in events if not e.key.startswith("ProfilerStep")]
    host = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]
    busiest = sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]
    return {
        "fast": m["fast"],
        "wall_ms_per_step": 1e3 * sum(walls) / len(walls),
        "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / active,
        "kernels_per_step": sum(e.count for e in kernels) / active,
        "top_host_ops": [(e.key, round(e.self_cpu_time_total / 1e3 / active, 2), e.count // active) for e in host],
        "top_kernels": [
            (e.key[:80], round(e.self_device_time_total / 1e3 / active, 2), e.count // active) for e in busiest
        ],
    }


def is_annotation(key: str) -> bool:
    return key.startswith("ProfilerStep") or "#" in key


def profile_section(device: str, tokenizer: list[str], models: tuple[str, ...], variants: int = 4) -> dict:
    """Where a training step's time goes, per answer component (the first `variants`), on each
    model shape."""
    out = {}
    for model in models:
        base = ["adapter=lora", "dataset=meld", f"model={model}", *tokenizer, f"trainer.device={device}"]
        base += ["dataset.max_train=192", "dataset.max_dev=16", "dataset.max_eval=16", "trainer.val_every_epoch=false"]
        base += ["trainer.log_every=10", "trainer.checkpoint_every=0"]
        cases = {
            "packed pass (SDPA)": [],
            "head at positions": ["fast.share_prefix=false"],
            "reference, bf16 base": ["fast=off", "fast.bf16_base=true"],
            "packed pass, SDPA without cuDNN": [NO_CUDNN_SDPA],
            "reference (fast=off)": ["fast=off"],
        }
        for name, extra in list(cases.items())[:variants]:
            print(f"[gpu_check] profile {model}: {name}", flush=True)
            emorec_run([*base, *extra])  # warm: the same batch shapes once before, unprofiled
            out[f"{model}: {name}"] = profiled([*base, *extra])
            print_profile({f"{model}: {name}": out[f"{model}: {name}"]})  # now: a run cut short keeps it
    return out


def main() -> None:
    register()  # the config groups' schemas, before composing
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer", help="a tokenizer folder for the random models (default: the embedded one)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to try the script")
    parser.add_argument(
        "--sections",
        nargs="*",
        default=["main", "fsdp", "peaks", "step"],
        help="main, fsdp (issue 42: fsdp_check.py), peaks, step (issue 38: step_check.py), small, large "
        "(the bench), profile (where time goes)",
    )
    parser.add_argument("--profile-model", default="random_qwen2_5_7b", help="the model shape the profile runs")
    parser.add_argument("--step-models", nargs="*", default=["random_smollm2_135m", "random_qwen2_5_7b"])
    parser.add_argument("--fsdp-models", nargs="*", default=list(fsdp_check.SHAPES))
    parser.add_argument("--step-train", type=int, default=256, help="training examples the step section draws from")
    parser.add_argument("--warm", type=int, default=30, help="warm steps timed per variant")
    parser.add_argument("--profile-variants", type=int, default=4, help="how many of the profile's variants run")
    args = parser.parse_args()
    tokenizer = [f"model.tokenizer={args.tokenizer}"] if args.tokenizer else []
    q = args.quick
    result = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "torch": torch.__version__}
    result["bf16_peak_tflops"] = peak = bf16_peak_tflops(args.device)
    print(f"[gpu_check] {result['device']}: bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    main_sizes = ["dataset.max_train=64", "dataset.max_dev=16", "dataset.max_eval=32"] if q else []
    main_sizes = main_sizes or ["dataset.max_train=512", "dataset.max_dev=300", "dataset.max_eval=400"]
    sections = {
        "main": lambda: main_job(args.device, [*main_sizes, "trainer.val_every_epoch=false"], tokenizer),
        "small": lambda: bench("random_smollm2_135m", args.device, 64 if q else 480, 32 if q else 300, peak, tokenizer),
        "large": lambda: bench("random_qwen2_5_7b", args.device, 32 if q else 192, 16 if q else 128, peak, tokenizer),
        "profile": lambda: profile_section(args.device, tokenizer, (args.profile_model,), args.profile_variants),
        "fsdp": lambda: fsdp_check.section(emorec_run, tokenizer, args.device, args.fsdp_models),
        "peaks": lambda: step_check.peaks(args.device, q),
        "step": lambda: step_models(args, peak, result),
    }
    failed = False
    for name in args.sections:
        section = sections[name]
        start = time.perf_counter()
        try:
            result[name] = section()
        except Exception:  # noqa: BLE001 - a section's failure is reported; the others still run
            result[name] = {"error": traceback.format_exc()}
            failed = True
        result[name]["seconds"] = time.perf_counter() - start
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"[gpu_check] {name} done in {result[name]['seconds']:.0f} s", flush=True)
    print_summary(result)
    failed = failed or not all(result.get(k, {}).get("passed", True) for k in ("main", "fsdp"))
    sys.exit(1 if failed else 0)


def step_models(args, peak: float, result: dict) -> dict:
    """step_check's section on each of args.step_models, the JSON written after each phase."""
    out = result["step"] = {}

    def save(model_result: dict) -> None:
        out[model_result["model"]] = model_result
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    for model in args.step_models:
        args.step_model = model
        step_check.print_table(step_check.section(args, peak, save))
    return out


def print_profile(profiles: dict) -> None:
    for name, p in profiles.items():
        if isinstance(p, dict) and "wall_ms_per_step" in p:
            print(
                f"profile {name}: {p['wall_ms_per_step']:.1f} ms/step wall, "
                f"{p['gpu_busy_ms_per_step']:.1f} ms GPU busy, "
                f"{p['kernels_per_step']:.0f} kernels; host: "
                + "; ".join(f"{k} {ms} ms x{n}" for k, ms, n in p["top_host_ops"][:8])
                + "\n  GPU: "
                + "; ".join(f"{k} {ms} ms x{n}" for k, ms, n in p.get("top_kernels", [])[:8])
            )


def print_summary(result: dict) -> None:
    print_profile(result.get("profile", {}))
    if "main" in result and "checks" in result["main"]:
        for name, checks in result["main"]["checks"].items():
            bad = [k for k, ok in checks.items() if not ok]
            print(f"main job, {name}: {'all checks pass' if not bad else 'FAILED: ' + ', '.join(bad)}")
    for section in ("small", "large"):
        if "rows" not in result.get(section, {}):
            continue
        print(f"\n{section} model ({result[section]['nonembedding_params'] / 1e6:.0f} M non-embedding parameters)")
        print("| system | train ex/s | train tok/s | MFU | eval ex/s | val wF1 | invalid | peak GPU GB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in result[section]["rows"].items():
            cells = [r.get(k) for k in ("train_examples_per_s", "train_tokens_per_s", "mfu", "eval_examples_per_s")]
            cells += [r.get("val_weighted_f1"), r.get("invalid", r.get("val_invalid")), r.get("peak_gpu_mb")]
            text = ["-" if c is None else f"{c:.3g}" for c in cells]
            if r.get("mfu") is not None:
                text[2] = f"{r['mfu']:.0%}"
            if r.get("peak_gpu_mb") is not None:
                text[6] = f"{r['peak_gpu_mb'] / 1024:.1f}"
            print(f"| {name} | " + " | ".join(text) + " |")
        print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in result[section]["ratios"].items()))


if __name__ == "__main__":
    main()
