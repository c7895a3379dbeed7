"""The tuned peer: what a careful GPU user gets today from Hugging Face alone, for the GPU
benchmark (experiments/gpu/step_check.py). The naive peer's data, prompt, LoRA and optimiser,
but: the frozen base stored in bf16, SDPA attention, no padding (`DataCollatorWithFlattening`:
a batch's sequences concatenated into one row, their positions restarting, which transformers
turns into a block-diagonal mask), the loss on the answer tokens only, and Liger Kernel's fused
RMSNorm/RoPE/SwiGLU and cross-entropy (`use_liger_kernel`) where the package is installed.
Training only: its figures are compared with emorec's training step.
"""

import importlib.util

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithFlattening, Trainer

from emorec.data.corpora import load_meld
from emorec.data.splits import subsample
from experiments.bench.naive_peer import LABELS, PROMPT, train_seconds, training_arguments


def rows_of(tokenizer, examples) -> list[dict]:
    """Prompt + answer token ids, the prompt's labels -100 (the loss sees the answer only)."""
    rows = []
    for ex in examples:
        messages = [{"role": "user", "content": PROMPT.format(ex.text)}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": LABELS[ex.label]}], tokenize=False
        )
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append({"input_ids": ids, "labels": [-100] * n + ids[n:]})
    return rows


def peer(load, n_train: int, seed: int = 42, device: str = "cuda") -> dict:
    """Train the tuned recipe (`load`: a function returning (model, tokenizer), the model in
    bf16 with SDPA); its figures."""
    torch.manual_seed(seed)
    gpu = device != "cpu"
    model, tokenizer = load()
    rows = rows_of(tokenizer, subsample(load_meld(LABELS).train, n_train, seed))
    liger = gpu and importlib.util.find_spec("liger_kernel") is not None
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    steps = n_train // 16
    trainer = Trainer(
        model=model,
        args=training_arguments("/tmp/emorec-tuned-peer", steps, seed, gpu, use_liger_kernel=liger),
        train_dataset=rows,
        data_collator=DataCollatorWithFlattening(),
    )
    train_s = train_seconds(trainer, gpu)
    tokens = sum(len(r["input_ids"]) for r in rows) * steps * 16 / len(rows)
    result = {
        "system": "tuned peer (HF Trainer + PEFT, bf16 base, SDPA, DataCollatorWithFlattening, answer loss"
        + (", Liger kernels)" if liger else ")"),
        "liger": liger,
        "train_examples": steps * 16,
        "train_s": train_s,
        "train_examples_per_s": steps * 16 / train_s,
        "train_tokens_per_s": tokens / train_s,
    }
    if gpu:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result
