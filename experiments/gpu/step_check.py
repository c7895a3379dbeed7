"""`make gpu-check`, issue 38's section: the training step at the GPU's pace, measured honestly.

1. Peaks: bf16 matmuls at 8192^3 and at the step's real shapes (M = 400 and 800 tokens against
   the 7B shape's projections); the reachable ceiling of a decoder layer's projections.
2. Per variant of emorec's training step (the packed pass as before issue 38, the static step
   eager, with Liger kernels, compiled per layer, compiled whole with CUDA graphs), on one model
   shape, LoRA r8, batches of 16 MELD prompts: the first step of each bucket met (cold) and
   `--warm` steps timed with CUDA events (warm); examples/s, tokens/s, MFU (4 x non-embedding
   parameters per trained token) and HFU (per token computed, padding included), peak memory;
   graphs compiled.
3. A profile of 5 warm steps of the default and the old step: kernel time (kernels only, no
   user annotations), checked to be at most the wall time; kernels per step; the top 10.
4. Numerics: the compiled step's loss and LoRA gradients against the eager step's on 2 batches
   (relative error at most 2e-2 in bf16), and its loss falling over 20 steps.
5. Peers on the same GPU: the naive peer (experiments/bench/naive_peer.py) and the tuned peer
   (experiments/bench/tuned_peer.py), each run twice, the second kept.

gpu_check.py runs it as its `step` section (its JSON written after each phase).
"""

import gc
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from emorec.batches import train_batches
from emorec.build import Built, Optimizer, Spec, build, prompts_of
from emorec.data.splits import load_splits
from emorec.env import Env, seed_everything
from emorec.errors import instantiate
from emorec.fast import use_bf16
from emorec.run import training_passes
from emorec.tasks import Balance
from emorec.train import TrainingProgress

REPO = Path(__file__).resolve().parent.parent.parent
# The 7B shape's projections (in, out) and how many of each a decoder layer has.
PROJECTIONS = {
    "q, o": ((3584, 3584), 2),
    "k, v": ((3584, 512), 2),
    "gate, up": ((3584, 18944), 2),
    "down": ((18944, 3584), 1),
}
# In order of importance: a GPU session that runs out of time keeps the first (the JSON is
# written after each); the whole step compiled comes last, as it compiles for minutes.
VARIANTS = {
    "packed pass, eager (before issue 38)": ["fast.static_shapes=false", "fast.compile=false"],
    "static step, compiled per layer (default)": [],
    "static step, eager": ["fast.static_shapes=true", "fast.compile=false", "fast.fused_kernels=false"],
    "static step, eager, Liger kernels": ["fast.static_shapes=true", "fast.compile=false"],
    "static step, compiled whole, CUDA graphs": ["fast.compile=true", "fast.compile_scope=step"],
}


def matmul_tflops(m: int, k: int, n: int, device: str, iters: int = 20) -> float:
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = timed_seconds(lambda: [a @ b for _ in range(iters)], device) / iters
    return 2 * m * k * n / seconds / 1e12


def timed_seconds(work, device: str) -> float:
    """Seconds `work` takes on the device (CUDA events on a GPU)."""
    if device == "cpu":
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    work()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def peaks(device: str, quick: bool) -> dict:
    """bf16 TFLOP/s at 8192^3 and at the 7B layer's projections for M tokens; the ceiling: a
    layer's projections' FLOPs over their summed times."""
    out = {"8192^3": matmul_tflops(*(1024,) * 3 if quick else (8192,) * 3, device)}
    for m in (400, 800):
        rates = {name: matmul_tflops(m, k, n, device) for name, ((k, n), _) in PROJECTIONS.items()}
        flops = {name: 2 * m * k * n * count for name, ((k, n), count) in PROJECTIONS.items()}
        out[f"M={m}"] = rates
        out[f"M={m} ceiling"] = sum(flops.values()) / sum(flops[x] / rates[x] for x in rates)
    return out


@dataclass
class Rig:
    """A run's training pieces, built as emorec.run builds them, without the loop."""

    built: Built
    prompts: list
    targets: list
    backward: object
    optimizer: object
    lengths: list


def rig(overrides: list[str], device: str) -> Rig:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["adapter=lora", "dataset=meld", "logger=none", *overrides])
    seed_everything(cfg.seed)
    data = load_splits(cfg.dataset, cfg.seed)
    spec = Spec.of(cfg)
    env = Env(
        Path(tempfile.mkdtemp()), cfg.seed, torch.device(device), use_bf16(cfg.trainer.precision, torch.device(device))
    )
    built = build(spec, env, data.labels, Balance())
    prompts = prompts_of(built.tokenizer, spec, data.train, data.labels, cfg.dataset.context_window)
    targets = [ex.label for ex in data.train]
    built.model.train()
    passes = training_passes(built, built.model, (prompts, targets), env, 16)
    backward = built.engine.backward(built.model, passes)
    optimizer = Optimizer(instantiate(cfg.optimizer), None).build(built.model, env.device)
    return Rig(built, prompts, targets, backward, optimizer, passes.lengths)


def step(r: Rig, batch: list[int]) -> torch.Tensor:
    losses = r.backward.step([batch], TrainingProgress())
    torch.nn.utils.clip_grad_norm_([p for p in r.built.model.parameters() if p.requires_grad], 1.0)
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return losses


def pass_length(r: Rig, batch: list[int]) -> int:
    """Tokens the batch's pass computes: its static length, or the padded packed pass's."""
    impl = r.built.engine.chosen.get("static step")
    n = r.backward.passes.shared_length(batch)
    own = [r.lengths[j] - n for j in batch]
    if isinstance(impl, dict):
        lengths = sorted(impl["lengths"])
        return next((t for t in lengths if t >= n + sum(own)), n + sum(own))
    return n + len(batch) * max(own)


def measure(r: Rig, batches: list[list[int]], warm: int, peak: float, device: str) -> dict:
    """Cold: the first step of each length met; warm: `warm` steps over the batches of the most
    common length, CUDA-event timed."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    cold = {}
    for batch in batches:
        length = pass_length(r, batch)
        if length not in cold:
            cold[length] = timed_seconds(lambda b=batch: step(r, b), device)
    common = Counter(pass_length(r, b) for b in batches).most_common(1)[0][0]
    same = [b for b in batches if pass_length(r, b) == common]
    work = [same[i % len(same)] for i in range(warm)]
    seconds = timed_seconds(lambda: [step(r, b) for b in work], device) / warm
    tokens = sum(sum(r.lengths[j] for j in b) for b in work) / warm
    nonembedding = non_embedding(r.built.model)
    return {
        "fast": r.built.engine.chosen,
        "cold_s_per_length": cold,
        "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
        "warm_ms_per_step": 1e3 * seconds,
        "examples_per_s": 16 / seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": 4 * nonembedding * tokens / seconds / 1e12 / peak,
        "hfu": 4 * nonembedding * common / seconds / 1e12 / peak,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None,
    }


def non_embedding(model) -> int:
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings |= {id(p) for p in (head.parameters() if head is not None else [])}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings and not p.requires_grad)


def profile(r: Rig, batch: list[int], device: str, steps: int = 5) -> dict:
    """Kernel time per step (kernels only: user annotations such as ProfilerStep* are not GPU
    work), against the steps' wall time; kernels per step; the top 10 kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profiler(activities=activities) as prof:
        wall = timed_seconds(lambda: [step(r, batch) for _ in range(steps)], device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    busy = sum(e.device_time for e in kernels) / 1e3 / steps  # device_time is in microseconds
    top = Counter()
    for e in kernels:
        top[e.name[:80]] += e.device_time / 1e3 / steps
    return {
        "wall_ms_per_step": 1e3 * wall / steps,
        "kernel_ms_per_step": busy,
        "kernel_time_within_wall": busy <= 1e3 * wall / steps * 1.01,
        "kernels_per_step": len(kernels) / steps,
        "top_kernels_ms": top.most_common(10),
    }


def free() -> None:
    torch._dynamo.reset()  # compiled code holds the model it was compiled for
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def numerics(base: list[str], device: str) -> dict:
    """The compiled step (default) against the eager static step from the same weights, on 2
    batches: loss and LoRA gradients; then 20 compiled steps over 4 batches: the loss falls."""
    found = {}
    for name, extra in (("eager", ["fast.compile=false"]), ("compiled", [])):
        r = rig([*base, "fast.static_shapes=true", *extra], device)
        batches = train_batches(r.lengths, 16, torch.Generator().manual_seed(0))[:4]
        found[name] = []
        for batch in batches[:2]:
            loss = r.backward.step([batch], TrainingProgress())
            grads = torch.cat([p.grad.flatten() for p in r.built.model.parameters() if p.grad is not None])
            found[name].append((loss.detach().clone(), grads.clone()))
            r.optimizer.zero_grad(set_to_none=True)
        if name == "compiled":
            losses = [step(r, batches[i % 4]).mean().item() for i in range(20)]
        del r
        free()
    pairs = list(zip(found["eager"], found["compiled"]))
    loss_err = max(relative(c[0], e[0]) for e, c in pairs)
    grad_err = max(relative(c[1], e[1]) for e, c in pairs)
    return {
        "loss_relative_error": loss_err,
        "lora_grad_relative_error": grad_err,
        "within_2e-2": loss_err <= 2e-2 and grad_err <= 2e-2,
        "losses": losses,
        "loss_falls": all(map(math.isfinite, losses)) and sum(losses[-5:]) < sum(losses[:5]),
    }


def peer_rows(model: str, device: str, n_train: int, tokenizer: list[str]) -> dict:
    """The naive and the tuned peer on this model shape, each run twice, the second kept."""
    from experiments.bench import naive_peer, tuned_peer

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", *tokenizer])

    def load(dtype):
        return lambda: instantiate(cfg.model.load, dtype=dtype, device=device, attn_implementation="sdpa")

    rows = {}
    for name, run in (
        ("naive peer", lambda: naive_peer.peer(load(torch.float32), n_train, 16, device=device)),
        ("tuned peer", lambda: tuned_peer.peer(load(torch.bfloat16), n_train, device=device)),
    ):
        for _ in range(2):
            rows[name] = run()
            free()
    return rows


def section(args, peak: float, save) -> dict:
    """Phases 2-5 on args.step_model (phase 1: `peaks`), `save(result)` after each."""
    device, tokenizer = args.device, ([f"model.tokenizer={args.tokenizer}"] if args.tokenizer else [])
    base = [f"model={args.step_model}", *tokenizer, f"trainer.device={device}", f"dataset.max_train={args.step_train}"]
    out = {"model": args.step_model, "variants": {}, "profiles": {}}
    for name, extra in VARIANTS.items():
        if device == "cpu" and "eager" not in name:
            continue  # compiling on a CPU: experiments/compile
        print(f"[step_check] {args.step_model}: {name}", flush=True)
        try:
            r = rig([*base, *extra], device)
            batches = train_batches(r.lengths, 16, torch.Generator().manual_seed(0))
            batches = [b for b in batches if len(b) == 16]
            out["variants"][name] = measure(r, batches, args.warm, peak, device)
            if name in ("packed pass, eager (before issue 38)", "static step, compiled per layer (default)"):
                out["profiles"][name] = profile(r, batches[0], device)
            del r
        except Exception as error:  # noqa: BLE001 - one variant's failure is reported, the others run
            out["variants"][name] = {"error": f"{type(error).__name__}: {error}"}
        free()
        save(out)
    if device != "cpu":
        out["numerics"] = numerics(base, device)
        save(out)
        out["peers"] = peer_rows(args.step_model, device, args.step_train, tokenizer)
        save(out)
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['model']}: warm step (CUDA events), MFU/HFU against the 8192^3 peak")
    print("| variant | ms/step | ex/s | tok/s | MFU | HFU | cold s (per length) | graphs | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, v in result["variants"].items():
        if "error" in v:
            print(f"| {name} | {v['error'][:80]} |")
            continue
        cold = ", ".join(f"{t}: {s:.1f}" for t, s in v["cold_s_per_length"].items())
        memory = "-" if v["peak_gpu_mb"] is None else f"{v['peak_gpu_mb'] / 1024:.1f}"
        print(
            f"| {name} | {v['warm_ms_per_step']:.1f} | {v['examples_per_s']:.1f} | {v['tokens_per_s']:.0f} | "
            f"{v['mfu']:.1%} | {v['hfu']:.1%} | {cold} | {v['graphs_compiled']} | {memory} |"
        )
    for name, p in result.get("peers", {}).items():
        print(f"| {name} | - | {p['train_examples_per_s']:.1f} | {p['train_tokens_per_s']:.0f} | | | | | |")
    for name, p in result.get("profiles", {}).items():
        print(
            f"profile {name}: {p['wall_ms_per_step']:.1f} ms wall, {p['kernel_ms_per_step']:.1f} ms kernels "
            f"({p['kernels_per_step']:.0f} per step); top: {p['top_kernels_ms'][:3]}"
        )
    if "numerics" in result:
        print("numerics:", {k: v for k, v in result["numerics"].items() if k != "losses"})
