"""The run's Prometheus metrics: one catalogue, one exporter in the driver process.

Why the driver exports (rather than each actor through ray.util.metrics): every training metric
is a per-step fact that the driver already gathers into the step's row of metrics.jsonl; one
exporter publishes exactly that row, so Prometheus and the metrics file agree step for step.
ray.util.metrics would rename every series `ray_aepo_*`, aggregate per worker, and publish on the
metrics agent's interval, several steps late. The reward server exports its own metrics
(`reward_server`); dashboards and alert rules may use only names listed in `CATALOGUE` plus the
reward server's (`REWARD_SERVER_METRICS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: name, kind, help text, labels, and the metrics-row field it reads."""

    name: str  # the exposed name (counters end in _total)
    kind: Kind
    help: str
    labels: tuple[str, ...] = ("run_id",)


CATALOGUE: tuple[MetricSpec, ...] = (
    MetricSpec("aepo_step", "gauge", "Last finished RL step."),
    MetricSpec("aepo_steps_total", "counter", "RL steps finished by this process."),
    MetricSpec("aepo_policy_version", "gauge", "Policy version the rollout engines generate with."),
    MetricSpec("aepo_policy_entropy", "gauge", "Token-mean policy entropy at T=1 of the GRPO batch, nats.", ("run_id", "source")),
    MetricSpec("aepo_entropy_target", "gauge", "Target entropy H* this step (of the controlled signal), nats."),
    MetricSpec(
        "aepo_entropy_controlled", "gauge",
        "The signal the controller holds at H* (controller.entropy_source: exact | sampled | content | forking), nats.",
        ("run_id", "source"),
    ),
    MetricSpec("aepo_regularizer_temperature", "gauge", "Temperature the regularizer batch was drawn at."),
    MetricSpec("aepo_regularizer_max_selected", "gauge", "Most regularizer positives the controller allowed this step."),
    MetricSpec("aepo_regularizer_selected", "gauge", "Regularizer positives kept this step."),
    MetricSpec("aepo_regularizer_weight", "gauge", "Advantage weight of the regularizer positives (1 = the paper's rule; the PI rule's |u|)."),
    MetricSpec("aepo_entropy_coef", "gauge", "Entropy-bonus coefficient a rival rule applied this step (adaptive_entropy)."),
    MetricSpec("aepo_confident_token_weight", "gauge", "Weight of confident tokens' policy-gradient term this step "
               "(entropic), by advantage sign.", ("run_id", "sign")),
    MetricSpec("aepo_controller_decisions_total", "counter", "Controller decisions by direction.", ("run_id", "direction")),
    MetricSpec("aepo_reward_mean", "gauge", "Mean reward per batch kind.", ("run_id", "batch_kind")),
    MetricSpec("aepo_accuracy", "gauge", "Share of correct samples per batch kind.", ("run_id", "batch_kind")),
    MetricSpec("aepo_eval_avg_at_k", "gauge", "Held-out avg@k at low temperature.", ("run_id", "k")),
    MetricSpec("aepo_eval_pass_at_k", "gauge", "Held-out pass@k at T=1 (unbiased estimator).", ("run_id", "k")),
    MetricSpec("aepo_rollout_tokens_per_second", "gauge", "Generated tokens per second this step."),
    MetricSpec("aepo_response_length_mean", "gauge", "Mean response length in tokens (both batches) this step."),
    MetricSpec("aepo_truncation_rate", "gauge", "Share of responses cut at rollout.max_tokens (finish reason 'length') this step."),
    MetricSpec("aepo_learner_tokens_per_second", "gauge", "Learner forward+backward tokens per second this step."),
    MetricSpec("aepo_weight_sync_seconds", "gauge", "Seconds to push new weights to the rollout engines."),
    MetricSpec("aepo_step_seconds", "gauge", "Wall seconds of the last step."),
    MetricSpec("aepo_phase_seconds", "gauge", "Wall seconds of each phase of the last step.", ("run_id", "phase")),
    MetricSpec(
        "aepo_reward_failures_total", "counter",
        "Samples whose verification still timed out or errored after one re-verification.", ("run_id", "outcome"),
    ),
    MetricSpec("aepo_reward_reverified_total", "counter", "Samples verified a second time after a timeout or error."),
    MetricSpec(
        "aepo_reward_masked_total", "counter",
        "Samples left out of the update and of their group's advantage statistics for want of a verdict.",
    ),
    MetricSpec(
        "aepo_token_entropy", "gauge",
        "Token-mean entropy at T=1 of the GRPO batch by kind: irrelevant + content = the mean (the reward-ignored "
        "choice vs the rest); forking / nonforking = the top-20 % highest-entropy tokens vs the others.",
        ("run_id", "kind"),
    ),
    MetricSpec(
        "aepo_token_entropy_share", "gauge",
        "Fraction of the GRPO batch's entropy on reward-irrelevant choices (kind=irrelevant) or on forking tokens (kind=forking).",
        ("run_id", "kind"),
    ),
    MetricSpec(
        "aepo_token_entropy_by_position", "gauge",
        "Mean entropy at T=1 of GRPO response tokens by position bucket (0 = first response token).",
        ("run_id", "position"),
    ),
)

REWARD_SERVER_METRICS: tuple[str, ...] = (
    "aepo_reward_requests_total",
    "aepo_reward_items_total",
    "aepo_reward_verify_seconds",
    "aepo_reward_inflight",
    "aepo_reward_worker_restarts_total",
)


def exported_names() -> set[str]:
    """Every series name a scrape can show (histograms expand to _bucket/_sum/_count)."""
    names = {m.name for m in CATALOGUE} | set(REWARD_SERVER_METRICS)
    names |= {f"aepo_reward_verify_seconds_{s}" for s in ("bucket", "sum", "count")}
    return names


class RunMetrics:
    """prometheus_client gauges/counters for one run, served on 127.0.0.1:port (0 = not served)."""

    def __init__(self, run_id: str, port: int = 0, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.run_id = run_id
        self.registry = CollectorRegistry()
        self._m = {}
        for spec in CATALOGUE:
            cls = Counter if spec.kind == "counter" else Gauge
            # prometheus_client appends _total to counters itself
            name = spec.name[: -len("_total")] if spec.kind == "counter" else spec.name
            self._m[spec.name] = cls(name, spec.help, spec.labels, registry=self.registry)
        self.port = None
        self._server = None
        if port:
            from prometheus_client import start_http_server

            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            self.port = port

    def set(self, name: str, value: float, **labels: str) -> None:
        self._m[name].labels(run_id=self.run_id, **labels).set(value)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._m[name].labels(run_id=self.run_id, **labels).inc(value)

    def record_step(self, row: dict) -> None:
        """Publish one metrics.jsonl row (the driver's per-step record)."""
        self.set("aepo_step", row["step"])
        self.inc("aepo_steps_total")
        self.set("aepo_policy_version", row["policy_version"])
        for source in ("exact", "sampled"):
            key = "entropy" if source == "exact" else "entropy_sampled"
            if row.get(key) is not None:
                self.set("aepo_policy_entropy", row[key], source=source)
        if row.get("entropy_controlled") is not None:
            self.set("aepo_entropy_controlled", row["entropy_controlled"], source=row.get("entropy_source") or "exact")
        optional = {
            "entropy_target": "aepo_entropy_target",
            "reg_temperature": "aepo_regularizer_temperature",
            "reg_m": "aepo_regularizer_max_selected",
            "reg_selected": "aepo_regularizer_selected",
            "reg_weight": "aepo_regularizer_weight",
            "entropy_coef": "aepo_entropy_coef",
            "rollout_tokens_per_s": "aepo_rollout_tokens_per_second",
            "response_length_mean": "aepo_response_length_mean",
            "truncation_rate": "aepo_truncation_rate",
            "learner_tokens_per_s": "aepo_learner_tokens_per_second",
            "weight_sync_seconds": "aepo_weight_sync_seconds",
            "step_seconds": "aepo_step_seconds",
        }
        for key, name in optional.items():
            if row.get(key) is not None:
                self.set(name, row[key])
        for sign in ("positive", "negative"):
            if row.get(f"{sign}_weight") is not None:
                self.set("aepo_confident_token_weight", row[f"{sign}_weight"], sign=sign)
        if row.get("reg_direction"):
            self.inc("aepo_controller_decisions_total", direction=row["reg_direction"])
        for kind in ("grpo", "regularizer"):
            if row.get(f"reward_mean_{kind}") is not None:
                self.set("aepo_reward_mean", row[f"reward_mean_{kind}"], batch_kind=kind)
                self.set("aepo_accuracy", row[f"accuracy_{kind}"], batch_kind=kind)
        for phase, seconds in (row.get("time") or {}).items():
            self.set("aepo_phase_seconds", seconds, phase=phase)
        for outcome, n in (row.get("reward_failures") or {}).items():
            if n:
                self.inc("aepo_reward_failures_total", n, outcome=outcome)
        for key, name in (("reward_reverified", "aepo_reward_reverified_total"), ("reward_masked", "aepo_reward_masked_total")):
            if row.get(key):
                self.inc(name, row[key])
        for kind, value in (row.get("token_entropy") or {}).items():
            if value is not None:
                self.set("aepo_token_entropy", value, kind=kind)
        for kind in ("irrelevant", "forking"):
            if row.get(f"entropy_{kind}_share") is not None:
                self.set("aepo_token_entropy_share", row[f"entropy_{kind}_share"], kind=kind)
        for pos, value in enumerate(row.get("entropy_by_position") or []):
            if value is not None:
                self.set("aepo_token_entropy_by_position", value, position=str(pos))
        for key, value in row.items():
            if key.startswith("eval_avg@"):
                self.set("aepo_eval_avg_at_k", value, k=key.split("@")[1])
            elif key.startswith("eval_pass@"):
                self.set("aepo_eval_pass_at_k", value, k=key.split("@")[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
