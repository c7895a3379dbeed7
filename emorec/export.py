"""`emorec export RUN_DIR OUT`: a finished run as a standard Hugging Face folder, which plain
transformers loads as AutoModelForSequenceClassification (`pipeline("text-classification",
model=OUT)`) with the run's labels and predictions, without emorec.

- The adapter is merged into the weights (LoRA, DoRA, IA3; full fine-tuning and zero-shot runs
  have none). Prompt-learning adapters (P-Tuning v1/v2, prompt tuning) add trained states to
  every pass, which plain weights cannot hold: they are refused.
- A head=classifier run and an encoder keep their head. A label-scoring run (head=lm, the first
  answer token scored) becomes a sequence classifier whose head rows are the LM head's rows of
  the labels' first answer tokens: the softmax over those logits is the run's label
  probabilities, on the same last prompt token the classifier pools.
- The prompt goes with the model (emorec.card.prompt_tokenizer): the tokenizer wraps each text in
  the run's prompt, so a raw utterance is all a caller gives.

Written into a temporary folder renamed into place: nothing half-written carries OUT's name.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel

from emorec.build import label_tokens
from emorec.card import model_card, prompt_tokenizer, tokenization_agreement
from emorec.classifier import decoder_classifier
from emorec.errors import EmorecError
from emorec.inference import Trained, load_opened, open_run
from emorec.outputs import atomic
from emorec.settings import is_encoder
from emorec.trust import class_in

# The plain path: fp32, no speed component that changes the model object (emorec.fast).
PLAIN = ["trainer.precision=fp32", "fast.bf16_base=false", "fast.bf16_adapter_inputs=false", "fast.merge_adapter=false"]
# PEFT's prompt-learning configs (P-Tuning v1/v2, prompt tuning, ...): no weights to merge into.
PROMPT_LEARNING = class_in("peft", "PromptLearningConfig")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def refusal(cfg, metrics: dict) -> str | None:
    """Why a run cannot export as a plain sequence classifier (None when it can)."""
    peft = cfg.adapter.peft
    if not metrics.get("test"):
        return "the run did not finish (no test metrics in metrics.json); finish it with resume=true, then export"
    if peft is not None and PROMPT_LEARNING(str(peft._target_)):
        return (
            f"adapter={cfg.adapter.name} adds trained prompt states to every pass, which plain weights cannot hold; "
            "runs of adapter=lora, dora, ia3, full or none export"
        )
    if cfg.model.get("quantization"):
        return (
            f"model.quantization={cfg.model.quantization}: an adapter merged into a quantised base is not the "
            "model the run evaluated; export a run trained on an unquantised base"
        )
    if cfg.prompt.get("demonstrations"):
        return "prompt.demonstrations shows each text training examples retrieved for it; export a run without them"
    if cfg.prompt.get("speaker_template"):
        return (
            "prompt.speaker_template names each utterance's speaker, and the exported model sees one text; "
            "export a run without it (or label with emorec predict, which takes speakers)"
        )
    if cfg.dataset.context_window:
        return (
            f"dataset.context_window={cfg.dataset.context_window}: the exported model sees one text, not its "
            "dialogue; export a run without context (or label with emorec predict)"
        )
    if cfg.trainer.logit_adjust:
        return "trainer.logit_adjust shifts each label's score, and a sequence classifier's head has no bias to hold it"
    if cfg.trainer.predict == "generate":
        return "trainer.predict=generate parses generated text, which a classifier cannot do; export a scoring run"
    return None


def classifier_of(trained: Trained):
    """The run's model as a plain fp32 sequence classifier: the adapter merged, and for a
    label-scoring run the LM head's rows of the labels' first answer tokens as its head."""
    model, cfg = trained.model, trained.config
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if is_encoder(cfg.model) or cfg.head.name == "classifier":
        return model
    task = trained.built.task
    if not task.first_token:
        raise EmorecError(
            "this run scores whole multi-token answers (trainer.scoring=answer), which one linear head cannot "
            "express; export a run scored by the answers' first tokens (trainer.scoring=first_token)"
        )
    if model.get_output_embeddings().bias is not None:
        raise EmorecError("the model's LM head has a bias, and a sequence classifier's head none; use head=classifier")
    first = label_tokens(trained.tokenizer, cfg.prompt, trained.labels)
    return decoder_classifier(model, trained.labels, trained.tokenizer.pad_token_id, "labels", first)


def export(run_dir: str | Path, out: str | Path, dtype: str = "auto", force: bool = False) -> dict:
    """Write the run's model to `out` (see the module's docstring); returns what the card states."""
    run, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EmorecError(f"{out} exists and is not empty; choose another folder, or pass --force to replace it")
    start = time.perf_counter()
    cfg, metrics = open_run(run, PLAIN)
    # Before any model loads: what the config alone shows cannot export.
    if (why := refusal(cfg, metrics)) is not None:
        raise EmorecError(f"{run} cannot export: {why}")
    dtype = dtype if dtype != "auto" else metrics.get("precision", "fp32")
    if dtype not in DTYPES:
        raise EmorecError(f"--dtype {dtype}: use auto, bf16 or fp32")
    trained = load_opened(run, cfg, metrics, "cpu")
    model = classifier_of(trained).to(DTYPES[dtype]).eval()
    tokenizer, prompt = prompt_tokenizer(trained)
    facts = {
        "run": str(run),
        "dtype": dtype,
        "prompt": prompt,
        "tokens": tokenization_agreement(trained, tokenizer, run / "predictions.csv"),
        "metrics": metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic(out) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(trained.config, trained.labels, facts))
    facts["seconds"] = time.perf_counter() - start
    facts["megabytes"] = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    return facts


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="emorec export",
        description="Export a finished run as a Hugging Face sequence classifier, its prompt inside its tokenizer.",
    )
    parser.add_argument("run_dir", help="the run's directory (its hydra.run.dir)")
    parser.add_argument("out", help="the folder to write (it must not exist or be empty, unless --force)")
    parser.add_argument("--dtype", default="auto", help="auto (as the run trained), bf16 or fp32")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        facts = export(args.run_dir, args.out, args.dtype, args.force)
    except EmorecError as e:
        raise SystemExit(f"emorec export: error: {e}") from None
    same, total = facts["tokens"]
    print(
        f"emorec export: {args.out} ({facts['megabytes']:.0f} MB, {facts['dtype']}) in {facts['seconds']:.1f} s; "
        f"the tokenizer gives the run's own prompt tokens for {same} of {total} test texts\n"
        f'use: pipeline("text-classification", model="{args.out}", top_k=None)("some text")',
        file=sys.stderr,
    )
