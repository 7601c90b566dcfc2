"""One learner rank: the FSDP2-sharded model, its AdamW and the update loop.

`LearnerWorker` is a plain class; `services/learner/group.py` runs N of them as Ray actors that
form one process group (gloo on CPU, NCCL on GPU) and gives every rank its shard of the batch.

Losses come from `services.algorithm` only. Normalisation: each micro-batch's loss is its token sum
divided by the mini-batch's global token count (all ranks, all micro-batches), and multiplied by
world_size before backward because FSDP averages gradients over ranks; so the accumulated gradient
is exactly that of the token-mean over the whole mini-batch, as in a single-process update.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from controller.client import ControllerClient, publish_entropy
from services import algorithm as alg
from services.config import AlgorithmConfig, LearnerConfig
from services.backends.network import rendezvous_port
from services.learner.batch import TrainBatch, length_order
from services.learner.fsdp import (build_fsdp_model, has_dropout, hold_full_params, load_rank_state, load_sharded, make_adamw,
                                   optimizer_step, reshard, save_rank_state, save_sharded, sync_on_last, token_ids)
from services.learner.forward import SUM_KEYS, ForwardSpec, add_sums, collect, rank_micro_batches, token_outputs
from services.learner.head import check_plain_head
from services.learner.prefix import layered_cache_supported
from services.learner.stats import entropy_stats, finish_stats
from services.learner.sync import broadcast_export, export_buckets, full_state, resolve_sync_dtype


def _publish(controller: ControllerClient, step: int | None, stats: dict) -> None:
    """Rank 0 tells the controller the step's entropy. A failure is reported in `stats`
    (`publish_error`), never raised: the other ranks are mid-update and would wait on this one in
    their next collective; the driver restores the controller and publishes again."""
    if step is None:
        raise ValueError("publishing entropy needs the step it belongs to")
    try:
        publish_entropy(controller, step, stats)
    except Exception as exc:  # noqa: BLE001
        stats["publish_error"] = f"{type(exc).__name__}: {exc}"


class LearnerWorker:
    """One data-parallel rank: the FSDP2-sharded model, its AdamW and the update loop."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        model_path: str,
        cfg: LearnerConfig,
        algorithm: AlgorithmConfig,
        seed: int = 0,
        device: str = "cpu",
    ):
        self.rank, self.world_size = rank, world_size
        self.cfg, self.algorithm, self.model_path, self.seed = cfg, algorithm, model_path, seed
        self.device = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        if device == "cpu":
            # one thread per reserved CPU: two learners sharing a core must not oversubscribe it
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.model = self.optimizer = None
        self._sync_member = None  # rank 0's place in the weight-sync group (collective transport), joined on use
        # Clip-Cov's random token choice; seeded per rank so reruns repeat
        self.generator = torch.Generator().manual_seed(seed + 1000 * rank)

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port on it (asked of rank 0 to rendezvous)."""
        import ray

        node_ip = ray.util.get_node_ip_address()
        return node_ip, rendezvous_port(node_ip)

    def pid(self) -> int:  # the chaos run kills it
        return os.getpid()

    def setup(self, master_addr: str, master_port: int, timeout_s: float = 1800.0) -> None:
        """Join the process group, load the model, shard it with FSDP2, make the optimizer."""
        from services.backends.network import join_process_group

        if master_addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback-only clusters (CI)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        join_process_group(backend, master_addr, master_port, self.rank, self.world_size, timeout_s)
        self.model = build_fsdp_model(self.model_path, self.cfg, self.device, self.seed)
        self.optimizer = make_adamw(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.irrelevant_ids = token_ids(self.model_path, self.cfg.entropy_analysis.irrelevant_tokens or [])
        # the prompt-once forward feeds a KV cache with gradients; checkpointed layers drop caches
        self._share_prefix = (self.cfg.share_prefix and not self.cfg.gradient_checkpointing and not self.cfg.remove_padding
                              and layered_cache_supported())
        self._hold = hold_full_params(self.cfg, self.device)
        if self.cfg.chunked_head:
            check_plain_head(self.model)
        self.vocab_size = int(self.model.config.vocab_size)

    def compute_info(self) -> dict[str, str]:
        """What this rank computes in: device, the decoder layers' matmul dtype (`cpu_compute`
        as resolved on this node, or FSDP's bf16 mixed precision on GPU), parameters float32."""
        from services.model.precision import resolve_cpu_compute

        layers = "bfloat16" if self.device.type == "cuda" else resolve_cpu_compute(self.cfg.cpu_compute)
        return {"device": self.device.type, "layers": layers, "params": "float32"}

    # ------------------------------------------------------------------ forward passes
    def _spec(self) -> ForwardSpec:
        return ForwardSpec(self.cfg.chunked_head, self._share_prefix, self.cfg.entropy_chunk_size, tuple(self.irrelevant_ids),
                           packed=self.cfg.remove_padding)

    def _micro_batches(self, batch: TrainBatch) -> tuple[list[TrainBatch], int]:
        return rank_micro_batches(batch, self.cfg, self.world_size, self._all_reduce)

    @torch.no_grad()
    def _score(self, batch: TrainBatch, temperature: float = 1.0, with_entropy: bool = True, all_positions: bool = False):
        """Per-token log π_T(o_t) [B, L-1] (position t predicts token t+1), exact entropy and its
        reward-irrelevant part (both None without `with_entropy`)."""
        seen: dict[str, list[torch.Tensor]] = {"logp": [], "ent": [], "irr": []}
        L = batch.tokens.shape[1]
        micro, real = self._micro_batches(batch)
        for mb in micro[:real]:
            out = token_outputs(self.model, mb, self._spec(), temperature=temperature, observe=with_entropy,
                                all_positions=all_positions)
            collect(seen, out, L)
        for mb in micro[real:]:  # a peer has more: the same forwards, so FSDP's collectives pair up
            token_outputs(self.model, mb, self._spec(), temperature=temperature, all_positions=all_positions)
        if not with_entropy:
            return torch.cat(seen["logp"]), None, None
        return tuple(torch.cat(seen[k]) for k in ("logp", "ent", "irr"))

    def compute_logprobs(self, shard: TrainBatch, temperature: float = 1.0) -> torch.Tensor:
        """log π_T(tokens[:, t] | tokens[:, <t]) as [B, L]; column 0 (nothing predicts it) is 0."""
        self.model.eval()
        logp, _, _ = self._score(shard.to(self.device), temperature, with_entropy=False, all_positions=True)
        self._reshard()
        return torch.nn.functional.pad(logp, (1, 0)).cpu()

    # ------------------------------------------------------------------ the update
    def update(self, shard: TrainBatch, step: int | None = None, controller: ControllerClient | None = None,
               levers: dict | None = None) -> dict[str, float]:
        """One RL update on this rank's shard: old log-probs, then `mini_batches` optimizer steps.

        With a `controller`, rank 0 publishes the step's entropy to it before training on it: the
        controller reads it live, from the learners (`controller.client.publish_entropy`). `levers`:
        a rival controller's decision for the step (`alg.policy_loss`)."""
        t0 = time.perf_counter()
        batch = shard.to(self.device)
        M = self.cfg.mini_batches
        if len(batch) % M:
            raise ValueError(f"shard of {len(batch)} rows does not split into {M} mini-batches; use shard_batch")
        # rows of one prompt already sit side by side (`shard_for_ranks`); without sharing them,
        # rows of like length share a micro-batch instead, to pad less
        if not self._share_prefix and self.cfg.sort_by_length:
            batch = batch.select(length_order(batch.attention_mask.sum(1), M))
        stats: dict[str, Any] = {}

        def observe(old_logp: torch.Tensor, entropy: torch.Tensor, irrelevant: torch.Tensor) -> None:
            stats.update(entropy_stats(batch, old_logp, entropy, irrelevant, analysis=self.cfg.entropy_analysis,
                                       vocab_size=self.vocab_size, has_irrelevant=bool(self.irrelevant_ids),
                                       all_reduce=self._all_reduce))
            if controller is not None and self.rank == 0:
                _publish(controller, step, stats)

        if M == 1 and self.cfg.fuse_scoring and not has_dropout(self.model):
            # On-policy: the behaviour policy is the current one, so its log-probs and entropy
            # come from the training forward (detached); the controller hears the entropy before
            # the optimizer step, exactly as with a separate scoring pass.
            self.model.train()
            totals = self._train_minibatch(batch, None, observe, levers)
        else:
            self.model.eval()  # dropout-free scoring of the behaviour policy at T=1
            old_logp, entropy, irrelevant = self._score(batch)
            observe(old_logp, entropy, irrelevant)
            self.model.train()
            per = len(batch) // M
            totals = {}
            for k in range(M):
                rows = slice(k * per, (k + 1) * per)
                step_stats = self._train_minibatch(batch.select(rows), old_logp[rows], levers=levers)
                for key, v in step_stats.items():
                    totals[key] = totals.get(key, 0.0) + v
        self._reshard()
        elapsed = time.perf_counter() - t0
        stats.update(finish_stats(totals, M, elapsed))
        return stats

    def _reshard(self) -> None:
        if self._hold or self.cfg.chunked_head:  # chunked_head: the root stays unsharded after a forward
            reshard(self.model)

    def _train_minibatch(self, batch: TrainBatch, old_logp, observe=None, levers=None) -> dict[str, float]:
        """Gradient accumulation over micro-batches, then clip + AdamW step (skipped if no tokens).

        `old_logp` None: on-policy, the behaviour log-probs are this forward's own (detached), and
        `observe(old_logp, entropy, irrelevant)` gets them, full-batch, before the optimizer step.
        """
        fused = old_logp is None
        seen: dict[str, list[torch.Tensor]] = {"logp": [], "ent": [], "irr": []}
        count = alg.loss_token_count(self.algorithm, batch.response_mask[:, 1:], batch.is_regularizer)
        normalizer = float(self._all_reduce(torch.tensor([count], dtype=torch.float64)).item())
        if normalizer == 0 and not fused:  # every rank sees the same global count, so all skip together
            return {"skipped_steps": 1.0}
        sums = dict.fromkeys(SUM_KEYS, 0.0)
        micro, real = self._micro_batches(batch)
        start = 0
        for i, mb in enumerate(micro):
            sync_on_last(self.model, i == len(micro) - 1, self._hold)
            out = token_outputs(self.model, mb, self._spec(), loss_entropy=alg.needs_entropy(self.algorithm), observe=fused)
            if fused and i < real:
                collect(seen, out, batch.tokens.shape[1])
            if normalizer > 0:
                behaviour = out.logp.detach() if fused or i >= real else old_logp[start : start + len(mb), : out.width - 1]
                st = self._backward(mb, out, behaviour, normalizer, levers)
                if i < real:
                    add_sums(sums, st, mb)
            start += len(mb)
        if fused:
            observe(*(torch.cat(seen[k]) for k in ("logp", "ent", "irr")))
            if normalizer == 0:
                self.optimizer.zero_grad(set_to_none=True)
                return {"skipped_steps": 1.0}
        return optimizer_step(self.model, self.optimizer, self.cfg.grad_clip, sums, self._all_reduce)

    def _backward(self, mb: TrainBatch, out, behaviour: torch.Tensor, normalizer: float, levers) -> dict[str, float]:
        """The micro-batch's policy loss, backward (× world_size: FSDP averages over ranks); its stats."""
        loss, st = alg.policy_loss(
            self.algorithm, logp=out.logp, old_logp=behaviour, advantages=mb.advantages,
            mask=mb.response_mask[:, 1 : out.width], is_regularizer=mb.is_regularizer,
            normalizer=normalizer, entropy=out.entropy, generator=self.generator, levers=levers,
        )
        (loss * self.world_size).backward()
        return st

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or `op`) over ranks (NCCL needs the tensor on the GPU)."""
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    # ------------------------------------------------------------------ weights and checkpoints

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded float32 weights on CPU on rank 0 (None elsewhere), every state-dict key;
        a collective: call on every rank (`services/learner/sync.py`: `full_state`)."""
        return full_state(self.model, self.cfg, self.rank)

    def full_state_dict_wire(self) -> dict | None:
        """`full_state_dict` as numpy arrays for Ray to ship zero-copy (services/backends/wire.py)."""
        from services.backends.wire import to_wire

        return to_wire(self.full_state_dict())

    def export_weights(self):
        """Weight sync: rank 0 yields the weights bucket by bucket in `cfg.sync_dtype`, then a
        manifest; a collective (services/learner/sync.py). On Ray, a streaming generator."""
        dtype = resolve_sync_dtype(self.cfg.sync_dtype, self.device, self.model_path)
        yield from export_buckets(self.model, self.cfg, self.rank, dtype)

    def export_weights_collective(self, rendezvous) -> dict | None:
        """Weight sync through the collective (`sync_transport: collective`): rank 0 broadcasts the
        buckets to the rollout engines in the group `rendezvous` names, joining it first if it is a
        new one, and returns the manifest; a collective over the learners too (the gathers)."""
        from services.learner.collective import SyncMember, node_ip

        if self._sync_member is None:
            self._sync_member = SyncMember()
        dtype = resolve_sync_dtype(self.cfg.sync_dtype, self.device, self.model_path)
        device = self.device if rendezvous.backend == "nccl" else torch.device("cpu")
        return broadcast_export(self.model, self.cfg, self.rank, dtype, self._sync_member, rendezvous,
                                node_ip(), device)

    def save_checkpoint(self, path: str) -> dict[str, int]:
        """Sharded model + optimizer state and this rank's RNGs (Clip-Cov's generator, torch's);
        returns {file name: bytes} of the files this rank wrote, fsynced, for the driver's manifest."""
        save_sharded(self.model, self.optimizer, path)
        return save_rank_state(path, self.rank, self.generator)

    def load_checkpoint(self, path: str) -> None:
        """Load what `save_checkpoint` wrote (same world size or not: DCP reshards)."""
        load_sharded(self.model, self.optimizer, path)
        load_rank_state(path, self.rank, self.generator)

    def shutdown(self) -> None:
        """Leave the process group (and the weight-sync group)."""
        if self._sync_member is not None:
            self._sync_member.drop()
        if dist.is_initialized():
            dist.destroy_process_group()
