"""The model's settings: a checkpoint by path or hub name, or one of the project-made models.

`services.config` re-exports these; a run config names them under `model:`. A hub name in `path`
is downloaded once, on the driver, into `cache_dir` before any engine or learner starts
(services/model/hub.py); every role then loads the local directory.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModelConfig(_Strict):
    """The embedded default: a Qwen2-architecture model built and initialised by the project."""

    hidden_size: int = Field(128, ge=8, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads; hidden_size / num_heads >= 32 for vLLM.")
    intermediate_size: int = Field(512, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(
        256, ge=16, description="Longest prompt + response in tokens (vLLM sizes its KV cache by it)."
    )

    @model_validator(mode="after")
    def _heads(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class SmallLLMConfig(_Strict):
    """The project-made small LLM (services/model/small_llm.py): byte-level BPE, chat template, Qwen2 shape."""

    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary (bytes and specials included).")
    corpus_problems: int = Field(4000, ge=10, description="Word problems (question + solution) the tokenizer is trained on.")
    corpus_seed: int = Field(12345, description="Seed of that corpus (not the task's train/eval split).")
    hidden_size: int = Field(128, ge=8, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads; hidden_size / num_heads >= 32 for vLLM.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention, as Qwen2.5).")
    intermediate_size: int = Field(512, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(512, ge=16, description="Longest prompt + response in tokens.")

    @model_validator(mode="after")
    def _heads(self) -> "SmallLLMConfig":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, num_heads {self.num_heads}, num_kv_heads "
                             f"{self.num_kv_heads}: heads must divide the width and kv heads the heads")
        return self


class ModelConfig(_Strict):
    """Which model: a checkpoint (`path`: a local directory or a hub name) or a project-made model."""

    path: str | None = Field(
        None, description="A local directory holding an HF causal LM and its tokenizer, or a hub name "
        "(Qwen/Qwen2.5-Math-7B) downloaded once into cache_dir before anything starts; None builds a built-in model."
    )
    cache_dir: str | None = Field(
        None, description="Where a hub name in `path` is downloaded (the hub cache's layout, models--org--name/); "
        "None = $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub. On a cluster: a directory every "
        "node mounts (the GPU recipe: /app/runs/hf-cache). With HF_HUB_OFFLINE=1 only this cache is read."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub name; None = main.")
    builtin: Literal["tiny", "small_llm"] = Field(
        "tiny", description="Without `path`: the character-level tiny model (the Countdown toy) or the small LLM "
        "(byte-level BPE, chat template; the word-problem math task)."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the embedded tiny model.")
    small_llm: SmallLLMConfig = Field(default_factory=SmallLLMConfig, description="Shape of the small LLM.")
    chat_template: bool = Field(False, description="Wrap prompts with the tokenizer's chat template (a user turn).")
    system_prompt: str | None = Field(
        None, description="With chat_template: the system turn's text; None = the template's own default (if any)."
    )
    init_seed: int | None = Field(
        None, description="Seed of the tiny model's random init (and so of its warm start); None = trainer.seed. "
        "Fix it to compare RL seeds from one base model."
    )
