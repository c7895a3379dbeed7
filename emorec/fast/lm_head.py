"""The LM head at chosen positions only: a small model's head over every position of a batch
(49,152 vocabulary logits per token for SmolLM2) would be a large share of the cost, when the
loss and the scores need a few positions per row."""

import threading
from contextlib import contextmanager

import torch

from emorec.tensors import output_head, pools


def at_positions(tensor: torch.Tensor, from_end: torch.Tensor) -> torch.Tensor:
    """tensor (batch, positions, ...) at the positions `from_end` (batch, span) of each row,
    counted from the end."""
    rows = torch.arange(len(tensor), device=tensor.device)[:, None]
    return tensor[rows, tensor.shape[1] - from_end.to(tensor.device)]


class HeadAt:
    """`head.run(model, from_end, **inputs)`: the model's logits only at the positions
    `from_end` (batch, span) of each row, counted from the end of the input (which virtual
    tokens do not shift), as (batch, span, vocab), and the model output. A pre-hook gathers
    those rows of the final hidden states before the LM head: this works for any model with an
    output embedding, and the model's own post-processing of the logits (scaling, soft-capping)
    still applies. A decoder classifier's head (a few labels: cheap everywhere) runs over all
    positions, since its forward pools them; a hook then gathers them.

    The positions are per thread (evaluation and training streams run one model in several
    threads at once). The hook is on the head only while some thread is inside `at`."""

    def __init__(self, model):
        self.head, self.pooled = output_head(model), pools(model)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.inside, self.handle = 0, None

    def _gather(self, module, args):
        from_end = getattr(self.local, "from_end", None)
        if from_end is None:  # another thread's forward, outside `at`
            return None
        return (at_positions(args[0], from_end), *args[1:])

    def _take(self, module, args, output):
        from_end = getattr(self.local, "from_end", None)
        if from_end is not None:
            self.local.taken = at_positions(output, from_end)

    @contextmanager
    def at(self, from_end: torch.Tensor):
        with self.lock:
            if self.inside == 0:
                hook = self.head.register_forward_hook if self.pooled else self.head.register_forward_pre_hook
                self.handle = hook(self._take if self.pooled else self._gather)
            self.inside += 1
        before, self.local.from_end = getattr(self.local, "from_end", None), from_end
        try:
            yield
        finally:
            self.local.from_end = before
            with self.lock:
                self.inside -= 1
                if self.inside == 0:
                    self.handle.remove()

    def run(self, model, from_end: torch.Tensor, **inputs):
        """(logits at `from_end`, the model output) of model(**inputs)."""
        self.local.taken = None
        with self.at(from_end):
            out = model(**inputs)
            return (self.local.taken if self.pooled else out.logits), out

    def tail_logits(self, model, ids, mask, lengths: torch.Tensor, span: int, **kwargs):
        """Logits at the `span` positions ending at each row's last real token, (batch, span,
        vocab), and the model output. Rows are right-padded to different lengths, so each
        row's positions differ."""
        from_end = ids.shape[1] - (lengths[:, None] - span + torch.arange(span, device=lengths.device))
        return self.run(model, from_end, input_ids=ids, attention_mask=mask, **kwargs)
