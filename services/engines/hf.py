"""The `hf` engine: a transformers causal LM and a batched sampling loop with a KV cache.

Why not `model.generate`: one RL step mixes temperatures (the GRPO batch at T=1, the AEPO
regularizer batch at T_reg) and `generate` has one temperature per call; its model-specific
generation_config defaults (top_k=50, repetition penalties of instruct checkpoints) would also
silently change the sampling distribution. The loop below samples every row of one padded batch
from softmax(logits / T_row), nucleus-filtered per row, with a private torch.Generator.
"""

from __future__ import annotations

from typing import Sequence

import torch

from services.engines import EngineOutput, EngineRequest
from services.model import load_causal_lm, load_tokenizer


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


class HFEngine:
    """Batched sampling from an HF causal LM; every prompt × n row of a call in one padded batch."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_rows: int = 1024,
        name: str = "hf",
    ):
        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # "auto": float32 on CPU (what the learner computes in), the checkpoint's dtype on GPU
        if dtype in (None, "auto"):
            torch_dtype = torch.float32 if self.device == "cpu" else "auto"
        else:
            torch_dtype = getattr(torch, dtype)
        self.model = load_causal_lm(model_path, dtype=torch_dtype, device=self.device)
        self.model.requires_grad_(False)
        tok = load_tokenizer(model_path)
        self.pad_id = int(tok.pad_token_id)
        self.eos_ids = _eos_ids(self.model, tok)
        self.max_batch_rows = max_batch_rows
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
        ids, mask = _left_pad([list(r.prompt_ids) for r in reqs], self.pad_id, dev)
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
        top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev)
        limits = torch.tensor([r.max_tokens for r in reqs], device=dev)
        eos = torch.tensor(sorted(self.eos_ids), device=dev)
        # left padding: real tokens get positions 0..len-1 whatever the padding in front of them
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        pos = pos[:, -1:]
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
            if finished and finished * 16 >= len(done):  # compact: drop the finished rows
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

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy an HF-named state dict into the model (dtype and device converted on the way)."""
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
        missing = [k for k in missing if not (k in tied and self.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def close(self) -> None:
        """Drop the model (frees GPU memory when on CUDA)."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
