"""Scores of a batch of samples under the known law, and the honest "NFE to match" headline.

- NLL excess: the law's exact -log p(x) / L of each sample minus the law's entropy per token H(X_1..L) / L. For a
  perfect sampler its expectation is 0. It is E_q[-log p] / L - H(p) / L = (H(q) + KL(q || p) - H(p)) / L, so a
  sampler that loses diversity (H(q) < H(p)) can score below 0: read it beside the bigram KL, which sees that.
  Samples with p(x) = 0 (an impossible token pair, or an impossible first token) have an infinite NLL: they are
  counted apart (their share is reported) and the mean and median are taken over the possible samples only.
- Bigram KL: KL(q_hat || p2) between the samples' empirical position-averaged pair distribution q_hat and the
  law's exact one p2, in nats. Pairs the law cannot produce (p2 = 0) are counted apart (their share of all pairs
  is reported) and q_hat is renormalized over the law's support, so the KL is finite; no epsilon is added (terms
  with q_hat = 0 are 0). The plug-in estimate is biased upward by about (support size - 1) / (2 * number of pairs),
  so the same statistic of as many fresh TRUE law samples is reported as its floor.
"""

from __future__ import annotations

import math

import torch

from .law import HiddenMarkovLaw


def nll_scores(law: HiddenMarkovLaw, tokens: torch.LongTensor, entropy_per_token: float) -> dict:
    """The true law's NLL per token of each sample, summarized over the possible samples, impossible ones apart."""
    length = tokens.shape[1]
    nll = -law.log_prob(tokens) / length
    possible = torch.isfinite(nll)
    kept = nll[possible]
    count = int(possible.sum())
    summary = {
        "num_samples": len(tokens),
        "impossible_share": 1.0 - count / len(tokens),
        "num_possible": count,
        "nll_mean": None,
        "nll_median": None,
        "nll_excess_mean": None,
        "nll_excess_median": None,
        "nll_standard_error": None,
    }
    if count:
        mean = float(kept.mean())
        summary.update(
            nll_mean=mean,
            nll_median=float(kept.median()),
            nll_excess_mean=mean - entropy_per_token,
            nll_excess_median=float(kept.median()) - entropy_per_token,
            nll_standard_error=float(kept.std() / math.sqrt(count)) if count > 1 else None,
        )
    return summary


def bigram_counts(tokens: torch.LongTensor, vocab_size: int) -> torch.Tensor:
    """`[V, V]` counts of the adjacent pairs (x_t, x_t+1) over every row and position."""
    pairs = tokens[:, :-1] * vocab_size + tokens[:, 1:]
    return torch.bincount(pairs.flatten(), minlength=vocab_size * vocab_size).view(vocab_size, vocab_size).double()


def bigram_kl(tokens: torch.LongTensor, exact_pairs: torch.Tensor) -> dict:
    """KL(q_hat || p2) restricted to the law's pair support, and the share of pairs outside it (see the module doc)."""
    counts = bigram_counts(tokens, exact_pairs.shape[0])
    support = exact_pairs > 0
    total = counts.sum()
    inside = counts[support].sum()
    result = {"impossible_pair_share": float(1.0 - inside / total), "bigram_kl": None}
    if inside > 0:
        q = counts[support] / inside
        p = exact_pairs[support] / exact_pairs[support].sum()
        seen = q > 0
        result["bigram_kl"] = float((q[seen] * (q[seen].log() - p[seen].log())).sum())
    return result


def distinct_share(tokens: torch.LongTensor) -> float:
    """Share of distinct rows: a collapsed sampler repeats itself (fresh law samples of L = 32 are all distinct)."""
    return len({tuple(row) for row in tokens.tolist()}) / len(tokens)


def score_samples(law: HiddenMarkovLaw, tokens: torch.LongTensor, entropy_per_token: float, exact_pairs) -> dict:
    return {
        **nll_scores(law, tokens, entropy_per_token),
        **bigram_kl(tokens, exact_pairs),
        "distinct_share": distinct_share(tokens),
    }


# ----------------------------------------------------------------------------------------------------------------
# The headline: NFE the candidate needs to match the baseline, with the seed-to-seed noise floor
# ----------------------------------------------------------------------------------------------------------------


def _by_steps(rows: list[dict], metric: str) -> dict[int, dict[int, dict]]:
    table: dict[int, dict[int, dict]] = {}
    for row in rows:
        if row.get(metric) is not None:
            table.setdefault(row["num_steps"], {})[row["seed"]] = row
    return table


def nfe_to_match(baseline_rows: list[dict], candidate_rows: list[dict], metric: str, standard_error_key: str | None = None):
    """For every step budget of the baseline: the NFE the candidate needs to reach the baseline's seed-mean value of
    `metric` (lower is better), from the candidate's seed-mean curve, and the range over seed pairs.

    Noise floor at a budget T: the larger seed-to-seed range of the two arms at T (and, for a mean, twice the
    combined standard error of the two seed means, if larger). When the candidate's value at the same T lies within
    that floor of the baseline's, the entry says "no separation" and no ratio is given: the curves do not differ
    measurably there. A ratio is given only where the curves separate.
    """
    from dsl_diffusion.evaluation.plots import Curve, nfe_to_reach

    baseline, candidate = _by_steps(baseline_rows, metric), _by_steps(candidate_rows, metric)
    seeds = sorted(set.intersection(*(set(v) for v in list(baseline.values()) + list(candidate.values())))) if baseline and candidate else []

    def curve(table, seed=None):
        steps = sorted(t for t in table if seed is None or seed in table[t])
        nfe = [sum(table[t][s]["nfe"] for s in table[t]) / len(table[t]) if seed is None else table[t][seed]["nfe"] for t in steps]
        values = [sum(table[t][s][metric] for s in table[t]) / len(table[t]) if seed is None else table[t][seed][metric] for t in steps]
        return Curve("curve", nfe, values)

    def seed_mean_and_floor(table, steps):
        values = [row[metric] for row in table[steps].values()]
        spread = max(values) - min(values) if len(values) > 1 else None
        error = None
        if standard_error_key and all(row.get(standard_error_key) is not None for row in table[steps].values()):
            error = math.sqrt(sum(row[standard_error_key] ** 2 for row in table[steps].values())) / len(values)
        return sum(values) / len(values), spread, error

    entries = []
    if not baseline or not candidate:
        return {"metric": metric, "seeds": seeds, "entries": entries}
    candidate_mean_curve = curve(candidate)
    for steps in sorted(baseline):
        base_value, base_spread, base_error = seed_mean_and_floor(baseline, steps)
        entry = {"num_steps": steps, "baseline_nfe": curve(baseline).nfe[sorted(baseline).index(steps)], "baseline": base_value,
                 "baseline_seed_spread": base_spread}
        if steps in candidate:
            cand_value, cand_spread, cand_error = seed_mean_and_floor(candidate, steps)
            spreads = [s for s in (base_spread, cand_spread) if s is not None]
            floor_terms = spreads + ([2 * math.sqrt(base_error**2 + cand_error**2)] if base_error is not None and cand_error is not None else [])
            floor = max(floor_terms) if floor_terms else None
            entry.update(candidate_same_steps=cand_value, candidate_seed_spread=cand_spread, noise_floor=floor,
                         difference=cand_value - base_value)
            entry["separated"] = floor is not None and abs(cand_value - base_value) > floor
        else:
            entry["separated"] = None
        nfe, status = nfe_to_reach(candidate_mean_curve, base_value, higher_is_better=False)
        per_seed = []
        for seed in seeds:
            seed_base = baseline[steps][seed][metric]
            seed_nfe, seed_status = nfe_to_reach(curve(candidate, seed), seed_base, higher_is_better=False)
            per_seed.append({"seed": seed, "candidate_nfe": seed_nfe, "status": seed_status})
        entry.update(candidate_nfe=nfe, status=status, per_seed=per_seed)
        if entry["separated"] is False:
            entry["verdict"] = "no separation"
        elif nfe is None:
            entry["verdict"] = "not reached"
        else:
            ratio = entry["baseline_nfe"] / nfe
            bound = "<= " if status == "at_first_point" else ""
            entry["speedup"] = ratio
            seed_ratios = [entry["baseline_nfe"] / s["candidate_nfe"] for s in per_seed if s["candidate_nfe"]]
            entry["speedup_seed_range"] = [min(seed_ratios), max(seed_ratios)] if seed_ratios else None
            if ratio >= 1:
                entry["verdict"] = f"NFE {bound}{nfe:.3g} ({'>= ' if bound else ''}{ratio:.2g}x fewer)"
            else:  # the candidate needs MORE calls than the baseline: say so, never as a "speed-up" below 1
                entry["verdict"] = f"NFE {bound}{nfe:.3g} ({'<= ' if bound else ''}{1 / ratio:.2g}x more)"
            if entry["separated"] is None:
                entry["verdict"] += " (no same-T candidate cell: separation not checked)"
        entries.append(entry)
    return {"metric": metric, "seeds": seeds, "entries": entries}
