"""Request and response models of the reward server's HTTP API (they define /openapi.json)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

Outcome = Literal["correct", "incorrect", "unparsable", "timeout", "error"]


class VerifyItem(BaseModel):
    """One response to score."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=512, description="Caller's id, echoed in the result.")
    task: str = Field(max_length=128, description="Verifier name, e.g. `math`, `countdown`, `numeric`, `exact`.")
    response: str = Field(description="The model's full response text (at most AEPO_REWARD_MAX_RESPONSE_CHARS, "
                          "default 200 000; longer gets 413).")
    reference: JsonValue = Field(
        description="Ground truth: a string (math/exact), a number (numeric) or an object "
        '(countdown: {"numbers": [...], "target": n, "use_all": bool}); at most AEPO_REWARD_MAX_REFERENCE_BYTES '
        "as JSON (default 64 KiB; larger gets 413)."
    )
    metadata: dict[str, JsonValue] | None = Field(
        None, description="Caller bookkeeping; ignored by the built-in verifiers and not part of the cache key. "
        "At most AEPO_REWARD_MAX_METADATA_KEYS keys and AEPO_REWARD_MAX_METADATA_BYTES as JSON (64, 16 KiB)."
    )


class VerifyRequest(BaseModel):
    """A batch of items, verified concurrently; results come back in request order."""

    model_config = ConfigDict(extra="forbid")

    items: list[VerifyItem] = Field(min_length=1, description="Items to verify.")
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Deadline, seconds from the request's arrival: an item without a verdict by then "
        "gets outcome `timeout`. Default: the server's AEPO_REWARD_DEFAULT_TIMEOUT_S.",
    )


class VerifyResult(BaseModel):
    """The verdict on one item."""

    id: str = Field(description="The item's id.")
    reward: Literal[0, 1] = Field(description="1 iff outcome is `correct`.")
    outcome: Outcome = Field(description="correct | incorrect | unparsable | timeout | error.")
    detail: str = Field(description="Why, in words (what was extracted, what failed).")
    elapsed_s: float = Field(ge=0, description="Seconds from the request's arrival until this verdict.")


class VerifyResponse(BaseModel):
    """Verdicts in the order of the request's items."""

    results: list[VerifyResult]
