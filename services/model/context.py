"""Does the longest prompt plus the longest response fit the model? Checked before anything starts.

One quantity, one name: `rollout.max_model_len` is the run's longest prompt + response in tokens,
for every engine (vLLM, whose name it is, sizes its KV cache by it). The rules:
  * it is at most the model's positions, `max_position_embeddings` in config.json (with rope
    scaling counted as vLLM counts it): vLLM refuses to start above them, and a learner would
    run positions the model never saw;
  * the longest prompt + `rollout.max_tokens` fits both. The longest prompt is
    `rollout.max_prompt_tokens` when set (and then every train and eval prompt is measured against
    it), else the longest measured one.
A run that breaks a rule is refused with the numbers (`ContextTooLong`), not cut at the limit row by
row. Measuring is cheap: config.json and the tokenizer, never the weights; every distinct prompt
is tokenized in one batch without the chat template, and the 32 longest are encoded exactly as the
run encodes them (the template adds the same tokens to every prompt). `aepo plan` applies the
same rules to a prompt length it is given or assumes (`length_problems`).
"""

from __future__ import annotations

import json
from pathlib import Path

# config.json keys holding a model's positions; vLLM takes the smallest present
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                  "max_seq_length", "seq_len")
EXACT = 32  # the longest prompts (by raw token count) encoded exactly, chat template included


class ContextTooLong(ValueError):
    """The run's prompts plus responses do not fit `rollout.max_model_len` or the model's positions."""


def model_positions(model_dir: str | Path) -> tuple[int | None, str]:
    """The model's positions from its config.json (rope scaling counted), and where they came from."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, f"{path} unreadable"
    config = {**config.get("text_config", {}), **config}  # multimodal configs keep them in text_config
    found = [int(config[k]) for k in _POSITION_KEYS if isinstance(config.get(k), int)]
    if not found:
        return None, f"{path} names no max_position_embeddings"
    positions = min(found)
    rope = config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type")
    if isinstance(rope.get("factor"), (int, float)) and kind not in (None, "default", "su", "longrope", "llama3", "mrope"):
        if kind == "yarn":
            positions = int(rope.get("original_max_position_embeddings") or positions)
        positions = int(positions * rope["factor"])
        return positions, f"max_position_embeddings with {kind} rope scaling x{rope['factor']:g} in {path}"
    return positions, f"max_position_embeddings in {path}"


def setting_problem(max_model_len: int | None, positions: int | None, positions_where: str) -> str | None:
    """Why rollout.max_model_len itself does not fit the model's positions; None when it does (or is unset)."""
    if max_model_len is not None and positions is not None and max_model_len > positions:
        return (f"rollout.max_model_len {max_model_len} is over the model's {positions} positions "
                f"({positions_where}): lower it to {positions} or less")
    return None


def fit_problems(prompt: int, prompt_what: str, max_tokens: int, max_model_len: int | None,
                 positions: int | None, positions_where: str) -> list[str]:
    """Each limit `prompt` + `max_tokens` exceeds, naming the numbers; empty when they fit."""
    out, total = [], prompt + max_tokens
    limits = [(max_model_len, f"rollout.max_model_len {max_model_len}"),
              (positions, f"the model's {positions} positions ({positions_where})")]
    for limit, what in limits:
        if limit is not None and total > limit:
            room = (f"lower rollout.max_tokens to {limit - prompt} or less" if limit > prompt
                    else "the prompt alone does not fit")
            out.append(f"{prompt_what} {prompt} + rollout.max_tokens {max_tokens} = {total} tokens > {what}: "
                       f"{room}, or shorten the prompts")
    return out


def length_problems(prompt: int, prompt_what: str, max_tokens: int, max_model_len: int | None,
                    positions: int | None, positions_where: str) -> list[str]:
    """Every rule the run's lengths break (`setting_problem`, then `fit_problems`); empty when they fit."""
    setting = setting_problem(max_model_len, positions, positions_where)
    return ([setting] if setting else []) + fit_problems(prompt, prompt_what, max_tokens, max_model_len, positions,
                                                         positions_where)


def longest_prompt(tokenizer, items, chat_template: bool = False, system_prompt: str | None = None,
                   exact: int = EXACT) -> tuple[int, str | None]:
    """(tokens, item id) of the longest prompt among `items` as the run encodes it; (0, None) for none."""
    from services.model.tiny import encode_prompt

    first: dict[str, str] = {}
    for it in items:
        first.setdefault(it.prompt, it.id)
    if not first:
        return 0, None
    texts = list(first)
    raw = tokenizer(texts, add_special_tokens=False)["input_ids"]
    candidates = sorted(range(len(texts)), key=lambda i: len(raw[i]), reverse=True)[:exact]
    n, best = max((len(encode_prompt(tokenizer, texts[i], chat_template, system_prompt)), -i) for i in candidates)
    return n, first[texts[-best]]


def check_context(cfg, model_dir: str | Path, items) -> dict:
    """Refuse (`ContextTooLong`) a run whose prompts + rollout.max_tokens do not fit; returns the numbers.

    `items` is (train, eval) as `load_items` gives them; the tokenizer comes from `model_dir`."""
    from services.model.tiny import load_tokenizer

    rc = cfg.rollout
    positions, where = model_positions(model_dir)
    tok = load_tokenizer(model_dir)
    longest, which = longest_prompt(tok, [*items[0], *items[1]], cfg.model.chat_template, cfg.model.system_prompt)
    template = " with the chat template" if cfg.model.chat_template else ""
    if rc.max_prompt_tokens is not None and longest > rc.max_prompt_tokens:
        raise ContextTooLong(f"prompt {which!r} is {longest} tokens{template} > rollout.max_prompt_tokens "
                             f"{rc.max_prompt_tokens}: raise the bound (prompt + rollout.max_tokens must still fit "
                             "rollout.max_model_len and the model), or leave the longest prompts out of the data")
    prompt, what = ((rc.max_prompt_tokens, "rollout.max_prompt_tokens") if rc.max_prompt_tokens is not None
                    else (longest, f"the longest prompt ({which!r}{template})"))
    problems = length_problems(prompt, what, rc.max_tokens, rc.max_model_len, positions, where)
    if problems:
        raise ContextTooLong("the run does not fit the model's context: " + "; ".join(problems))
    return {"longest_prompt": longest, "longest_prompt_id": which, "prompt_bound": prompt, "max_tokens": rc.max_tokens,
            "max_model_len": rc.max_model_len, "positions": positions}
