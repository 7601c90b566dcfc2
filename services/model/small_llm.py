"""The project-made small LLM: a real-format checkpoint, built here because no hub is reachable.

What a hub checkpoint such as Qwen/Qwen2.5-Math-7B ships, in miniature:
  * a byte-level BPE tokenizer (`tokenizers`), trained on the project's own corpus (the word
    problems' questions and worked solutions), with Qwen2's pre-tokenizer (its split regex, digits
    one by one, then byte-level), so `AutoTokenizer` loads it as `Qwen2Tokenizer`, as it loads Qwen;
  * Qwen's special tokens (`<|endoftext|>` pads, `<|im_start|>` / `<|im_end|>` frame the turns,
    `<|im_end|>` ends a response) and a Qwen-style chat template with a system turn (the default
    system prompt is Qwen2.5-Math's: reason step by step, answer in `\\boxed{}`);
  * a Qwen2-architecture model with that vocabulary, random-initialised from a seed;
  * saved with `save_pretrained`: config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json (with `chat_template`).
The engines, the learners and `aepo eval` load it through the same code as any checkpoint
directory. The directory is named by a hash of everything that determines it and reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.config import SmallLLMConfig
from services.model.staging import staged_dir

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Qwen2's split regex (its tokenizer.json): contractions, letter runs, single digits, punctuation, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM.replace("\\", "\\\\") + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_FORMAT = 1
_MARKER = "aepo_small_llm.json"


def small_llm_hash(cfg: SmallLLMConfig, seed: int) -> str:
    payload = {"cfg": cfg.model_dump(mode="json"), "seed": seed, "format": _FORMAT, "template": CHAT_TEMPLATE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, Qwen2's pre-tokenizer and specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, padding_side="left",
                                   clean_up_tokenization_spaces=False, model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_small_llm(cfg: SmallLLMConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Train the tokenizer, build the model, save both as a hub-style directory; reused when present."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from services.data.wordproblems import corpus, make_splits

    out_dir = Path(out_dir)
    digest = small_llm_hash(cfg, seed)
    if _marker_hash(out_dir) == digest:
        return out_dir
    train, _ = make_splits(cfg.corpus_problems, 0, seed=cfg.corpus_seed)
    tok = train_bpe_tokenizer(corpus(train) + [DEFAULT_SYSTEM], cfg.vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[PAD], torch_dtype="float32",
    )
    with staged_dir(out_dir, keep_existing=lambda d: _marker_hash(d) == digest) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config).float()
        # as Qwen's instruct checkpoints: stop at <|im_end|> or <|endoftext|>; no sampling defaults
        model.generation_config = GenerationConfig(eos_token_id=[ids[IM_END], ids[PAD]], pad_token_id=ids[PAD])
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _as_qwen_tokenizer(tmp)
        (tmp / _MARKER).write_text(json.dumps({"hash": digest, "seed": seed, "cfg": cfg.model_dump(mode="json")}))
    return out_dir


def _as_qwen_tokenizer(path: Path) -> None:
    """tokenizer_config.json as Qwen's: its class, the chat template inline (not a separate .jinja)."""
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _marker_hash(path: Path) -> str | None:
    try:
        return json.loads((path / _MARKER).read_text()).get("hash")
    except (OSError, ValueError):
        return None
