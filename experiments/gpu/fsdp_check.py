"""gpu_check's `fsdp` section (issue 42): FSDP2 on one GPU (a process group of one, NCCL).

1. SmolLM2-135M's shape, LoRA, fp32: the sharded run against the plain one, per-step losses to
   1e-4 relative and the same test metrics (the exactness the CPU tests show, now on CUDA).
2. Qwen2.5-7B's shape, LoRA, the GPU's default precision (FSDP's bf16 gathers and fp32 gradient
   reduction; the base loaded in host memory and moved to the GPU shard by shard): finite and
   falling losses within 2 % of the plain run's, and the measured peak GPU memory beside
   `emorec plan`'s estimate for the same settings.
"""

import math

from emorec.plan import compose, plan

SUBSET = ["dataset=meld", "dataset.max_train=128", "dataset.max_dev=32", "dataset.max_eval=64"]
SHAPES = {
    "random_smollm2_135m": ["adapter=lora", "trainer.precision=fp32", "trainer.max_steps=8"],
    "random_qwen2_5_7b": ["adapter=lora", "trainer.max_steps=8"],
}


def section(emorec_run, tokenizer: list[str], device: str, models=tuple(SHAPES)) -> dict:
    out = {}
    for model in models:
        settings = SHAPES[model]
        overrides = [f"model={model}", *tokenizer, *SUBSET, *settings, f"trainer.device={device}"]
        plain = emorec_run(overrides)
        sharded = emorec_run([*overrides, "trainer.strategy=fsdp"])
        exact = "trainer.precision=fp32" in settings
        a, b = plain["train"]["losses"], sharded["train"]["losses"]
        tolerance = 1e-4 if exact else 2e-2
        checks = {
            "losses finite": all(math.isfinite(x) for x in b),
            f"per-step losses within {tolerance} relative of the plain run's": all(
                abs(x - y) <= tolerance * abs(x) for x, y in zip(a, b)
            ),
            "backward is FSDP2": sharded["fast"]["backward"] == "fully sharded (FSDP2)",
        }
        if exact:
            checks["the same test confusion matrix"] = (
                plain["test"]["confusion_matrix"] == sharded["test"]["confusion_matrix"]
            )
        _, *table = plan(compose([*overrides, "trainer.strategy=fsdp"]), [1], None, device)
        estimate = next(r for r in table if r["strategy"] == "fsdp")
        out[model] = {
            "checks": checks,
            "plain_losses": a,
            "sharded_losses": b,
            "plain_peak_gpu_mb": plain.get("peak_gpu_mb"),
            "sharded_peak_gpu_mb": sharded.get("peak_gpu_mb"),
            "plan_estimate_gb": estimate,
            "train_examples_per_s": {
                "plain": plain["train"]["examples_per_s"],
                "fsdp": sharded["train"]["examples_per_s"],
            },
        }
    out["passed"] = all(all(m["checks"].values()) for m in out.values() if isinstance(m, dict))
    return out
