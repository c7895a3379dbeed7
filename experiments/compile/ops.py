"""Kernel-launching ops per decoder layer of a training step (forward and backward), counted at
ATen's dispatch (below autograd, so the backward's ops count too). Views, aliases and detaches
launch no kernel and are left out; on a GPU each op counted is about one kernel launch."""

from collections import Counter
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

from emorec.tensors import base_of

NO_KERNEL = {"detach", "_unsafe_view", "alias", "lift_fresh"}


class KernelOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def step_ops(step: Callable[[], None]) -> Counter:
    with KernelOps() as counted:
        step()
    return counted.ops


def per_layer(model, step: Callable[[], None]) -> Counter:
    """The ops one decoder layer adds to `step` (a forward and backward of `model`): the step's
    ops with all layers less those with one fewer (transformers' decoders run the first
    config.num_hidden_layers of their layers). `step` runs once first, to warm what it caches."""
    config = base_of(model).config
    layers = config.num_hidden_layers
    step()
    try:
        every = step_ops(step)
        config.num_hidden_layers = layers - 1
        fewer = step_ops(step)
    finally:
        config.num_hidden_layers = layers
    return every - fewer
