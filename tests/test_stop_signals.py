"""Stop signals delivered twice: SLURM signals every process of a job step and a parent that
hands the signal on (torchrun, a study's runner) delivers it once more; Ctrl-C reaches a whole
process group. The run must read that as one request and still write its checkpoint, and a
study's runner must wait for it instead of killing it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emorec.checkpoint import StopSignals

REPO = Path(__file__).parent.parent

# Stands in for `python -m emorec`: the real StopSignals, a step that ends 1.5 s after the signal,
# then the checkpoint and exit status 128+signal, as emorec's loop does.
FAKE_RUN = """
import os, signal, sys, time
from pathlib import Path
from emorec.checkpoint import StopSignals

here = Path({here!r})
with StopSignals() as signals:
    (here / "ready").write_text(str(os.getpid()))
    while signals.received is None:
        time.sleep(0.05)
    (here / "received").write_text("")
    time.sleep(1.5)
(here / "checkpointed").write_text(signals.received)
sys.exit(128 + getattr(signal, signals.received))
"""
DRIVER = """
import sys
from pathlib import Path
from experiments.common import Job, run_job

run_job(Job("job", []), Path(sys.argv[1]), Path(sys.argv[2]), python=sys.argv[3])
"""


def test_the_same_signal_twice_at_once_is_one_request(monkeypatch):
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handlers run between bytecodes
        assert signals.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):  # another signal: stop now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        monkeypatch.setattr(StopSignals, "REPEAT_S", 0.0)
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):  # the same, later: stop now
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)


def wait_for(path: Path, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    assert path.exists(), driver.communicate(timeout=10)[1]


@pytest.mark.parametrize("name,both", [("SIGTERM", False), ("SIGINT", True)])
def test_a_stopped_study_lets_its_job_checkpoint_and_stops_too(tmp_path, name, both):
    # SIGTERM to the runner alone (kill <pid>): handed on. SIGINT to both (Ctrl-C reaches the
    # process group), the job's first: it reads the runner's copy as the same request.
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_RUN.format(here=str(tmp_path)))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", DRIVER, str(tmp_path / "out"), str(tmp_path / "results"), str(fake)]
    driver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "ready", driver)
    sig = getattr(signal, name)
    if both:  # one after the other, so that the kernel cannot merge them into one
        os.kill(int((tmp_path / "ready").read_text()), sig)
        wait_for(tmp_path / "received", driver)
    driver.send_signal(sig)
    stderr = driver.communicate(timeout=60)[1]
    assert (tmp_path / "checkpointed").read_text() == name  # not killed, not stopped at once
    assert driver.returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        f"study: job stopped by {name}; run the study again to continue it from {tmp_path / 'out' / 'job'}"
    )
    assert not (tmp_path / "results").exists()
