"""Models and tokenizers: the embedded tiny Qwen2 model with its character-level tokenizer, and
loading of any HF causal LM from a local directory (a hub name is resolved to one first: hub.py).

The tiny model is written in HF format (`save_pretrained` + a `PreTrainedTokenizerFast`), so the
HF engine, vLLM and the learners all load the very same files. Nothing in the default path
touches the hub: `resolve_model_path` sets HF_HUB_OFFLINE=1 before building or loading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from services.config import ModelConfig, TinyModelConfig
from services.model.staging import staged_dir

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# The toy Countdown task's text: `9,8,3>69|` then `9*8=72,72-3=69<eos>`, with optional spaces.
CHARSET = tuple("0123456789") + tuple("+-*/=,>|") + (" ",)
# Bump when the files written by `build_tiny_model` change meaning, so old caches are not reused.
_TINY_FORMAT = 1
_MARKER = "aepo_tiny.json"


def tiny_vocab() -> dict[str, int]:
    """Token → id of the tiny tokenizer: the specials first (pad = 0), then one id per character."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARSET)}


def build_char_tokenizer():
    """A `PreTrainedTokenizerFast` with one WordLevel token per character of CHARSET.

    Encoding prepends <bos> (a fixed first position for the model to condition on); decoding
    concatenates tokens with nothing in between (`Fuse`), so every toy string, spaces included,
    round-trips exactly with `skip_special_tokens=True`. Characters outside CHARSET map to <unk>.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own "word" (Oniguruma `(?m)` lets `.` match newlines too); `isolated`
    # keeps spaces as tokens instead of dropping them.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def tiny_config_hash(cfg: TinyModelConfig, seed: int) -> str:
    """Short hash of everything that determines the tiny model's files (shape, seed, vocab, format)."""
    payload = {"cfg": cfg.model_dump(mode="json"), "seed": seed, "vocab": tiny_vocab(), "format": _TINY_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _tiny_hf_config(cfg: TinyModelConfig):
    from transformers import Qwen2Config

    vocab = tiny_vocab()
    return Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        torch_dtype="float32",
    )


def build_tiny_model(cfg: TinyModelConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen2 model + tokenizer to `out_dir` in HF format and return the path.

    Idempotent: when `out_dir` already holds a model built from the same config hash it is
    reused untouched. The files are first written to a sibling temporary directory and moved
    into place, so concurrent builders (several actors on one node) never see half a model.
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    digest = tiny_config_hash(cfg, seed)
    if _marker_hash(out_dir) == digest:
        return out_dir
    with staged_dir(out_dir, keep_existing=lambda d: _marker_hash(d) == digest) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(_tiny_hf_config(cfg)).float()
        # Neutral generation defaults: engines pass their own sampling settings explicitly.
        model.generation_config = GenerationConfig(
            bos_token_id=model.config.bos_token_id,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        build_char_tokenizer().save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"hash": digest, "seed": seed, "cfg": cfg.model_dump(mode="json")}))
    return out_dir


def _marker_hash(path: Path) -> str | None:
    try:
        return json.loads((path / _MARKER).read_text()).get("hash")
    except (OSError, ValueError):
        return None


def default_cache_dir() -> Path:
    """Where the tiny model is built when no directory is given: $AEPO_CACHE or ./.cache/aepo."""
    return Path(os.environ.get("AEPO_CACHE", ".cache/aepo")).resolve()


def resolve_model_path(cfg: ModelConfig, cache_dir: str | Path | None = None, seed: int = 0) -> str:
    """The local directory every engine and learner loads: `cfg.path` (a hub name resolved to its
    snapshot in `cfg.cache_dir`, downloaded if need be: services/model/hub.py), or the built-in model
    (`cfg.builtin`: the tiny model, or the small LLM) built under `cache_dir`.

    The tiny model's directory is named by its config hash, so changing its shape never reuses
    stale files. Sets HF_HUB_OFFLINE=1 for the built-in models: nothing may be downloaded.
    """
    if cfg.path is not None:
        from services.model.hub import resolve_model

        return resolve_model(cfg.path, cfg.cache_dir, cfg.revision)
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cfg.builtin == "small_llm":
        from services.model.small_llm import build_small_llm, small_llm_hash

        return str(build_small_llm(cfg.small_llm, root / f"small-llm-{small_llm_hash(cfg.small_llm, seed)}", seed))
    return str(build_tiny_model(cfg.tiny, root / f"tiny-{tiny_config_hash(cfg.tiny, seed)}", seed))


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside the model (left padding, for batched generation)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # transformers 5's AutoTokenizer swaps a generic tokenizer.json for the class registered to the
    # model type (Qwen2Tokenizer, byte-level BPE), which drops the tiny tokenizer's spaces; a
    # tokenizer saved as the generic fast class is therefore loaded as exactly that.
    if _saved_tokenizer_class(path) in _GENERIC_TOKENIZER_CLASSES:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token_id is None:  # Qwen-style tokenizers without a pad token: pad with eos
        tok.pad_token = tok.eos_token
    return tok


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer_class(path: str | Path) -> str | None:
    try:
        return json.loads((Path(path) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None  # a hub name, or no tokenizer_config.json: let AutoTokenizer decide


def load_causal_lm(path: str | Path, dtype=None, device: str = "cpu", attn_implementation: str = "sdpa"):
    """An HF causal LM in eval mode on `device`, float32 unless `dtype` says otherwise
    (a torch dtype, or "auto" for the checkpoint's own)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    return model.to(device).eval()


def encode_prompt(tokenizer, text: str, chat_template: bool = False, system_prompt: str | None = None) -> list[int]:
    """Token ids of one prompt, optionally wrapped in the tokenizer's chat template as a user turn
    (after a system turn with `system_prompt`; without one, the template's default, if any)."""
    if chat_template:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
        ids = tokenizer.apply_chat_template(
            messages + [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
        )
        # transformers 5 may return a BatchEncoding-like mapping instead of a list
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer(text)["input_ids"])


def decode_response(tokenizer, token_ids: list[int]) -> str:
    """Response text without special tokens (eos, pad)."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)
