"""Run by a Python with transformers 4.41.2, the era of ChatGLM2/3's own code: build a tiny random
ChatGLM2 or ChatGLM3 from the original modelling code (../shared/models, read there, never
copied into the project), save it as the hub repositories ship theirs (config.json and a pickled
pytorch_model.bin), and save its logits on fixed inputs; train a tiny SentencePiece model of the
same kind as theirs (BPE with byte fallback) and save the ids the original tokenizer code gives
for English and Chinese strings and for its chat prompt. tests/test_glm.py compares the
converted model and tokenizer against these.

    python tests/glm_reference.py MODELS_DIR chatglm2-6b OUT_DIR
"""

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

models, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
# The code as a package in a temporary folder (modeling_chatglm imports .configuration_chatglm).
package = Path(tempfile.mkdtemp()) / "chatglm_reference"
package.mkdir()
for file in ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py"):
    shutil.copy(models / name / file, package / file)
(package / "__init__.py").write_text("")
sys.path.insert(0, str(package.parent))

import sentencepiece  # noqa: E402
from chatglm_reference.configuration_chatglm import ChatGLMConfig  # noqa: E402
from chatglm_reference.modeling_chatglm import ChatGLMForConditionalGeneration  # noqa: E402

# Strings the tokenizers must agree on; the chat prompt is ChatGLM2's [Round 1] text or
# ChatGLM3's role tokens, each model's own.
TEXTS = [
    "Classify the sentiment of the sentence to neutral, joy or anger: I can't believe it!",
    "你好，世界。今天天气很好，我们去公园吧！",
    "Mixed 中文 and English, with numbers 12345 and émojis 😀",
    "  two leading spaces, a tab\tand a newline\nhere",
    "答：joy",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. I can't believe you did that for me!",
    "Classify the sentiment of the sentence to neutral, joy, surprise, anger, sadness, disgust or fear:",
    "你好，世界。今天天气很好，我们去公园吧！这是一个测试句子，用来训练分词器。",
    "问：这句话的情感是什么？答：高兴。中文和英文混合 mixed text 123.",
] * 50

# The real config's structure (multi-query groups, biases, norms) at tiny sizes.
real = json.loads((models / name / "config.json").read_text())
settings = {k: v for k, v in real.items() if k not in ("auto_map", "architectures", "_name_or_path", "torch_dtype")}
settings.update(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=112,
    kv_channels=16,
    num_attention_heads=4,
    multi_query_group_num=2,
    padded_vocab_size=448,  # above the tiny tokenizer's 405 (ChatGLM3: 409) tokens, as the real one pads
    seq_length=128,
)
config = ChatGLMConfig(**settings)
torch.manual_seed(0)
model = ChatGLMForConditionalGeneration(config, empty_init=False).eval()
with torch.no_grad():  # the code leaves its RMSNorm weights empty: every weight drawn here
    for key, param in model.named_parameters():
        if key.endswith("layernorm.weight"):
            param.copy_(1 + 0.1 * torch.randn_like(param))
        else:
            param.normal_(0.0, 0.1)
model.save_pretrained(out / "model", safe_serialization=False)
shutil.copy(models / name / "tokenizer_config.json", out / "model")  # names the repository, as the hub's does

input_ids = torch.randint(0, 448, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(input_ids=input_ids).logits.float()
    half = model.to(torch.bfloat16)(input_ids=input_ids).logits.float()  # ChatGLM2 rounds its rotary table here
save_file(
    {"input_ids": input_ids, "logits": logits.contiguous(), "logits_bf16": half.contiguous()},
    out / "reference.safetensors",
)

sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_prefix=str(out / "model" / "tokenizer"),
    vocab_size=400,
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    num_threads=1,
    minloglevel=2,
)
spec = importlib.util.spec_from_file_location("tokenization_chatglm", models / name / "tokenization_chatglm.py")
tokenization = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tokenization)


class Tokenizer(tokenization.ChatGLMTokenizer):
    """ChatGLM2's tokenizer sets its SentencePiece model after the base class's __init__, which
    since transformers 4.34 already asks for the vocabulary: set it first (ChatGLM3's does)."""

    def __init__(self, vocab_file, **kwargs):
        self.tokenizer = tokenization.SPTokenizer(vocab_file)
        super().__init__(vocab_file, **kwargs)


tokenizer = Tokenizer(str(out / "model" / "tokenizer.model"))
ids = {"texts": {t: tokenizer.encode(t) for t in TEXTS}}
query = "Classify the sentiment of the sentence to neutral or joy: 我很高兴！"
if hasattr(tokenizer, "build_chat_input"):  # ChatGLM3: role tokens
    ids["chat"] = {"query": query, "ids": tokenizer.build_chat_input(query)["input_ids"][0].tolist()}
else:  # ChatGLM2: [Round 1] text
    ids["chat"] = {"query": query, "ids": tokenizer.encode(tokenizer.build_prompt(query))}
(out / "tokens.json").write_text(json.dumps(ids, ensure_ascii=False, indent=1))
print(f"{name}: logits {tuple(logits.shape)}, std {logits.std():.3f}; {tokenizer.vocab_size} tokens")
