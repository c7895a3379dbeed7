"""Run by a Python with transformers 4.41.2, the era of ChatGLM2/3's own code: build a tiny random
ChatGLM2 or ChatGLM3 from the original modelling code (../shared/models, read there, never
copied into the project), save it as the hub repositories ship theirs (config.json and a pickled
pytorch_model.bin), and save its logits on fixed inputs, for tests/test_glm.py to compare the
converted model against.

    python tests/glm_reference.py MODELS_DIR chatglm2-6b OUT_DIR
"""

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

from chatglm_reference.configuration_chatglm import ChatGLMConfig  # noqa: E402
from chatglm_reference.modeling_chatglm import ChatGLMForConditionalGeneration  # noqa: E402

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
    padded_vocab_size=256,
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

input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(input_ids=input_ids).logits.float()
save_file({"input_ids": input_ids, "logits": logits.contiguous()}, out / "reference.safetensors")
print(f"{name}: logits {tuple(logits.shape)}, std {logits.std():.3f}")
