"""Launching emorec as a user does, in subprocesses: one process (python -m emorec), or two
gloo processes on CPU (torchrun, accelerate launch); and the one-process run to compare with."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.meld_fixture import MELD_DIR

ROOT = Path(__file__).parent.parent
SETTINGS = [
    "logger=wandb",
    "trainer.precision=fp32",
    "trainer.batch_size=3",
    "trainer.eval_batch_size=4",
    "trainer.epochs=2",
    "trainer.max_pass_tokens=80",
    "optimizer.lr=1e-2",
    "adapter=lora",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {
    "python": [sys.executable, "-m", "emorec"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "emorec"],
    # On CPU, --multi_gpu is accelerate's torchrun-style launcher (its --cpu path needs mpirun).
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "{port}",
        "-m",
        "emorec",
    ],
}


def launch(launcher: str, tiny_model, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [a.format(port=free_port()) for a in LAUNCHERS[launcher]]
    args = ["model=hf", f"model.name_or_path={tiny_model}", f"dataset.data_dir={MELD_DIR}", *SETTINGS, *extra]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The single-process run with these extra settings (run once per module), each pass in
    one piece as in each of the two processes (see assert_same_run's token count)."""
    runs = {}

    def get(*extra: str) -> Path:
        if extra not in runs:
            run_dir = tmp_path_factory.mktemp("one") / "run"
            out = launch("python", tiny_model, ROOT, f"hydra.run.dir={run_dir}", "fast.train_streams=1", *extra)
            assert out.returncode == 0, out.stderr[-3000:]
            runs[extra] = run_dir
        return runs[extra]

    return get
