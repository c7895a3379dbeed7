"""ChatGLM2-6B and ChatGLM3-6B (the seed paper's model family) as transformers' native
`GlmForCausalLM`: no remote code, no pickles kept.

The hub repositories ship modelling code written for transformers 4.27-4.30 (it does not load
under transformers 5) and pickled `.bin` weights. The architecture is the one transformers now
carries natively for GLM-4: RMSNorm, a SwiGLU MLP whose first projection holds [gate; up],
grouped key/value heads, rotary embeddings on the first half of each head with interleaved pairs,
q/k/v with bias. `convert_chatglm` renames and splits the weights (q/k/v out of
`query_key_value`) and writes a safetensors folder for that class.

One detail the native class does not reproduce: in bf16/fp16, ChatGLM2's code rounds its rotary
table to the half type ("to mimic complex32"); the native class keeps it in fp32 (ChatGLM3's own
code already computes it in fp32). In fp32 the two are the same model.
"""

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from emorec.errors import EmorecError

log = logging.getLogger(__name__)

# ChatGLM's names (under transformer.) -> GlmForCausalLM's; query_key_value is split apart.
RENAMES = [
    (r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"encoder\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"encoder\.layers\.(\d+)\.post_attention_layernorm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"encoder\.layers\.(\d+)\.self_attention\.dense\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", r"model.layers.\1.mlp.gate_up_proj.weight"),
    (r"encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"encoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"output_layer\.weight", "lm_head.weight"),
]
QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)")


def glm_config(chatglm: dict):
    """The GlmConfig of a ChatGLM2/3 config.json."""
    from transformers import GlmConfig

    unsupported = [k for k in ("apply_residual_connection_post_layernorm", "add_bias_linear") if chatglm.get(k)]
    if unsupported or not chatglm.get("rmsnorm", True) or not chatglm.get("post_layer_norm", True):
        raise EmorecError(f"a ChatGLM variant with {unsupported or 'LayerNorm'} is not a GLM model; it cannot convert")
    heads = chatglm["num_attention_heads"]
    return GlmConfig(
        vocab_size=chatglm["padded_vocab_size"],
        hidden_size=chatglm["hidden_size"],
        intermediate_size=chatglm["ffn_hidden_size"],
        num_hidden_layers=chatglm["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=chatglm["multi_query_group_num"] if chatglm.get("multi_query_attention") else heads,
        head_dim=chatglm.get("kv_channels") or chatglm["hidden_size"] // heads,
        rms_norm_eps=chatglm.get("layernorm_epsilon", 1e-5),
        max_position_embeddings=chatglm.get("seq_length", 8192),
        attention_bias=bool(chatglm.get("add_qkv_bias", True)),
        tie_word_embeddings=False,
        # The rotary table of ChatGLM: base 10000 (times rope_ratio in the 32k variants), on
        # half of each head, pairs interleaved (the native class's own layout).
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * chatglm.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=chatglm.get("pad_token_id", 0),
        eos_token_id=chatglm.get("eos_token_id", 2),
    )


def glm_weights(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """ChatGLM's weights under GlmForCausalLM's names, query_key_value split into q, k and v."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        if key.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed by the native class
        if m := QKV.fullmatch(key):
            layer, kind = m.groups()
            q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"model.layers.{layer}.self_attn.{name}.{kind}"] = part.contiguous()
            continue
        for pattern, target in RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = tensor
                break
        else:
            raise EmorecError(f"unexpected ChatGLM weight {key!r}; this converter knows ChatGLM2/3's layout")
    return out


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors where present, else the pickled .bin shards read
    with torch.load(weights_only=True), which loads tensors and refuses code."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise EmorecError(f"{folder} holds no model weights (*.safetensors or pytorch_model*.bin)")
    state = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(file))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def chat_of(source: Path, chatglm: dict) -> str:
    """chatglm3 or chatglm2 (the prompt format and role tokens), from the repository's name."""
    named = [chatglm.get("_name_or_path", "")]
    if (source / "tokenizer_config.json").is_file():
        named.append(json.loads((source / "tokenizer_config.json").read_text()).get("name_or_path", ""))
    return "chatglm3" if any("chatglm3" in str(n).lower() for n in named) else "chatglm2"


def convert_chatglm(source: Path, target: Path, chat: str | None = None) -> Path:
    """Write `target`: a safetensors folder for GlmForCausalLM made from the ChatGLM2/3
    checkpoint in `source`, with its tokenizer where `source` has `tokenizer.model` (`chat`:
    chatglm2 or chatglm3, the prompt format; default: from the repository's name). Written
    beside the target and renamed, so a crash never leaves a folder that looks complete."""
    from transformers import GlmForCausalLM

    start = time.perf_counter()
    chatglm = json.loads((source / "config.json").read_text())
    if chatglm.get("model_type") != "chatglm":
        raise EmorecError(f"{source}/config.json is model_type {chatglm.get('model_type')!r}, not chatglm")
    chat = chat or chat_of(source, chatglm)
    if chat not in ("chatglm2", "chatglm3"):
        raise EmorecError(f"chat={chat!r}; use chatglm2 or chatglm3")
    config = glm_config(chatglm)
    weights = glm_weights(read_weights(source), config)
    dtype = next(iter(weights.values())).dtype
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    missing = set(model.state_dict()) - set(weights)
    if missing:
        first, more = sorted(missing)[0], len(missing) - 1
        raise EmorecError(f"{source} lacks {first} (and {more} more); an incomplete checkpoint?")
    model.load_state_dict(weights, assign=True)
    model.to(dtype)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if (source / "tokenizer.model").is_file():
        glm_tokenizer(source / "tokenizer.model", roles=chat == "chatglm3").save_pretrained(tmp)
    else:
        log.warning("%s has no tokenizer.model: the converted folder has no tokenizer", source)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log.info("converted %s to %s in %.1f s", source, target, time.perf_counter() - start)
    if chat == "chatglm2":
        log.info(
            "ChatGLM2's own code rounds its rotary table to bf16/fp16 in half precision; the native class keeps "
            "it in fp32 (in bf16 the logits differ by about bf16's rounding, checked by tests/test_glm.py)"
        )
    return target


# ChatGLM's special tokens, numbered after the SentencePiece pieces in this order; ChatGLM3 adds
# its role tokens.
SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# Each model's own prompt format as a chat template. ChatGLM2: "[Round 1]\n\n问：...\n\n答："
# (it has no system turn: a system message goes before the first round). ChatGLM3: role tokens,
# each turn's text after a newline. Both start with [gMASK]sop, as their tokenizers' prefix does,
# and end a final answer with </s>, so that answers end with an end-of-turn token.
CHATGLM2_TEMPLATE = (
    "[gMASK]sop{% set round = namespace(n=0) %}{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}"
    "{% elif m.role == 'user' %}{% set round.n = round.n + 1 %}"
    "{% if round.n > 1 %}\n\n{% endif %}[Round {{ round.n }}]\n\n问：{{ m.content }}\n\n答："
    "{% else %}{{ m.content }}{% if loop.last %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}"
)
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% if m.role == 'assistant' and loop.last %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def glm_tokenizer(model_file: Path, roles: bool):
    """ChatGLM2/3's SentencePiece tokenizer (`tokenizer.model`) as a fast tokenizer that encodes as
    the original code does: the pieces, then [MASK] [gMASK] [sMASK] sop eop (and ChatGLM3's role
    tokens) numbered after them, [gMASK] sop before every text, the model's chat template."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    # "sop" and "eop" are words too: special only standing alone (in "[gMASK]sop", not in "sopping").
    specials = [AddedToken(t, special=True, single_word=t in ("sop", "eop")) for t in SPECIAL + ROLES * roles]
    backend.add_special_tokens(specials)
    ids = {t: backend.token_to_id(t) for t in SPECIAL + ROLES * roles}
    if list(ids.values()) != list(range(len(vocab), len(vocab) + len(ids))):
        raise EmorecError(f"{model_file}: the special tokens would not follow the {len(vocab)} pieces")
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A",
        pair="[gMASK] sop $A $B </s>",
        special_tokens=[(t, ids[t]) for t in ("[gMASK]", "sop")] + [("</s>", proto.trainer_spec.eos_id)],
    )
    unk, eos = proto.pieces[proto.trainer_spec.unk_id].piece, proto.pieces[proto.trainer_spec.eos_id].piece
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        eos_token=eos,
        pad_token=unk,  # as the original: padding with <unk>
        chat_template=CHATGLM3_TEMPLATE if roles else CHATGLM2_TEMPLATE,
    )


def fetch_checkpoint(name_or_path: str, revision: str | None = None) -> Path:
    """A ChatGLM checkpoint's folder: a local one, or the hub repository's config and weights
    (the HF cache; its cached copy at once when the hub is out of reach)."""
    from huggingface_hub import snapshot_download

    from emorec.model import local_only

    local = local_only(name_or_path, revision)  # a path that is not there, or an unreachable hub, fails here
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    patterns = ["*.json", "*.safetensors", "pytorch_model*.bin", "tokenizer.model"]
    return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns, local_files_only=local))


def main(argv: list[str]) -> None:
    """`emorec convert-glm SRC DST`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="emorec convert-glm",
        description="Convert a ChatGLM2/3 checkpoint (a folder or a hub name) into a safetensors folder for "
        "transformers' native GlmForCausalLM and a fast tokenizer with the model's chat template (no remote code).",
    )
    parser.add_argument("source", help="a local ChatGLM2/3 folder or a hub name (THUDM/chatglm2-6b)")
    parser.add_argument("target", type=Path, help="the folder to write")
    parser.add_argument("--revision", help="the hub revision (default: main)")
    parser.add_argument("--chat", choices=["chatglm2", "chatglm3"], help="the prompt format (default: from the name)")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        out = convert_chatglm(fetch_checkpoint(args.source, args.revision), args.target, args.chat)
    except EmorecError as e:
        raise SystemExit(f"emorec convert-glm: error: {e}") from None
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"emorec convert-glm: wrote {out} ({size:.1f} MiB) in {time.perf_counter() - start:.1f} s")


def load_chatglm(name_or_path: str, chat: str, revision: str | None = None, **options):
    """model=chatglm2_6b / chatglm3_6b: the checkpoint converted once into the cache (keyed by its
    source, revision and weight files), then loaded as any native model (emorec.model.load_pretrained,
    with `options`: dtype, device, attention, quantisation)."""
    import hashlib

    from emorec.data.files import cache_dir
    from emorec.model import load_pretrained

    source = fetch_checkpoint(name_or_path, revision)
    files = sorted(
        (p.name, p.stat().st_size) for p in source.iterdir() if p.suffix in (".bin", ".safetensors", ".model")
    )
    key = hashlib.sha256(json.dumps([str(source.resolve()), revision, chat, files]).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{source.name}-glm-{key}"
    if not (target / "model.safetensors").is_file() and not (target / "model.safetensors.index.json").is_file():
        log.info("converting %s to transformers' GlmForCausalLM in %s (once)", name_or_path, target)
        convert_chatglm(source, target, chat)
    options.pop("trust_remote_code", None)  # the native class needs no remote code
    return load_pretrained(str(target), revision=None, **options)
