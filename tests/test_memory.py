"""Memory options that change no result: activation checkpointing (trainer.activation_checkpointing)
recomputes each layer's activations in the backward pass and gives the same per-step losses and
final metrics as keeping them, for every kind of training."""

import pytest

from emorec.errors import EmorecError
from emorec.run import run

KINDS = {
    "lora": ["adapter=lora", "adapter.dropout=0.1"],  # dropout: the recomputation must draw the same masks
    "full": ["adapter=full", "optimizer.lr=1e-3"],
    "classifier-head": ["adapter=lora", "head=classifier"],
    "prompt_tuning": ["adapter=prompt_tuning"],
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_activation_checkpointing_gives_the_same_losses(make_cfg, tmp_path, kind):
    settings = [*KINDS[kind], "trainer.max_steps=4", "trainer.val_every_epoch=false"]
    # Under checkpointing the training loss takes the plain pass (emorec.fast.PlainTraining): the
    # run it must match keeps its activations on that pass.
    plain = ["fast.pack=false", "fast.share_prefix=false", "fast.head_at=false"]
    kept = run(make_cfg(*settings, *plain, f"output_dir={tmp_path / 'kept'}"))
    recomputed = run(make_cfg(*settings, "trainer.activation_checkpointing=true", f"output_dir={tmp_path / 'gc'}"))
    assert kept["activation_checkpointing"] is False and recomputed["activation_checkpointing"] is True
    assert recomputed["train"]["losses"] == pytest.approx(kept["train"]["losses"], rel=1e-5)
    assert recomputed["test"]["weighted_f1"] == pytest.approx(kept["test"]["weighted_f1"], abs=1e-6)


def test_what_cannot_recompute_says_so(make_cfg, monkeypatch):
    with pytest.raises(EmorecError, match="adapter=ptuning_v2 passes its prefix as a key/value cache"):
        run(make_cfg("adapter=ptuning_v2", "trainer.activation_checkpointing=true"))
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(EmorecError, match="does not support activation checkpointing; set trainer.activation"):
        run(make_cfg("adapter=lora", "trainer.max_steps=1", "trainer.activation_checkpointing=true"))
