"""The task data's settings: the Countdown toy, the word problems, prompts from files or the hub.

`services.config` re-exports these; a run config names one under `data:` (its `type` picks it).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CountdownDataConfig(_Strict):
    """The toy task: three numbers 1–9 and a target, answered in two arithmetic steps (or the harder
    variant: four numbers, three steps, rare targets)."""

    type: Literal["countdown"] = "countdown"
    num_train: int = Field(20000, ge=1, description="Training problems generated.")
    num_eval: int = Field(256, ge=1, description="Held-out problems generated (disjoint from training).")
    space_prob: float = Field(
        0.2, ge=0.0, le=1.0, description="Warm-start answers insert an optional space at each of 9 places with this probability."
    )
    seed: int = Field(0, description="Seed of the problem generator.")
    num_numbers: int = Field(3, ge=3, le=4, description="Numbers per problem; the answer takes one step fewer.")
    max_solutions: int | None = Field(
        None, ge=1, description="Draw only targets that at most this many distinct step chains reach (rare "
        "solutions, where exploring decides the score); None = every reachable target."
    )


class WordProblemDataConfig(_Strict):
    """Synthetic grade-school word problems, solutions ending in \\boxed{N}, verified by the `math` verifier."""

    type: Literal["wordproblems"] = "wordproblems"
    num_train: int = Field(5000, ge=1, description="Training problems generated.")
    num_eval: int = Field(200, ge=1, description="Held-out problems generated (no question shared with training).")
    max_number: int = Field(50, ge=4, description="Largest number in a problem.")
    seed: int = Field(0, description="Seed of the problem generator.")


DatasetPreset = Literal["dapo_math", "math500", "gsm8k"]


class FileDataConfig(_Strict):
    """Prompts and reference answers from JSONL or Parquet files, or a hub dataset by name.

    Field settings are dotted paths into a row (`reward_model.ground_truth`). A `preset` fills in
    the layout of a published dataset (services/data/datasets.py: PRESETS); explicit keys win over
    it. The eval file has its own settings (`eval_*`), which default to the eval preset's, then to
    the train file's.
    """

    type: Literal["file"] = "file"
    train_path: str = Field(description="JSONL or Parquet file of training prompts, or a hub dataset name.")
    eval_path: str | None = Field(None, description="Held-out file (or hub name); None = no eval.")
    preset: DatasetPreset | None = Field(
        None, description="Layout of a published dataset: dapo_math (DAPO-Math-17k: chat-list prompt, "
        "reward_model.ground_truth), math500 (problem/answer), gsm8k (question/answer after '####')."
    )
    prompt_key: str | None = Field(None, description="Dotted path of the prompt (text or chat messages); None = the preset's, else 'prompt'.")
    answer_key: str | None = Field(None, description="Dotted path of the reference answer; None = the preset's, else 'answer'.")
    answer_format: Literal["plain", "gsm8k"] | None = Field(
        None, description="plain: the field is the answer; gsm8k: the answer is what follows '####'. None = the preset's, else plain."
    )
    eval_preset: DatasetPreset | None = Field(None, description="Layout of the eval file when it differs (None = `preset`).")
    eval_prompt_key: str | None = Field(None, description="Eval file's prompt path; None = eval preset's, else the train setting.")
    eval_answer_key: str | None = Field(None, description="Eval file's answer path; None = eval preset's, else the train setting.")
    eval_answer_format: Literal["plain", "gsm8k"] | None = Field(None, description="Eval file's answer format (as answer_format).")
    split: str = Field("train", description="Split of a hub dataset named by train_path.")
    eval_split: str = Field("test", description="Split of a hub dataset named by eval_path.")
    task: str = Field("math", description="Reward-server verifier for these items.")


DataConfig = Annotated[Union[CountdownDataConfig, WordProblemDataConfig, FileDataConfig], Field(discriminator="type")]
