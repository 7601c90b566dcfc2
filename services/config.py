"""Run configuration: pydantic v2 models with bounds and a description per field.

Variants are tagged unions (`algorithm: {type: aepo, ...}`), never string switches; cross-field
checks live in model validators. `services.cli.config_file.load_config(path, overrides)` reads a
YAML file; every YAML under `deploy/` is parsed by a test.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from controller.rule import BangBangRule, ConstantTarget, ControllerRule, EntroPICRule, SkyworkAdaptiveRule, TargetSchedule
from services.data.config import (CountdownDataConfig, DataConfig, DatasetPreset, FileDataConfig,  # noqa: F401 - re-exported
                                  WordProblemDataConfig)
from services.learner.config import EntropyAnalysisConfig, LearnerConfig  # noqa: F401 - re-exported
from services.model.config import ModelConfig, SmallLLMConfig, TinyModelConfig  # noqa: F401 - re-exported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- algorithms


class _PPOClip(_Strict):
    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="PPO clip ε_low: ratio floor is 1 - ε_low.")
    clip_high: float = Field(
        0.2, ge=0.0, description="PPO clip ε_high: ratio ceiling is 1 + ε_high (DAPO's clip-higher uses 0.28)."
    )
    dual_clip: float | None = Field(
        None, gt=1.0, description="Dual-clip constant c (3 in Ye et al. 2020) bounding the loss of negative advantages; None = off."
    )


class GRPOConfig(_PPOClip):
    """GRPO: group-normalised outcome advantages, PPO-clip, token-mean, no KL."""

    type: Literal["grpo"] = "grpo"


class AEPOConfig(_PPOClip):
    """AEPO: GRPO plus a REINFORCE regularizer on positives drawn at a controlled temperature."""

    type: Literal["aepo"] = "aepo"
    target: TargetSchedule = Field(
        default_factory=lambda: ConstantTarget(value=0.35),
        description="Target H*(step) of the controlled signal (controller.entropy_source), nats per token; with "
        "relative: true, multiples of that signal's first observed value.",
    )
    rule: ControllerRule = Field(default_factory=BangBangRule, description="The controller's decision rule.")
    adv_threshold: float = Field(
        0.05, ge=0.0, description="Keep regularizer samples whose group advantage exceeds this (reference: 0.05)."
    )
    coef: float = Field(
        1.0, ge=0.0, description="α, the regularizer loss coefficient (1.0 reproduces the reference, where it is implicit)."
    )
    mode: Literal["replace", "append"] = Field(
        "replace",
        description="replace: the m positives replace the first m GRPO sequences (reference); append: added on top.",
    )
    prompt_share: float = Field(
        0.25, gt=0.0, le=1.0, description="Share of the step's prompts the regularizer batch is drawn from (reference: 1/4)."
    )

    def regularizer_temperatures(self) -> tuple[float, float]:
        return self.rule.temperature_up, self.rule.temperature_down


class AEPOFixedTemperatureConfig(AEPOConfig):
    """Ablation (paper Table 3): the regularizer batch is drawn at T = 1 whatever the entropy."""

    type: Literal["aepo_t1"] = "aepo_t1"  # type: ignore[assignment]

    @model_validator(mode="after")
    def _force_t1(self) -> "AEPOFixedTemperatureConfig":
        if self.rule.temperature_up != 1.0 or self.rule.temperature_down != 1.0:
            self.rule = self.rule.model_copy(update={"temperature_up": 1.0, "temperature_down": 1.0})
        return self


class AEPOSignedConfig(AEPOConfig):
    """Ablation (paper Table 3): regularizer samples keep their signed group advantages; negatives are not filtered."""

    type: Literal["aepo_signed"] = "aepo_signed"  # type: ignore[assignment]


class EntropyRegConfig(_PPOClip):
    """Entropy bonus: maximise J + β·H̄ with H̄ the exact token-mean entropy (gradient flows through it)."""

    type: Literal["entropy_reg"] = "entropy_reg"
    beta: float = Field(0.015, ge=0.0, description="Entropy bonus coefficient β (paper baseline: 0.015).")


class EntropyAdvConfig(_PPOClip):
    """Entropy-based advantage (Cheng et al. 2025): Â_t = A_t + min(α·H_t.detach(), |A_t|/κ)."""

    type: Literal["entropy_adv"] = "entropy_adv"
    alpha: float = Field(0.4, ge=0.0, description="α, scale of the entropy term (paper baseline: 0.4).")
    kappa: float = Field(2.0, gt=0.0, description="κ, the term is capped at |A_t|/κ (paper baseline: 2).")


class ClipCovConfig(_PPOClip):
    """Clip-Cov (Cui et al. 2025): detach a random clip_ratio share of tokens whose centred cov(logπ, A) is in (lb, ub)."""

    type: Literal["clip_cov"] = "clip_cov"
    clip_ratio: float = Field(2e-4, gt=0.0, le=1.0, description="Share of response tokens whose gradient is cut.")
    cov_lb: float = Field(1.0, description="Lower covariance bound of the candidate tokens.")
    cov_ub: float = Field(5.0, description="Upper covariance bound of the candidate tokens.")

    @model_validator(mode="after")
    def _bounds(self) -> "ClipCovConfig":
        if self.cov_ub <= self.cov_lb:
            raise ValueError(f"clip_cov needs cov_ub > cov_lb, got lb={self.cov_lb}, ub={self.cov_ub}")
        return self


class KLCovConfig(_PPOClip):
    """KL-Cov (Cui et al. 2025): |log π − log π_old| penalty on the top kl_ratio share of tokens by cov(logπ, A)."""

    type: Literal["kl_cov"] = "kl_cov"
    kl_ratio: float = Field(2e-3, gt=0.0, le=1.0, description="Share of response tokens that get the KL penalty.")
    kl_coef: float = Field(1.0, ge=0.0, description="Coefficient of the |log-ratio| penalty on those tokens.")


def _target_field():
    return Field(
        default_factory=lambda: ConstantTarget(value=0.35),
        description="Target H*(step) of the controlled signal (controller.entropy_source), nats per token; with "
        "relative: true, multiples of that signal's first observed value.",
    )


class AdaptiveEntropyConfig(_PPOClip):
    """GRPO plus Skywork-OR1's adaptive entropy bonus: the controller raises the bonus coefficient
    while the controlled entropy is below H* and lowers it above (one-sided: no bonus above H*)."""

    type: Literal["adaptive_entropy"] = "adaptive_entropy"
    target: TargetSchedule = _target_field()
    rule: SkyworkAdaptiveRule = Field(default_factory=SkyworkAdaptiveRule, description="The coefficient's ramp.")


class EntroPICConfig(_PPOClip):
    """GRPO plus EntroPIC: the controller's PI law reweights the policy-gradient term of confident
    tokens, positives by 1 + α and negatives by 1 − α (α < 0 below H* raises entropy)."""

    type: Literal["entropic"] = "entropic"
    target: TargetSchedule = _target_field()
    rule: EntroPICRule = Field(default_factory=EntroPICRule, description="The PI law and the confidence threshold.")


AlgorithmConfig = Annotated[
    Union[
        GRPOConfig,
        AEPOConfig,
        AEPOFixedTemperatureConfig,
        AEPOSignedConfig,
        EntropyRegConfig,
        EntropyAdvConfig,
        ClipCovConfig,
        KLCovConfig,
        AdaptiveEntropyConfig,
        EntroPICConfig,
    ],
    Field(discriminator="type"),
]

AEPO_TYPES = (AEPOConfig,)  # the ablations subclass AEPOConfig, so isinstance covers them
# the algorithms with an entropy target, whose controller decides something every step: AEPO's
# regularizer plan, or a rival's levers on the loss
CONTROLLED_TYPES = (AEPOConfig, AdaptiveEntropyConfig, EntroPICConfig)
RIVAL_TYPES = (AdaptiveEntropyConfig, EntroPICConfig)


# --------------------------------------------------------------------------- system sections


class RolloutConfig(_Strict):
    """Rollout generation: engine, group size, lengths, actors and their resources."""

    engine: Literal["hf", "vllm", "vllm-cpu"] = Field("hf", description="Generation engine adapter.")
    num_actors: int = Field(1, ge=1, description="Rollout actors (each holds one engine).")
    group_size: int = Field(8, ge=2, description="G: samples per prompt; advantages are normalised within a group.")
    max_tokens: int = Field(24, ge=1, description="Longest response, in tokens.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens as the run encodes it (chat template included); at start "
        "every train and eval prompt is measured against it. None = the longest measured prompt."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling; 1.0 = off (the theory assumes it off).")
    gpu_memory_utilization: float = Field(
        0.05, gt=0.0, le=1.0, description="vLLM's memory reservation share (keep low on CPU: it reserves RAM)."
    )
    cpus_per_actor: float = Field(1.0, gt=0.0, description="Ray CPUs reserved by each rollout actor (fractions allowed).")
    torch_threads: int | None = Field(
        None, ge=1,
        description="CPU engines: torch threads per rollout actor (None = the CPUs it reserves). Generation and the "
        "learner update never overlap, so on a small machine the engine may use every core while it generates.",
    )
    gpus_per_actor: float | None = Field(
        None, ge=0.0, description="Ray GPUs per rollout actor (split placement); None = 1 for engine 'vllm', else 0. "
        "Ray 2.60 leaves every GPU visible to an actor that reserves none: an hf engine with 0 still finds one."
    )
    placement: Literal["split", "colocated"] = Field(
        "split", description="split: rollout actors reserve their own GPUs (gpus_per_actor) beside the learners'; "
        "colocated: each rollout actor shares one learner rank's GPU, in one placement group of the run "
        "(services/backends/placement.py), and its engine sleeps while the learners train (vLLM's sleep mode, level "
        "1: weights to host memory, KV cache freed). Needs num_actors <= learner.num_workers.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine weights dtype; auto = float32 on CPU, the checkpoint's dtype on GPU."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + response in tokens, for every engine (vLLM sizes its KV cache by "
        "it). At start the longest prompt (or max_prompt_tokens) + max_tokens must fit it and it must fit the model's "
        "max_position_embeddings (services/model/context.py). None = max_position_embeddings."
    )
    enforce_eager: bool | None = Field(
        None, description="vLLM without graph capture/compilation; None = on for vllm-cpu, off for vllm."
    )
    max_batch_rows: int = Field(1024, ge=1, description="hf engine: most rows (prompts x n) per padded batch.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each rollout actor requests, e.g. {node_a: 1} to place "
        "it on the nodes started with that resource (`ray start --resources`); empty = anywhere.",
    )

    @model_validator(mode="after")
    def _lengths(self) -> "RolloutConfig":
        if self.max_prompt_tokens and self.max_model_len and self.max_prompt_tokens + self.max_tokens > self.max_model_len:
            raise ValueError(f"rollout.max_prompt_tokens {self.max_prompt_tokens} + max_tokens {self.max_tokens} = "
                             f"{self.max_prompt_tokens + self.max_tokens} tokens > max_model_len {self.max_model_len}")
        return self


class RewardConfig(_Strict):
    """Where rewards come from: the reward server on Ray Serve, a local process, or an external URL."""

    mode: Literal["serve", "standalone", "external"] = Field(
        "serve", description="serve: Ray Serve in the job's cluster; standalone: a local uvicorn process; external: `url`."
    )
    url: str | None = Field(None, description="Base URL of an external reward server.")
    replicas: int = Field(1, ge=1, description="Serve replicas.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each reward replica actor requests, e.g. {node_a: 1} to place "
        "it on the nodes started with that resource (`ray start --resources`); empty = anywhere.",
    )
    timeout_s: float = Field(10.0, gt=0.0, description="Per-item verification deadline, seconds.")
    # A timeout or error is the server's failure, not the answer's: a 0 would bias its group's advantages.
    on_failure: Literal["mask", "zero"] = Field(
        "mask", description="An item still `timeout`/`error` after one re-verification: mask = left out of the update "
        "and of its group's advantage statistics; zero = trained on as reward 0 (the old behaviour).",
    )
    max_failure_share: float = Field(
        0.2, ge=0.0, le=1.0, description="Stop the run (RewardFailureError) when more than this share of a step's "
        "items still fail after the re-verification; 1.0 never stops.",
    )

    @model_validator(mode="after")
    def _url(self) -> "RewardConfig":
        if self.mode == "external" and not self.url:
            raise ValueError("reward.mode 'external' needs reward.url")
        return self


class ControllerConfig(_Strict):
    """The entropy controller actor: its name, the signal it controls, optional Redis state."""

    entropy_source: Literal["exact", "sampled", "content", "forking"] = Field(
        "exact",
        description="The signal the target applies to. exact: full-vocabulary token-mean entropy at T=1 of the GRPO "
        "batch; sampled: mean −log π(o_t) over the mixed update batch (the reference's signal); content: exact minus "
        "the choice of reward-irrelevant tokens (needs learner.entropy_analysis.irrelevant_tokens); forking: mean "
        "exact entropy of the top forking_share (20 %) highest-entropy GRPO tokens.",
    )
    redis_url: str | None = Field(None, description="Persist controller state in Redis; None = in memory.")
    name: str = Field("aepo-entropy-controller", description="Name of the controller's Ray actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources each controller actor requests, e.g. {node_a: 1} to place "
        "it on the nodes started with that resource (`ray start --resources`); empty = anywhere.",
    )


class TrainerConfig(_Strict):
    """The loop: steps, prompts per step, eval and checkpoint cadence, outputs, metrics endpoint."""

    steps: int = Field(150, ge=0, description="RL steps (0 = evaluate the initial model only).")
    prompts_per_step: int = Field(32, ge=1, description="B: prompts per step (the GRPO batch is B × G).")
    eval_every: int = Field(50, ge=0, description="Eval every K steps (0 = only at the end).")
    eval_samples: int = Field(8, ge=1, description="Samples per held-out prompt for avg@k / pass@k.")
    eval_prompts: int | None = Field(None, ge=1, description="Held-out prompts used per eval (None = all).")
    eval_temperature: float = Field(0.6, gt=0.0, le=2.0, description="Temperature of avg@k (pass@k is always at T=1).")
    final_eval_samples: int | None = Field(
        None, ge=1, description="Samples per prompt at the last eval (pass@k up to this k); None = eval_samples."
    )
    final_eval_prompts: int | None = Field(None, ge=1, description="Held-out prompts at the last eval; None = eval_prompts.")
    save_every: int = Field(10, ge=0, description="Checkpoint every K steps (0 = only by time, and at the end).")
    save_every_seconds: float = Field(
        1800.0, ge=0.0, description="Also checkpoint once this long has passed since the last one (0 = by steps only)."
    )
    seed: int = Field(0, description="Seed for data order, sampling and init.")
    output_dir: str = Field("runs/default", description="Where metrics.jsonl, summary.json, plots and checkpoints go.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Serve the run's Prometheus metrics on 127.0.0.1:PORT (0 = off; the cluster recipe uses 9400)."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the metrics endpoint binds (0.0.0.0 inside a container or pod, so Prometheus can reach it)."
    )
    log_samples: int = Field(
        4, ge=0, description="Per step, write this many GRPO samples and every kept regularizer sample to samples.jsonl (0 = none)."
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept on disk (oldest deleted first); with 2 or more, resume falls back to "
        "the previous one when the newest is damaged."
    )
    loggers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Experiment loggers beside metrics.jsonl: tensorboard (event files in "
        "output_dir/tensorboard), wandb (offline mode, output_dir/wandb)."
    )
    export_policy: bool = Field(
        True, description="At the end, write the trained policy to `output_dir/policy` as a checkpoint directory "
        "(config, safetensors weights, generation config, tokenizer) that transformers and vLLM load."
    )


class WarmStartSettings(_Strict):
    """Supervised warm start of the embedded tiny model on the toy task (skipped for `model.path`)."""

    steps: int = Field(500, ge=0, description="SFT optimizer steps (0 = start RL from random init).")
    batch_size: int = Field(256, ge=1, description="Global SFT batch.")
    lr: float = Field(1e-3, gt=0.0, description="SFT AdamW learning rate.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (gloo).")
    seed: int = Field(0, description="Seed of the SFT data order.")
    cpu_compute: Literal["float32", "bfloat16", "auto"] = Field(
        "float32",
        description="On CPU, the dtype of the decoder layers' matmuls: bfloat16 runs each layer under torch.autocast "
        "(weights, optimizer, residual stream, head, losses and entropies stay float32); auto = bfloat16 where the "
        "CPU has AMX-BF16 (several times the float32 matmul speed), else float32. Ignored on GPU.",
    )


class RecoveryConfig(_Strict):
    """Timeouts on every remote wait, and how often a run may rebuild a role before it stops."""

    max_recoveries: int = Field(
        3, ge=0, description="In-run recoveries allowed per role (a rebuilt role and a rollback to the latest checkpoint); "
        "one more failure of that role stops the run (resume it with --resume)."
    )
    start_timeout_s: float = Field(600.0, gt=0, description="Actors ready, placement groups placed, process groups formed.")
    rollout_timeout_s: float = Field(1800.0, gt=0, description="One generation call (a step's batches, or an eval).")
    learner_timeout_s: float = Field(1800.0, gt=0, description="One update, checkpoint save or load on the learners.")
    sync_timeout_s: float = Field(600.0, gt=0, description="One weight sync: gather on the learners, load on the engines.")
    controller_timeout_s: float = Field(120.0, gt=0, description="One call to the entropy controller.")
    collective_timeout_s: float = Field(
        1800.0, gt=0, description="torch.distributed's timeout on the learners' collectives (a rank stuck on a dead peer)."
    )
    watchdog_s: float = Field(
        300.0, gt=0, description="Log which role a step is waiting on once it has waited this long, and every interval after."
    )


class TrainConfig(_Strict):
    """One RL run."""

    run_name: str = Field("aepo", min_length=1, description="Run id; a label on every metric.")
    algorithm: AlgorithmConfig = Field(default_factory=AEPOConfig, description="The policy-optimisation variant.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=CountdownDataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    warm_start: WarmStartSettings = Field(default_factory=WarmStartSettings)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)

    @model_validator(mode="after")
    def _model_fits_task(self) -> "TrainConfig":
        if self.model.path is None and self.data.type == "wordproblems":
            if self.model.builtin != "small_llm":
                raise ValueError("data.type wordproblems needs a model with letters in its vocabulary: set "
                                 "model.builtin: small_llm (the tiny model's characters are digits and operators)")
            if not self.model.chat_template:
                raise ValueError("data.type wordproblems with the built-in small LLM: set model.chat_template: true "
                                 "(the warm start teaches answers to chat-templated questions)")
        return self

    @model_validator(mode="after")
    def _colocated_fits(self) -> "TrainConfig":
        if self.rollout.placement == "colocated" and self.rollout.num_actors > self.learner.num_workers:
            raise ValueError(f"rollout.placement colocated puts each rollout actor on a learner rank's GPU: "
                             f"rollout.num_actors {self.rollout.num_actors} > learner.num_workers "
                             f"{self.learner.num_workers}; use at most {self.learner.num_workers} actors or split")
        return self

    @model_validator(mode="after")
    def _controlled_entropy_is_measured(self) -> "TrainConfig":
        if self.controller.entropy_source == "content" and not learner_config(self).entropy_analysis.irrelevant_tokens:
            why = ("learner.entropy_analysis.irrelevant_tokens is empty" if self.learner.entropy_analysis.irrelevant_tokens
                   is not None else f"data.type {self.data.type!r} has none by default")
            raise ValueError(
                "controller.entropy_source 'content' is not measured in this run: it is the entropy left after the "
                f"choice of reward-irrelevant tokens, and {why}. Set learner.entropy_analysis.irrelevant_tokens "
                "(single tokens of the vocabulary), or control exact, sampled or forking (forking needs no token set)")
        return self


def learner_config(cfg: TrainConfig) -> LearnerConfig:
    """The learner settings with the task's defaults filled in: the countdown toy's reward ignores
    spaces, so its entropy analysis splits off the space choice unless told otherwise."""
    ea = cfg.learner.entropy_analysis
    if ea.irrelevant_tokens is None:
        tokens = [" "] if cfg.data.type == "countdown" else []
        ea = ea.model_copy(update={"irrelevant_tokens": tokens})
    return cfg.learner.model_copy(update={"entropy_analysis": ea})
