"""Run `python -m emorec` in this process and send it a signal right after optimizer step N:
SIGKILL is a crash (kill -9), SIGTERM/SIGINT/SIGUSR2 a preemption. With --fake-requeue, a
stand-in for submitit's SIGUSR2 handler is installed first and prints when it is called.

    python tests/interrupt.py KILL 7 [--fake-requeue] <emorec overrides>
"""

import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

from emorec.__main__ import main

name, after = sys.argv[1], int(sys.argv[2])
args = sys.argv[3:]
if args and args[0] == "--fake-requeue":
    args = args[1:]

    def requeue(signum, frame):
        print("fake submitit: requeued", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGUSR2, requeue)
steps = 0


def count(optimizer, *_):
    global steps
    steps += 1
    if steps == after:
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


register_optimizer_step_post_hook(count)
sys.argv = [sys.argv[0], *args]
main()
