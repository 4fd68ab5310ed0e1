"""Model sources -> one normalized Hugging Face checkpoint folder (the `model` step).

Sources: a hub id, a local HF checkpoint folder, or a GGUF file dequantized by transformers.
Only safetensors and GGUF are read unless the recipe sets `allow_pickle`; remote code only with
`trust_remote_code`. The folder holds safetensors weights, config, generation config (with the
end-of-turn tokens a chat model really stops on) and `tokenizer.json` for the runner.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.artifacts import ChecksumCache
from pipeline.configs import ModelConfig
from pipeline.errors import StageError
from pipeline.recipe import ModelSource
from pipeline.registry import StageResult

# Tokens that end an assistant turn in common chat templates.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def source_identity(source: ModelSource, checksums: ChecksumCache) -> dict:
    """What the model step's cache key depends on: file contents for local sources (hashed once, see ChecksumCache)."""
    if source.kind == "gguf":
        return {"kind": "gguf", "sha256": checksums.sha256(Path(source.location))}
    if source.kind == "dir":
        folder = Path(source.location)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {"kind": "dir", "files": {p.relative_to(folder).as_posix(): checksums.sha256(p) for p in files}}
    return {"kind": "hub", "id": source.location}


HUB_CONNECT_TIMEOUT_S = 5.0


def _hub_reachable(repo_id: str, revision: str | None, log: Callable[[str], None]) -> bool:
    """Whether to download; False (load from the local cache) when the hub cannot be reached but the model is
    cached, and one line in seconds when it is not (the hub client would otherwise retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), HUB_CONNECT_TIMEOUT_S
        ).close()
        return True
    except OSError as e:
        reason = e.strerror or type(e).__name__
    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        log(f"  {url.hostname} unreachable ({reason}): loading {repo_id} from the local cache")
        return False
    raise StageError(
        f"model.source: {repo_id} is a hub id, {url.hostname} cannot be reached ({reason}) and the model "
        "is not in the local cache; give a local folder or .gguf file, or download it where the hub is "
        "reachable (then HF_HUB_OFFLINE=1 uses the cache)"
    )


def import_model(cfg: ModelConfig, source: ModelSource, out: Path, log: Callable[[str], None]) -> StageResult:
    if source.kind == "dir" and streamable(Path(source.location), cfg.trust_remote_code):
        return _import_checkpoint(cfg, source, out, log)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # "auto" keeps what the checkpoint holds (its config's dtype, else its first float weight's); GGUF dequantizes to float32
    dtype = (
        torch.float32
        if cfg.dtype == "auto" and source.kind == "gguf"
        else "auto"
        if cfg.dtype == "auto"
        else getattr(torch, cfg.dtype)
    )
    kwargs: dict = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if source.kind == "gguf":
        path = Path(source.location)
        kwargs.update(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
        log(f"  dequantizing GGUF {path.name} to {str(dtype).removeprefix('torch.')}")
    else:
        kwargs.update(pretrained_model_name_or_path=source.location, revision=cfg.revision)
        if not _hub_reachable(source.location, cfg.revision, log):
            kwargs["local_files_only"] = True
    tok_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    try:
        model = AutoModelForCausalLM.from_pretrained(**kwargs, use_safetensors=None if cfg.allow_pickle else True)
        tokenizer = AutoTokenizer.from_pretrained(**tok_kwargs)
    except OSError as e:
        hint = "" if cfg.allow_pickle else " (only safetensors/GGUF are read unless model.allow_pickle: true)"
        raise StageError(f"model {source.location}: could not load: {e}{hint}") from e
    except ValueError as e:
        if source.kind != "gguf":
            raise
        # the gguf reader's own words ("GGUF magic invalid", an unknown architecture) name no file
        raise StageError(f"model.source: {source.location} could not be read as a GGUF model: {e}") from e
    if not tokenizer.is_fast:
        raise StageError(f"model {source.location}: no fast tokenizer (tokenizer.json); the runner needs one")
    if (
        source.kind == "gguf"
    ):  # the weights are float32 now; transformers 5 refuses to save a model marked GGUF-quantized
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    eos_ids, fixes = _end_tokens(cfg, model.generation_config, model.config, tokenizer)
    model.generation_config.eos_token_id = eos_ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = eos_ids[0]
    save_pretrained(model, out)
    fixes += _save_tokenizer(tokenizer, out)
    params = sum(p.numel() for p in model.parameters())
    stored = str(model.dtype).removeprefix("torch.")
    return _imported(cfg, source, model.config.model_type, params, stored, fixes, eos_ids, log)


def streamable(folder: Path, trust_remote_code: bool = False) -> bool:
    """Whether a local checkpoint folder can be imported tensor by tensor: safetensors whose names are the
    ones its transformers class holds (else transformers loads it whole and renames what it must)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.checkpoint import CheckpointReader

    try:
        reader = CheckpointReader(folder)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return False
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    return expected <= set(reader) <= expected | {"lm_head.weight"}


def _import_checkpoint(cfg: ModelConfig, source: ModelSource, out: Path, log: Callable[[str], None]) -> StageResult:
    """A local safetensors checkpoint, shard by shard: a shard whose dtype stays is hard-linked (no second copy on
    disk, and an edit to the source fails the artifact's checksums), one that changes dtype is rewritten one tensor
    at a time. Memory: one tensor, whatever the model's size."""
    import os
    import shutil

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from pipeline.checkpoint import INDEX, CheckpointReader, SafetensorsWriter

    folder = Path(source.location)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer.is_fast:
        raise StageError(f"model {source.location}: no fast tokenizer (tokenizer.json); the runner needs one")
    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    reader = CheckpointReader(folder)
    target = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    stored: set[torch.dtype] = set()
    for shard in sorted({file for file, _, _ in reader.entries.values()}):
        names = [n for n, (file, _, _) in reader.entries.items() if file == shard]
        dtypes = {_dtype_of(reader.entries[n][2]["dtype"]) for n in names}
        if target is None or dtypes <= {target} | _NOT_FLOAT:
            stored |= dtypes
            try:
                os.link(folder / shard, out / shard)
            except OSError:  # another file system
                shutil.copy2(folder / shard, out / shard)
            continue
        with SafetensorsWriter(out / shard) as writer:
            for name in names:
                tensor = reader[name]
                writer.add(name, tensor.to(target) if tensor.is_floating_point() else tensor)
        stored.add(target)
    if (folder / INDEX).is_file():
        shutil.copy2(folder / INDEX, out / INDEX)
    floats = sorted(str(d).removeprefix("torch.") for d in stored - _NOT_FLOAT)
    dtype = floats[0] if len(floats) == 1 else "float32"
    # `dtype` since transformers 4.56 (where `torch_dtype` is an alias that warns), `torch_dtype` before
    renamed = isinstance(getattr(type(config), "torch_dtype", None), property)
    setattr(config, "dtype" if renamed else "torch_dtype", getattr(torch, dtype))
    save_pretrained(config, out)
    eos_ids, fixes = _end_tokens(cfg, generation, config, tokenizer)
    generation.eos_token_id = eos_ids
    if generation.pad_token_id is None:
        generation.pad_token_id = eos_ids[0]
    generation.save_pretrained(out)
    fixes += _save_tokenizer(tokenizer, out)
    if len(floats) > 1:
        log(f"  weights keep their own dtypes: {', '.join(floats)}")
    return _imported(cfg, source, config.model_type, reader.parameters(), dtype, fixes, eos_ids, log)


_NOT_FLOAT = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool}


def _dtype_of(name: str) -> torch.dtype:
    from pipeline.checkpoint import _TORCH_DTYPES

    return _TORCH_DTYPES[name]


def _save_tokenizer(tokenizer, out: Path) -> list[str]:
    fixes = []
    tokenizer.save_pretrained(out)
    if (out / "tokenizer.model").exists():
        (out / "tokenizer.model").unlink()  # the GGUF loader copies the whole GGUF here; tokenizer.json suffices
        fixes.append("removed tokenizer.model (a copy of the GGUF file; tokenizer.json suffices)")
    _portable_tokenizer_class(out / "tokenizer_config.json")
    if fix_byte_level_bpe(out / "tokenizer.json"):
        fixes.append(
            "tokenizer.json: byte-level BPE without SentencePiece's byte fallback (as the GGUF's gpt2 "
            "tokenizer is); the same ids, and onnxruntime-genai's tokenizer reads it"
        )
    return fixes


def _imported(
    cfg: ModelConfig,
    source: ModelSource,
    model_type: str,
    params: int,
    stored: str,
    fixes: list[str],
    eos_ids: list[int],
    log: Callable[[str], None],
) -> StageResult:
    for fix in fixes:
        log(f"  fixed: {fix}")
    log(
        f"  weights stored as {stored}"
        + (" (the checkpoint's own)" if cfg.dtype == "auto" and source.kind != "gguf" else "")
    )
    return StageResult(
        metrics={"parameters": params, "model_type": model_type, "dtype": stored},
        info={"source": {"kind": source.kind, "location": source.location}, "fixes": fixes, "eos_token_ids": eos_ids},
    )


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 saves a tokenizer.json-backed tokenizer as `TokenizersBackend`, a class transformers 4
    does not know; `PreTrainedTokenizerFast` loads the same files in both, so artifacts built on one stack
    load on the other (vLLM and older transformers read our checkpoints)."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def fix_byte_level_bpe(path: Path) -> bool:
    """transformers' GGUF loader writes a byte-level (GPT-2) BPE with SentencePiece's byte fallback and
    decoders bolted on. Every byte already has a byte-level token, so the fallback never fires and
    encoding is unchanged without it, but onnxruntime-genai's tokenizer takes the file for a
    SentencePiece model and maps spaces to -1. Rewrites the file as the plain byte-level BPE it is;
    returns whether it changed anything."""
    data = json.loads(path.read_text())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if (
        model.get("type") != "BPE"
        or not model.get("byte_fallback")
        or not any(p.get("type") == "ByteLevel" for p in pres)
    ):
        return False
    model["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    tmp.replace(path)
    return True


def _end_tokens(cfg: ModelConfig, generation, config, tokenizer) -> tuple[list[int], list[str]]:
    """The ids generation stops on: configured ones, the model's, and the chat template's end-of-turn."""
    fixes: list[str] = []
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    configured = generation.eos_token_id or config.eos_token_id
    ids += configured if isinstance(configured, list) else ([configured] if configured is not None else [])
    template = tokenizer.chat_template or ""
    turn_ends = [t for t in END_OF_TURN if t in template and t in vocab]
    if tokenizer.eos_token and tokenizer.eos_token == tokenizer.bos_token and turn_ends:
        fixes.append(f"tokenizer named {tokenizer.eos_token} as both BOS and EOS; EOS is now {turn_ends[0]}")
        ids = [i for i in ids if i != tokenizer.bos_token_id]
        tokenizer.eos_token = turn_ends[0]
    for token in (*turn_ends, *cfg.eos_tokens):
        if token not in vocab:
            raise StageError(f"model.eos_tokens: '{token}' is not in the tokenizer's vocabulary")
        ids.append(vocab[token])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise StageError("model: no end-of-sequence token known; set model.eos_tokens in the recipe")
    return ids, fixes


def copy_tokenizer(src: Path, out: Path) -> None:
    """The tokenizer and generation config travel with every hf-model artifact a stage writes."""
    import shutil

    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def save_pretrained(obj, out: Path) -> None:
    """`obj.save_pretrained` (a model, or a config alone), then config.json readable by every transformers we
    support: 5.x keeps the rotary base only inside `rope_parameters`, which 4.x ignores (it would run at a base
    of 10,000 and drop llama3/yarn scaling with no error), so the 4.x keys are written beside it."""
    if hasattr(obj, "config"):
        obj.save_pretrained(out, safe_serialization=True)
    else:
        obj.save_pretrained(out)
    add_legacy_rope_keys(out / "config.json")


def add_legacy_rope_keys(path: Path) -> None:
    """Top-level `rope_theta`, `partial_rotary_factor` and `rope_scaling` from a flat `rope_parameters`, as
    transformers 4.x reads them; 5.x takes `rope_scaling` over `rope_parameters` and fills its theta from the
    top level, so it loads the same values. Gemma 3's per-layer-kind tables become 4.x's `rope_local_base_freq`."""
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("sliding_attention"), dict) and "full_attention" in rope:
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]  # Gemma 3's sliding layers
        rope = rope["full_attention"]
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    config["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope["partial_rotary_factor"]
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type") == "longrope":  # 4.x's Phi-3 takes exactly these three, the length beside them
        if "original_max_position_embeddings" in scaling:
            config["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
        scaling = {"type": "longrope", "short_factor": scaling["short_factor"], "long_factor": scaling["long_factor"]}
    config["rope_scaling"] = scaling if scaling.get("rope_type", scaling.get("type", "default")) != "default" else None
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_torch_model(folder: Path, attention: str = "eager"):
    """The float32 PyTorch model of an hf-model artifact, by default with the attention the exporter traces
    ("sdpa" runs calibration passes faster, benchmarks/experiments/quantize_speed.py; the result differs by float noise)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=torch.float32, attn_implementation=attention_for(config, attention)
    )
    return model.eval()


def attention_for(config, attention: str) -> str:
    """`attention`, unless it is "sdpa" and the family's code has no SDPA path (Gemma 2: its soft-capped scores
    are eager only); then eager, which computes the same."""
    from transformers import AutoModelForCausalLM

    if attention != "sdpa":
        return attention
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


@torch.no_grad()
def torch_greedy(
    model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int, batch_size: int
) -> list[tuple[list[int], int | None]]:
    """Greedy replies of a PyTorch model, in left-padded batches on the model's device: (reply tokens, the end
    token it stopped on, or None when cut off). With no `eos_ids`, the model's generation config decides."""
    device = next(model.parameters()).device
    replies = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(eos_ids) or None,
            pad_token_id=pad_id,
        )
        for row in out[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in eos_ids), None)
            replies.append((row, None) if end is None else (row[:end], row[end]))
    return replies
