"""Run `python -m emorec` in this process and send it a signal right after optimizer step N:
SIGKILL is a crash (kill -9), SIGTERM/SIGINT/SIGUSR2 a preemption. With --fake-requeue, a
stand-in for submitit's SIGUSR2 handler is installed first and prints when it is called.
HOLD N: after step N, write "held" to the file $EMOREC_TEST_HELD and wait (a run that holds its
directory until killed). KILL_SAVING N: a SIGKILL in the middle of the Nth weights file a
checkpoint writes, half of it on disk (a kill -9 while a checkpoint is being written).

    python tests/interrupt.py KILL 7 [--fake-requeue] <emorec overrides>
"""

import os
import signal
import sys
import time
from pathlib import Path

from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import emorec.checkpoint
from emorec.__main__ import main

name, after = sys.argv[1], int(sys.argv[2])
args = sys.argv[3:]
if args and args[0] == "--fake-requeue":
    args = args[1:]

    def requeue(signum, frame):
        print("fake submitit: requeued", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGUSR2, requeue)
steps = saves = 0


def count(optimizer, *_):
    global steps
    steps += 1
    if steps == after and name == "HOLD":
        Path(os.environ["EMOREC_TEST_HELD"]).write_text("held")
        time.sleep(600)
    elif steps == after and name != "KILL_SAVING":
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def save_half_then_die(tensors, path, *args, **kwargs):
    global saves
    saves += 1
    save_file(tensors, path, *args, **kwargs)
    if saves == after:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


if name == "KILL_SAVING":
    emorec.checkpoint.save_file = save_half_then_die
register_optimizer_step_post_hook(count)
sys.argv = [sys.argv[0], *args]
main()
