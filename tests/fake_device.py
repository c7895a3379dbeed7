"""A second device for CPU-only machines, `emorecfake`: a Python "privateuse1" backend whose
tensors are fake (FakeTensorMode: shapes, dtypes and devices, no values), given the few kernels
that allocating and copying onto it need. An operation that meets one of its tensors with a CPU
tensor raises, as on CUDA. (The meta device would not do: embedding and gather accept CPU inputs
with meta weights.)

`register()` runs once per process, at the test session's start (conftest): privateuse1 can be
renamed once, and autograd sizes its per-device queues at the first backward pass."""

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import backend_registration

NAME = "emorecfake"
DEVICE = f"{NAME}:0"


class _Hooks(backend_registration._DummyPrivateUse1Hook):
    def is_available(self) -> bool:  # so torch.accelerator (and what asks it) never picks this device
        return False


class _Module(backend_registration._DummyBackendModule):
    def is_available(self) -> bool:
        return False


_REGISTERED: list = []


def register() -> FakeTensorMode:
    """The backend (once) and the mode its tensors live in."""
    if _REGISTERED:
        return _REGISTERED[0]
    backend_registration._setup_privateuseone_for_python_backend(NAME, backend_module=_Module(), hook=_Hooks())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = torch.device(DEVICE)

    def empty(size, dtype=None, layout=None, device_=None, pin_memory=None, memory_format=None, **kwargs):
        return FakeTensor(mode, torch.empty(size, dtype=dtype, device="meta"), device)

    def empty_strided(size, stride, dtype=None, layout=None, device_=None, pin_memory=None, **kwargs):
        return FakeTensor(mode, torch.empty_strided(size, stride, dtype=dtype, device="meta"), device)

    # torch.tensor(data, device=...) builds on the host, outside any Python mode, then allocates
    # on the device and copies: these are the kernels it reaches.
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("empty.memory_format", empty, "PrivateUse1")
    lib.impl("empty_strided", empty_strided, "PrivateUse1")
    lib.impl("_copy_from", lambda self, dst, non_blocking=False: dst, "PrivateUse1")
    _REGISTERED.extend([mode, lib])
    return mode
