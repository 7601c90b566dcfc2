"""The trained policy as a checkpoint directory that `transformers` and vLLM load as they are.

`export_policy` writes what `save_pretrained` would: `config.json`, the weights as safetensors
(sharded above `max_shard_size`, with `model.safetensors.index.json`; a tied `lm_head` left out,
as transformers does), `generation_config.json`, and the tokenizer's files copied byte for byte
from the starting checkpoint (its chat template included). The directory appears only once
complete (written under a temporary name, then renamed), and `aepo_export.json` says where it
came from. Loading it back needs nothing from this project: `AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`, or `vllm.LLM(model=DIR)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from services.model.staging import staged_dir

# Every file a tokenizer may keep beside the model (the fast tokenizer, a slow one's vocab, the template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
EXPORT_MARKER = "aepo_export.json"


def export_policy(model_path: str, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                  info: dict[str, Any] | None = None, max_shard_size: str = "5GB") -> Path:
    """Write `state_dict` (HF names, full tensors) as a loadable checkpoint of `model_path`'s
    architecture and tokenizer into `out_dir`, replacing what was there; returns `out_dir`."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, GenerationConfig

    out_dir = Path(out_dir)
    config = AutoConfig.from_pretrained(model_path)
    missing = _check_names(config, state_dict)
    if missing:
        raise ValueError(f"export: the state dict lacks {len(missing)} weights of {model_path}, e.g. {missing[:3]}")
    with staged_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        try:
            generation = GenerationConfig.from_pretrained(model_path)
        except OSError:  # a checkpoint without generation_config.json: the model config's defaults
            generation = GenerationConfig.from_model_config(config)
        generation.save_pretrained(tmp)
        _copy_tokenizer(model_path, tmp)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if getattr(config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)  # transformers re-ties it to the embedding on load
        save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size, safe_serialization=True)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"source_model": str(model_path), **(info or {})}, indent=2))
    return out_dir


def _check_names(config, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Parameter names the architecture has and the state dict lacks (the tied head excepted)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return sorted(names - set(state_dict))


def _copy_tokenizer(model_path: str, dst: Path) -> None:
    src = Path(model_path)
    if src.is_dir():
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        for name in copied:
            shutil.copy2(src / name, dst / name)
        if copied:
            return
    from services.model.tiny import load_tokenizer  # a hub name, or a directory without tokenizer files

    load_tokenizer(model_path).save_pretrained(dst)
