"""Predictions for a whole evaluation set, through a task and the run's engine."""

import time

import torch
from tqdm import tqdm

from emorec.fast import Engine
from emorec.fast.streams import streamed
from emorec.tensors import device_of


@torch.no_grad()
def predict(model, task, prompts: list[list[int]], engine: Engine, *, batch_size: int, autocast: bool, desc="eval"):
    """Every prompt's predicted label index and extra (label-set probabilities, or generated
    text), the seconds it took and the throughput. Batches run in `engine.eval_streams` threads
    at once (one for a task that generates: Engine.for_task); a batch's result does not depend on
    which stream ran it."""
    model.eval()
    preds, extra = [0] * len(prompts), [None] * len(prompts)
    start = time.perf_counter()
    device_type = device_of(model).type
    with engine.merge(model):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            n, run_batch = task.predictor(model, prompts)

        def run(batch: list[int]) -> tuple[list, list]:
            # Grad mode and autocast are per thread: each stream sets its own.
            with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                return run_batch([prompts[i] for i in batch])

        # Batches are cut by the tokens that run per row, those after the shared prefix.
        batches = engine.eval_batches([len(p) - n for p in prompts], batch_size)
        with streamed(run, batches, engine.eval_streams) as results:
            for batch, (out, more) in tqdm(zip(batches, results), total=len(batches), desc=desc, leave=False):
                for i, p, m in zip(batch, out, more):
                    preds[i], extra[i] = p, m
    seconds = time.perf_counter() - start
    return {"preds": preds, "extra": extra, "seconds": seconds, "examples_per_s": len(prompts) / seconds}
