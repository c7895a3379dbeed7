"""The LM head at chosen positions only: a small model's head over every position of a batch
(49,152 vocabulary logits per token for SmolLM2) would be a large share of the cost, when the
loss and the scores need a few positions per row."""

import threading
from contextlib import contextmanager

import torch

from emorec.reference import base_of


class HeadAt:
    """`with head.at(from_end):` the model's LM head runs only at the positions `from_end`
    (batch, span) of each row, counted from the end of the input (which virtual tokens do not
    shift), so logits are (batch, span, vocab). A pre-hook gathers those rows of the final hidden
    states: this works for any model with an output embedding, and the model's own
    post-processing of the logits (scaling, soft-capping) still applies.

    The positions are per thread (evaluation and training streams run one model in several
    threads at once). The hook is on the head only while some thread is inside `at`."""

    def __init__(self, model):
        self.head = base_of(model).get_output_embeddings()
        self.local = threading.local()
        self.lock = threading.Lock()
        self.inside, self.handle = 0, None

    def _gather(self, module, args):
        from_end = getattr(self.local, "from_end", None)
        if from_end is None:  # another thread's forward, outside `at`
            return None
        hidden = args[0]
        rows = torch.arange(len(hidden), device=hidden.device)[:, None]
        return (hidden[rows, hidden.shape[1] - from_end.to(hidden.device)], *args[1:])

    @contextmanager
    def at(self, from_end: torch.Tensor):
        with self.lock:
            if self.inside == 0:
                self.handle = self.head.register_forward_pre_hook(self._gather)
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

    def tail_logits(self, model, ids, mask, lengths: torch.Tensor, span: int, **kwargs):
        """Logits at the `span` positions ending at each row's last real token, (batch, span,
        vocab), and the model output. Rows are right-padded to different lengths, so each
        row's positions differ."""
        from_end = ids.shape[1] - (lengths[:, None] - span + torch.arange(span, device=lengths.device))
        with self.at(from_end):
            out = model(input_ids=ids, attention_mask=mask, **kwargs)
        return out.logits, out
