"""The claim verdicts: each claim_* turns the runs' numbers into (claim, verdict, numbers) rows.

A verdict is "reproduced" / "partly" / "not reproduced" (or "confirmed" / "refuted" for the
prototype claim 4); the numbers column carries what it was decided on, so a reader can check it.
Differences count only when they exceed the seed spread (mean ± spread, see runs.mean_spread).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from services.experiments.report.runs import HELD_NATS, by_target, head_value, is_held, label, mean_spread, pass_at, tail_mean
from services.loop.outputs import tracking_error

# (claim, verdict, numbers): one row of the report's Claims table and of verdicts.json
Verdict = tuple[str, str, str]

COLLAPSE_DROP = 0.30


def claim_collapse(grpo: list[dict], base_entropy: float) -> list[Verdict]:
    """1a: GRPO's entropy at the end vs the base model's, a collapse being a fall of COLLAPSE_DROP."""
    end, _, _ = mean_spread(tail_mean(r["rows"], "entropy") for r in grpo)
    if end is None or not math.isfinite(base_entropy):
        return []
    drop = 1 - end / base_entropy
    verdict = "reproduced" if drop >= COLLAPSE_DROP else "partly" if drop >= 0.1 else "not reproduced"
    return [("1a. GRPO's entropy collapses", verdict,
             f"GRPO entropy {base_entropy:.3f} → {end:.3f} ({-100 * drop:+.0f} %) over the run (collapse: a fall of at least {100 * COLLAPSE_DROP:.0f} %)")]


def claim_control(ctl_groups, abl_groups, G) -> list[Verdict]:
    """1b: the paper's rule holds every target (all seeds); 1c: each ablation holds none."""
    out = []
    targets: dict[float, list[str]] = defaultdict(list)
    for g in ctl_groups:
        if g.algorithm.get("type") != "aepo":
            continue
        for t, rs in by_target(G[g.name]).items():
            errs = [tracking_error(r["rows"], second_half=True) for r in rs]
            if t is not None and all(is_held(e) for e in errs):
                targets[t].append(f"{label(g)} ({statistics.fmean(errs):.3f})")
    all_t = sorted({t for g in ctl_groups if g.algorithm.get("type") == "aepo" for t in by_target(G[g.name]) if t is not None})
    held = [t for t in all_t if targets.get(t)]
    verdict = "reproduced" if held and len(held) == len(all_t) else "partly" if held else "not reproduced"
    detail = "; ".join(f"H*={t:g}: " + (", ".join(targets[t]) if targets.get(t) else "not held") for t in all_t)
    out.append(("1b. AEPO holds entropy at an arbitrary target (paper's rule)", verdict, detail))
    for g in abl_groups:
        errs = [(t, tracking_error(r["rows"], second_half=True)) for t, rs in by_target(G[g.name]).items() for r in rs]
        failed = all(e is not None and e > HELD_NATS for _, e in errs)
        out.append((f"1c. the ablation '{label(g).removeprefix('ablation: ')}' fails to hold entropy", "reproduced" if failed else "not reproduced",
                    ", ".join(f"H*={t:g}: error {e:.3f}" for t, e in errs if e is not None)))
    return out


def claim_table1(t1_groups, G, base_runs, ks) -> list[Verdict]:
    """2a: AEPO beats each baseline on pass@1 and pass@(largest k) by more than the larger seed
    spread; 2b: it beats the base model at the largest k."""
    aepo = next((g for g in t1_groups if g.algorithm.get("type") == "aepo"), None)
    if aepo is None:
        return []
    kmax = ks[-1]
    a_runs = G[aepo.name]
    a1, s1, _ = mean_spread(pass_at(r, 1) for r in a_runs)
    ak, sk, _ = mean_spread(pass_at(r, kmax) for r in a_runs)
    wins, ties, losses, parts = 0, 0, 0, []
    for g in t1_groups:
        if g is aepo or g.algorithm.get("type") not in ("grpo", "entropy_reg", "entropy_adv"):
            continue
        for k, (am, asp) in ((1, (a1, s1)), (kmax, (ak, sk))):
            bm, bs, _ = mean_spread(pass_at(r, k) for r in G[g.name])
            if am is None or bm is None:
                continue
            margin = am - bm
            noise = max(asp or 0, bs or 0)
            if margin > noise:
                wins += 1
            elif margin < -noise:
                losses += 1
            else:
                ties += 1
            parts.append(f"pass@{k} vs {label(g)}: {am:.3f} vs {bm:.3f}")
    out = []
    verdict = "reproduced" if wins and not ties and not losses else "partly" if wins else "not reproduced"
    out.append((f"2a. AEPO (H*={a_runs[0]['job'].target:g}) beats GRPO, Entropy-Reg, Entropy-Adv on pass@1 and pass@{kmax}",
                verdict, f"{wins} wins, {ties} within the seed spread, {losses} losses; " + "; ".join(parts)))
    if base_runs:
        bm = mean_spread(pass_at(r, kmax) for r in base_runs)[0]
        if bm is not None and ak is not None:
            v = "reproduced" if ak - bm > (sk or 0) else "partly" if ak >= bm else "not reproduced"
            out.append((f"2b. AEPO beats the base model at large k (pass@{kmax})", v, f"AEPO {ak:.3f} ± {sk or 0:.3f} vs base {bm:.3f}"))
    return out


def claim_sweep(pts, G, t1_groups) -> list[Verdict]:
    """3: pass@1 over the sweep peaks at an interior target, clear of the seed noise on both sides."""
    if len(pts) < 3:
        return []
    means = [(t, mean_spread(pass_at(r, 1) for r in rs)[0], mean_spread(pass_at(r, 1) for r in rs)[1]) for t, rs in pts]
    means = [(t, m, s) for t, m, s in means if m is not None]
    # noise: the largest seed spread of pass@1 among the Table 1 groups (or the sweep's own)
    spreads = [mean_spread(pass_at(r, 1) for r in G[g.name])[1] or 0 for g in t1_groups] + [s or 0 for _, _, s in means]
    noise = max(spreads) if spreads else 0.0
    i = max(range(len(means)), key=lambda j: means[j][1])
    t_best, m_best, _ = means[i]
    interior = 0 < i < len(means) - 1
    left, right = means[0][1], means[-1][1]
    clear = interior and m_best - left > noise and m_best - right > noise
    verdict = "reproduced" if clear else "partly" if interior else "not reproduced"
    return [("3. pass@1 rises then falls as the target grows", verdict,
             ", ".join(f"H*={t:g}: {m:.3f}" for t, m, _ in means) + f" (best {t_best:g}; seed noise ±{noise:.3f})")]


def claim_decomposition(series, grpo) -> list[Verdict]:
    """Confirmed per AEPO run when its content entropy ends where GRPO's does (within 10 %, or 0.02
    nats) and at least 80 % of its entropy difference from GRPO lies on the reward-irrelevant part."""
    aepo = [(n, rs) for n, rs in series if "H*=" in n]
    if not aepo or not grpo:
        return []
    g_start = mean_spread(head_value(r["rows"], "token_entropy", "content") for r in grpo)[0]
    g_con = mean_spread(tail_mean(r["rows"], "token_entropy", "content") for r in grpo)[0]
    g_irr = mean_spread(tail_mean(r["rows"], "token_entropy", "irrelevant") for r in grpo)[0]
    if None in (g_start, g_con, g_irr):
        return []
    parts, confirms = [], 0
    for n, rs in aepo:
        share = mean_spread(tail_mean(r["rows"], "entropy_irrelevant_share") for r in rs)[0]
        con = mean_spread(tail_mean(r["rows"], "token_entropy", "content") for r in rs)[0]
        irr = mean_spread(tail_mean(r["rows"], "token_entropy", "irrelevant") for r in rs)[0]
        if None in (share, con, irr):
            continue
        d_irr, d_con = irr - g_irr, con - g_con
        same_content = abs(d_con) <= max(0.02, 0.1 * g_con)
        on_irrelevant = abs(d_irr) >= 0.8 * abs(d_irr + d_con)
        confirms += same_content and on_irrelevant
        parts.append(f"{n}: content {con:.3f} (GRPO {g_con:.3f}), vs GRPO irrelevant {d_irr:+.3f} / content "
                     f"{d_con:+.3f}, {100 * share:.0f} % of its entropy irrelevant")
    verdict = "confirmed" if parts and confirms == len(parts) else "partly" if confirms else "refuted"
    return [("4. (prototype) AEPO moves entropy only on reward-irrelevant choices; content entropy collapses as "
             "under GRPO", verdict, f"content from {g_start:.3f} at step 0; " + "; ".join(parts))]
