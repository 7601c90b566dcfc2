"""The `hf` engine: a transformers causal LM and a batched sampling loop with a KV cache.

Why not `model.generate`: one RL step mixes temperatures (the GRPO batch at T=1, the AEPO
regularizer batch at T_reg) and `generate` has one temperature per call; its model-specific
generation_config defaults (top_k=50, repetition penalties of instruct checkpoints) would also
silently change the sampling distribution. The loop below samples every row of one padded batch
from softmax(logits / T_row), nucleus-filtered per row, with a private torch.Generator.

Speed on CPU, where a tiny model's decode step is mostly bookkeeping: the KV cache is allocated
once per batch at its final length and written in place (`PreallocatedKV`; transformers'
DynamicCache concatenates every layer's keys and values at every token, which was a quarter of
the generation time), rows that hit <eos> leave the batch, and attention is the plain matmul
("eager") kernel, faster than SDPA's for one query token over a few dozen keys. Same samples as
before for the same seed; `tests/services/rollout/test_hf_engine.py` checks it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from services.rollout.engines import EngineOutput, EngineRequest
from services.model.tiny import load_causal_lm, load_tokenizer


def sample_next_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from softmax(logits / T) restricted to the top-p nucleus; T = 0 is argmax.

    logits [R, V] (any float dtype), temperature [R], top_p [R]. The nucleus keeps the smallest
    prefix of tokens (by probability) whose mass reaches top_p, always at least the top token.
    """
    logits = logits.float()
    greedy = temperature <= 0
    probs = torch.softmax(logits / temperature.clamp_min(1e-6).unsqueeze(1), dim=-1)
    if bool((top_p < 1.0).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # mass strictly before each token; a token stays while that mass is below top_p
        before = sorted_p.cumsum(dim=-1) - sorted_p
        keep_sorted = before < top_p.unsqueeze(1)
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        probs = probs * keep
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def _prealloc_supported() -> bool:
    """Whether this transformers has the layered Cache API (5.x) `PreallocatedKV` is built on."""
    try:
        from transformers.cache_utils import Cache, DynamicLayer  # noqa: F401
    except ImportError:
        return False
    import inspect

    return "layers" in inspect.signature(Cache.__init__).parameters


def _make_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """One layer's keys and values in buffers of the batch's final length, written in place.

        `keys`/`values` are views of the first `length` positions, so everything transformers
        reads from a layer (attention, mask sizes, sequence length) sees what DynamicLayer shows.
        """

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, dk = key_states.shape
            self.kbuf = key_states.new_empty((b, h, self.capacity, dk))
            self.vbuf = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self.keys, self.values = self.kbuf[:, :, :0], self.vbuf[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, k = self.length, key_states.shape[-2]
            if n + k > self.capacity:
                raise RuntimeError(f"KV cache full: {n} + {k} positions > capacity {self.capacity}")
            self.kbuf[:, :, n : n + k] = key_states
            self.vbuf[:, :, n : n + k] = value_states
            self.length = n + k
            self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
                self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

        def reset(self) -> None:
            self.length = 0
            super().reset()

    return PreallocatedLayer


_LAYER_CLASS = None


def preallocated_cache(num_layers: int, capacity: int):
    """A transformers `Cache` whose layers hold `capacity` positions, allocated on first use."""
    global _LAYER_CLASS
    from transformers.cache_utils import Cache

    if _LAYER_CLASS is None:
        _LAYER_CLASS = _make_layer_class()
    return Cache(layers=[_LAYER_CLASS(capacity) for _ in range(num_layers)])


class HFEngine:
    """Batched sampling from an HF causal LM; every prompt × n row of a call in one padded batch
    (each distinct prompt prefilled once)."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_rows: int = 1024,
        name: str = "hf",
        attn_implementation: str | None = None,
        preallocate_kv: bool | None = None,
        share_prefill: bool = True,
    ):
        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # "auto": float32 on CPU (what the learner computes in), the checkpoint's dtype on GPU
        if dtype in (None, "auto"):
            torch_dtype = torch.float32 if self.device == "cpu" else "auto"
        else:
            torch_dtype = getattr(torch, dtype)
        # eager attention on CPU: one query token over a few dozen keys is a small matmul, and
        # SDPA's CPU kernel is slower there; on GPU SDPA's kernels win
        attn = attn_implementation or ("eager" if self.device == "cpu" else "sdpa")
        self.model = load_causal_lm(model_path, dtype=torch_dtype, device=self.device, attn_implementation=attn)
        self.model.requires_grad_(False)
        self.share_prefill = share_prefill
        self.preallocate_kv = _prealloc_supported() if preallocate_kv is None else preallocate_kv
        if self.preallocate_kv and not _prealloc_supported():
            raise ValueError("preallocate_kv needs transformers >= 5 (the layered Cache API)")
        tok = load_tokenizer(model_path)
        self.pad_id = int(tok.pad_token_id)
        self.eos_ids = _eos_ids(self.model, tok)
        self.max_batch_rows = max_batch_rows
        # finished rows leave the batch once they are 1/compact_every of it (each compaction copies the cache)
        self.compact_every = 16
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def generate(self, requests: Sequence[EngineRequest]) -> list[list[EngineOutput]]:
        """All requests' rows in batches of at most `max_batch_rows`; outputs in request order."""
        rows = [(i, req) for i, req in enumerate(requests) for _ in range(req.n)]
        outputs: list[list[EngineOutput]] = [[] for _ in requests]
        if not rows:
            return outputs
        seeds = {req.seed for req in requests if req.seed is not None}
        # A seeded call is reproducible on its own: its rows draw from a generator seeded by the
        # smallest seed given (the requests of one call share one stream, as in one batch).
        gen = torch.Generator(device=self.device).manual_seed(min(seeds)) if seeds else self.generator
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start : start + self.max_batch_rows]
            for (req_idx, _), out in zip(chunk, self._generate_rows([r for _, r in chunk], gen)):
                outputs[req_idx].append(out)
        return outputs

    @torch.inference_mode()
    def _generate_rows(self, reqs: list[EngineRequest], gen: torch.Generator) -> list[EngineOutput]:
        dev = self.device
        # Each distinct prompt is prefilled once and its cache rows repeated for its samples (n per
        # request, and the same prompt again at another temperature): the prefill of a step's rows
        # was a third of its generation time on CPU.
        if self.share_prefill:
            distinct: dict[tuple, int] = {}
            owner_rows = [distinct.setdefault(tuple(r.prompt_ids), len(distinct)) for r in reqs]
            prefill = [list(p) for p in distinct]
        else:
            owner_rows, prefill = list(range(len(reqs))), [list(r.prompt_ids) for r in reqs]
        owner = torch.tensor(owner_rows, device=dev)
        ids, mask = _left_pad(prefill, self.pad_id, dev)
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
        top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev)
        limits = torch.tensor([r.max_tokens for r in reqs], device=dev)
        eos = torch.tensor(sorted(self.eos_ids), device=dev)
        # left padding: real tokens get positions 0..len-1 whatever the padding in front of them
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = self._new_cache(ids.shape[1] + int(limits.max()))
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
        if len(prefill) < len(reqs):
            cache.batch_select_indices(owner)
        logits, mask, pos = logits[owner], mask[owner], pos[owner, -1:]
        rows = len(reqs)
        tokens = torch.full((rows, int(limits.max())), self.pad_id, dtype=torch.long, device=dev)
        stopped = torch.zeros(rows, dtype=torch.bool, device=dev)
        # `live` maps the rows still in the batch to their original index; finished rows leave the
        # batch (and the KV cache) once enough of them have piled up, so the tail of a step is not
        # spent decoding padding for rows that already hit <eos>.
        live = torch.arange(rows, device=dev)
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        for t in range(int(limits.max())):
            nxt = sample_next_tokens(logits, temps, top_p, gen)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens[live, t] = nxt
            hit_eos = torch.isin(nxt, eos) & ~done
            stopped[live] |= hit_eos
            done |= hit_eos | (limits <= t + 1)
            if bool(done.all()):
                break
            finished = int(done.sum())
            if finished and finished * self.compact_every >= len(done):  # compact: drop the finished rows
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, done, nxt = live[keep], done[keep], nxt[keep]
                temps, top_p, limits, mask, pos = temps[keep], top_p[keep], limits[keep], mask[keep], pos[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self.model(
                input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
        return _collect(tokens.tolist(), stopped.tolist(), self.eos_ids, reqs)

    def _new_cache(self, capacity: int):
        """A preallocated KV cache for `capacity` positions, or None (transformers' default) when
        disabled or when the model has layers other than full attention (sliding windows)."""
        if not self.preallocate_kv:
            return None
        text = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            return None
        return preallocated_cache(int(text.num_hidden_layers), capacity)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy an HF-named state dict into the model (dtype and device converted on the way)."""
        self.load_weight_buckets([list(weights.items())])

    def load_weight_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Copy each bucket into the model's own tensors as it comes (dtype and device converted on
        the way); a tied alias shares its storage with the weight it is tied to, so it is covered."""
        copy_into(self.model, buckets)

    def receive_weight_buckets(self, ticket) -> int:
        """The collective transport: join the weight-sync group if the ticket names a new one, then
        load each bucket as it is received (`load_weight_buckets`); returns the bytes received."""
        from services.learner.collective import SyncMember, receive_weights

        if getattr(self, "_sync_member", None) is None:
            self._sync_member = SyncMember()
        device = torch.device("cpu") if ticket.rendezvous.backend == "gloo" else torch.device(self.device)
        return receive_weights(self._sync_member, ticket, device, self.load_weight_buckets)

    def sleep(self) -> None:
        """On a GPU, move the weights to host memory (the learners need the device); on CPU nothing."""
        if self.device != "cpu" and self.model is not None:
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.device != "cpu" and self.model is not None:
            self.model.to(self.device)

    def close(self) -> None:
        """Drop the model (frees GPU memory when on CUDA) and leave the weight-sync group."""
        self.model = None
        if getattr(self, "_sync_member", None) is not None:
            self._sync_member.drop()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@torch.no_grad()
def copy_into(model, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
    """Copy (name, tensor) pairs, bucket after bucket, into the model's state-dict tensors (which
    share the parameters' storage); then every state entry must have been written, directly or
    through a tensor sharing its storage (a tied `lm_head.weight`). A wrong name or shape raises."""
    targets = model.state_dict()
    written: set[int] = set()
    unexpected = []
    for bucket in buckets:
        for name, t in bucket:
            dst = targets.get(name)
            if dst is None or tuple(dst.shape) != tuple(t.shape):
                unexpected.append(name if dst is None else f"{name} {tuple(t.shape)} != {tuple(dst.shape)}")
                continue
            dst.copy_(t)
            written.add(dst.untyped_storage().data_ptr())
    missing = [k for k, v in targets.items() if v.numel() and v.untyped_storage().data_ptr() not in written]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _eos_ids(model, tokenizer) -> set[int]:
    """Stop tokens: the generation config's eos id(s), else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    if width == 0:
        raise ValueError("empty prompt: every prompt needs at least one token (e.g. <bos>)")
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _collect(steps: list[list[int]], stopped: list[bool], eos_ids: set[int], reqs) -> list[EngineOutput]:
    """Cut each row after its first eos (kept) or at its own max_tokens."""
    outs = []
    for row, stop, req in zip(steps, stopped, reqs):
        if stop:
            end = next(i for i, tok in enumerate(row) if tok in eos_ids) + 1
            outs.append(EngineOutput(response_ids=row[:end], finish_reason="stop"))
        else:
            outs.append(EngineOutput(response_ids=row[: req.max_tokens], finish_reason="length"))
    return outs
