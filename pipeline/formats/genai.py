"""genai_config.json beside the portable graph, so onnxruntime-genai runs our ONNX artifact as it is.

The portable graph already speaks onnxruntime-genai's decoder contract (input_ids, attention_mask,
position_ids, past_key_values.%d.key|value in; logits, present.%d.key|value out, the past growing by
concatenation), so no second graph is needed: only the config that names those tensors and the
model's shape, token ids and search defaults. The fused graph (GroupQueryAttention with our own
seqlens inputs) is our runner's and is not described here.

    import onnxruntime_genai as og
    model = og.Model("artifacts/<run>/<NN>-export-<hash>")      # CPU; for CUDA: og.Config + append_provider("cuda")
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.generate import end_tokens
from runtime.io_spec import Contract

GENAI_CONFIG = "genai_config.json"
# model types onnxruntime-genai 0.12 loads by name; the portable graph carries a family's differences itself, so
# another family is described as the plain decoder-only type
GENAI_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite"})


def genai_config(contract: Contract, config: dict, bos_id: int | None, eos_ids: set[int], pad_id: int) -> dict:
    """onnxruntime-genai's model description of our portable graph (`contract`) for the HF `config`."""
    if contract.flavour != "portable":
        raise ValueError("onnxruntime-genai runs the portable graph; the fused one takes our runner's own inputs")
    context = config.get("max_position_embeddings", 2048)
    return {
        "model": {
            "type": config["model_type"] if config["model_type"] in GENAI_TYPES else "llama",
            "bos_token_id": bos_id,
            "eos_token_id": sorted(eos_ids),
            "pad_token_id": pad_id,
            "vocab_size": contract.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": contract.model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": contract.head_dim,
                "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"],
                "num_key_value_heads": contract.num_kv_heads,
                "num_hidden_layers": contract.num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
            "early_stopping": True,
            "past_present_share_buffer": False,  # the portable graph returns past + new, not an in-place buffer
        },
    }


def write_genai_config(folder: Path, contract: Contract) -> Path:
    """Write genai_config.json into the export folder, which holds config.json, generation_config.json
    (the token ids our runner stops on) and the tokenizer onnxruntime-genai reads."""
    config = json.loads((folder / "config.json").read_text())
    gen_file = folder / "generation_config.json"
    gen = {**config, **(json.loads(gen_file.read_text()) if gen_file.is_file() else {})}
    eos_ids, pad_id = end_tokens(gen)
    path = folder / GENAI_CONFIG
    path.write_text(
        json.dumps(genai_config(contract, config, gen.get("bos_token_id"), eos_ids, pad_id), indent=2) + "\n"
    )
    return path
