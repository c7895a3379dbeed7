"""Thread streams: work in several Python threads at once, torch's intra-op threads shared out
among them (2 streams of 1 thread on 2 cores). Each batch is then one thread's work from start
to end: the cores do not meet at a barrier after every one of the thousands of small operations
of a pass, and one stream's small operations and Python overhead overlap the other's matmuls.
A CPU lever: on a GPU the streams would serialise on one CUDA stream.
"""

import concurrent.futures
import threading
from contextlib import contextmanager

import torch

from emorec.train import OnePass


@contextmanager
def streamed(fn, items: list, streams: int):
    """Inside: an iterator of fn(item) in order, computed in `streams` threads at once (at most
    one per intra-op thread) that share torch's intra-op threads (one stream: computed as
    iterated). On an error the items not started are dropped and the error reaches the caller."""
    threads = torch.get_num_threads()
    streams = min(streams, threads)
    if streams <= 1:
        yield map(fn, items)
        return
    pool = concurrent.futures.ThreadPoolExecutor(streams, thread_name_prefix="emorec-stream")
    # The pool starts threads lazily and hands new work to an idle one: a thread that finished
    # its first item before the second was submitted would take both, one after the other on
    # a share of the cores. Every stream's thread starts, and waits for the others, first.
    ready = threading.Barrier(streams)
    list(pool.map(lambda _: ready.wait(), range(streams)))
    torch.set_num_threads(max(1, threads // streams))
    try:
        yield pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def pieces_of(rows: list[int], streams: int) -> list[list[int]]:
    """rows cut into at most `streams` runs of consecutive rows, as equal as can be."""
    k = min(streams, len(rows))
    return [rows[i * len(rows) // k : (i + 1) * len(rows) // k] for i in range(k)]


def draws_random(model) -> bool:
    """Whether a training forward draws random numbers (dropout): in several threads they would
    be drawn in whichever order the threads reach them."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class Streamed(OnePass):
    """Each pass's rows as `streams` pieces, each forward and backward in a thread of its own.
    Their gradients come back apart (autograd.grad, not .grad accumulated by two threads at
    once) and are added to .grad in piece order, so the sum does not depend on which thread
    finished first. Each piece computes the prompts' shared prefix again."""

    def __init__(self, passes, params: list, streams: int):
        super().__init__(passes)
        self.params, self.streams = params, streams

    def pieces(self, rows: list[int]) -> list[list[int]]:
        return pieces_of(rows, self.streams)

    def backward(self, rows: list[int], scale: float, last: bool) -> torch.Tensor:
        pieces = self.pieces(rows)
        total = sum(map(len, pieces))

        def run(piece: list[int]) -> tuple[torch.Tensor, tuple]:
            weight = len(piece) / total
            loss = self.passes.loss_of(piece)
            grads = torch.autograd.grad(loss * (scale * weight), self.params, allow_unused=True)
            return loss.detach().float() * weight, grads

        with streamed(run, pieces, len(pieces)) as results:
            results = list(results)
        for i, p in enumerate(self.params):
            for _, grads in results:
                if grads[i] is not None:
                    p.grad = grads[i] if p.grad is None else p.grad + grads[i]
        return sum(loss for loss, _ in results)  # a CPU lever: the tensors are on the host
