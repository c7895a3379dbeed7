"""Where and how a process runs: its device, precision, seeds and clock, and the hardware a
run reports (results from different machines stay told apart)."""

import platform
import random
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emorec.distributed import rank_and_world


@dataclass
class Env:
    """Where and how this process runs."""

    out: Path
    seed: int
    device: torch.device
    bf16: bool  # bf16 autocast
    accelerator: object = None  # several processes: accelerate's Accelerator
    checkpoint: Path | None = None  # the checkpoint a resumed run continues from
    start: float = field(default_factory=time.perf_counter)
    earlier: float = 0.0  # wall seconds the run took in earlier processes, up to its checkpoint

    def wall(self) -> float:
        """The run's wall time so far, a resumed run's earlier processes included."""
        return self.earlier + time.perf_counter() - self.start

    @property
    def precision(self) -> str:
        """What metrics.json and checkpoints record: bf16 (autocast) or fp32."""
        return "bf16" if self.bf16 else "fp32"

    @property
    def rank_world(self) -> tuple[int, int]:
        return rank_and_world(self.accelerator)

    @property
    def main(self) -> bool:
        return self.rank_world[0] == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def hardware(device: torch.device, processes: int) -> dict:
    """The machine behind a run's speed and its precision choice: results from different machines
    (a CPU with AVX-512 BF16 runs bf16, one without it runs fp32) stay told apart."""
    if device.type == "cuda":
        name, threads, isa = torch.cuda.get_device_name(device), None, None
    else:
        name, threads = cpu_name(), torch.get_num_threads()
        isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None
    return {"device": device.type, "name": name, "processes": processes, "threads": threads, "cpu_isa": isa}


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX on x86). oneDNN's own check
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) also says yes for AVX-512 without them (Skylake-X
    to Ice Lake), where bf16 is emulated: 53 GFLOP/s against fp32's 139 measured on an Ice Lake
    Xeon's two threads. Other architectures (Arm's BF16 extension) keep oneDNN's answer."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    native = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if x86 and None not in native:
        return any(check() for check in native)
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_name() -> str:
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or "unknown CPU"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb(peak: bool = False) -> float | None:
    """This process's resident memory now, or (`peak`) its most since `reset_peak_rss`, from
    Linux's /proc/self/status (VmRSS, VmHWM); None elsewhere."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        found = re.search(rf"{key}\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux): a peak that loading the model reached (two copies for a
    moment) does not hide what training needs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gpu_mb() -> float | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return None
