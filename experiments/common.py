"""What more than one experiment uses: the matmul peak that FLOP utilisations are measured
against, and studies that outlive a session.

A study that outlives a session: named jobs run one after another through the entrypoint
(`python -m emorec ... resume=true`), each in its own run directory, so an interrupted job
continues from its last checkpoint; as each finishes, its small results (`config.yaml` and
`metrics.json`, never predictions: they hold dataset text) are copied into a results folder that
can be committed, and a job whose results are there is skipped. The report is then built from
that folder alone, by anyone, without the run directories.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@dataclass(frozen=True)
class Job:
    name: str
    overrides: list[str] = field(default_factory=list)


def is_done(results: Path, name: str) -> bool:
    return (results / name / "metrics.json").is_file()


def read_results(results: Path) -> dict[str, dict]:
    """Each finished job's composed config (a plain dict) and metrics, by job name."""
    found = {}
    for metrics in sorted(results.glob("*/metrics.json")):
        config = OmegaConf.to_container(OmegaConf.load(metrics.parent / "config.yaml"))
        found[metrics.parent.name] = {"config": config, "metrics": json.loads(metrics.read_text())}
    return found


def compose_config(overrides: list[str]):
    """The config a run with these overrides composes (no logger), outside Hydra's app."""
    from emorec.schema import register

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["logger=none", *overrides])


def load_data(overrides: list[str]):
    """The splits a run with these overrides sees (emorec's own loader, its seeded training
    sample included), without a model: (emorec.data.splits.Data, the run's seed)."""
    from emorec.data.splits import load_splits

    cfg = compose_config(overrides)
    return load_splits(cfg.dataset, cfg.seed), cfg.seed


def run_job(job: Job, outputs: Path, results: Path, python: str = sys.executable) -> None:
    """Run (or continue) one job in outputs/<name>, then copy its config and metrics (per-step
    losses rounded to 4 decimals) to results/<name>. A failed job raises CalledProcessError, one
    stopped by a signal SystemExit; either way its run directory is kept for `resume=true`."""
    out = outputs / job.name
    command = [python, "-m", "emorec", *job.overrides, f"hydra.run.dir={out}", "resume=true"]
    print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {' '.join(command[2:])}", flush=True)
    code, stopped_by = run_child(command)
    if stopped_by:  # the study stops too (a failed job's CalledProcessError lets a study go on)
        sys.exit(f"study: {job.name} stopped by {stopped_by}; run the study again to continue it from {out}")
    if code:
        raise subprocess.CalledProcessError(code, command)
    target = results / job.name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "config.yaml", target / "config.yaml")
    metrics = json.loads((out / "metrics.json").read_text())
    if metrics.get("train"):
        metrics["train"]["losses"] = [round(x, 4) for x in metrics["train"]["losses"]]
    (target / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


def run_child(command: list[str]) -> tuple[int, str | None]:
    """Run `command` to its end: its exit status, and the signal that stopped this process
    meanwhile, if any. SIGINT and SIGTERM sent to this process are handed on to the child, and
    this process waits while it checkpoints and exits (subprocess.run would kill it a quarter of a
    second after a Ctrl-C, its checkpoint unwritten); emorec reads the same signal delivered twice,
    here and by the terminal or SLURM, as one."""
    child = subprocess.Popen(command)
    received: list[str] = []

    def forward(signum, frame):
        received.append(signal.Signals(signum).name)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
        return code, received[0] if received else None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def job_list(doc: str, jobs: dict[str, list[str]], results: Path, outputs: Path, commit_each: bool = False) -> None:
    """A study's command line: `--list` each job's state, or run the jobs not done yet (`--only`
    some, in that order), one after another, each in outputs/<name> (`--outputs`) with its results
    to results/<name> (committed at once with `commit_each`)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(jobs), help="these jobs, in this order (default: all)")
    parser.add_argument("--outputs", type=Path, default=outputs, help="the runs' own folders")
    parser.add_argument("--list", action="store_true", help="print each job's state and stop")
    args = parser.parse_args()
    for name in args.only or jobs:
        done = is_done(results, name)
        if args.list:
            print(f"{name:36s} {'done' if done else 'to run'}  {' '.join(jobs[name])}")
        elif not done:
            try:
                run_job(Job(name, jobs[name]), args.outputs, results)
            except subprocess.CalledProcessError as stopped:
                again = f"run the study again to continue it from {args.outputs / name}"
                sys.exit(f"study: job {name} stopped (exit status {stopped.returncode}); {again}")
            if commit_each:
                commit(results / name, f"{results.parent.name}: job {name}")


def commit(path: Path, message: str, tries: int = 5) -> None:
    """Commit one results folder, and nothing else staged, in the repository that holds it;
    a git command running beside it (its index.lock) is waited out."""
    git = ["git", "-C", str(path.parent)]
    for attempt in range(tries):
        for step in (["add", "--", str(path)], ["commit", "-q", "-m", message, "--", str(path)]):
            done = subprocess.run([*git, *step], capture_output=True, text=True)
            if done.returncode:
                break
        else:
            return
        time.sleep(2 * (attempt + 1))
    error = (done.stderr or done.stdout).strip().splitlines()
    print(f"study: warning: could not commit {path}: {error[-1] if error else 'git failed'}", file=sys.stderr)


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0, device: str = "cpu", sizes=(1024, 2048, 3072)) -> float:
    """GFLOP/s of the best square matmul size, dense, on `device` (on a CPU, on the threads torch
    uses; on a GPU, waiting for the device before the clock is read). `seconds` bounds the whole
    measurement, warm-ups included: a dtype the CPU only emulates (bf16 without AVX-512 BF16 or
    AMX runs at about 1 GFLOP/s) stops after its first size instead of taking minutes."""

    def sync():
        if device != "cpu":
            torch.cuda.synchronize(device)

    best, begin = 0.0, time.perf_counter()
    for n in sizes:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up
        sync()
        reps, start = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - start < seconds / len(sizes):
            a @ b
            reps += 1
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
        if time.perf_counter() - begin > seconds:
            break
    return best
