"""A synthetic language whose likelihood is known exactly: a random, sparse, "sticky" hidden Markov model.

Why an HMM: the forward algorithm gives the exact probability of any sequence (so a sampler's output can be scored
by the true law, not by a learned judge), the pair marginals are closed-form, and a sticky hidden state makes
neighbouring tokens strongly dependent, so decoding many positions at once from their marginals is visibly wrong.

Why sparse: every state emits only a few tokens and moves to only a few other states, so many token pairs (and the
first token of a sequence) are impossible. A sampler that breaks the dependencies then writes sequences of
probability exactly 0; they are counted apart instead of being averaged in with a clamped log-likelihood.

Everything exact is computed in float64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset


@dataclass
class HMMLawConfig:
    """The law's shape; `law_seed` fixes its random parameters (the same seed always builds the same law).

    Emission supports are cyclic windows of `tokens_per_state` tokens over a random permutation of the vocabulary,
    shifted by `vocab_size // num_states` from one state to the next: every token is emitted by at least one state,
    and neighbouring windows overlap, so a token does not reveal its state (the state stays hidden).
    """

    vocab_size: int = 64
    num_states: int = 16
    tokens_per_state: int = 16
    successors_per_state: int = 3
    stay_probability: float = 0.85
    initial_states: int = 4
    emission_concentration: float = 1.0
    law_seed: int = 1234

    def __post_init__(self):
        if self.vocab_size < 2 or self.num_states < 2:
            raise ValueError(f"vocab_size={self.vocab_size} and num_states={self.num_states} must be >= 2.")
        if not 1 <= self.tokens_per_state <= self.vocab_size:
            raise ValueError(f"tokens_per_state={self.tokens_per_state} must lie in [1, vocab_size].")
        if not 1 <= self.successors_per_state <= self.num_states - 1:
            raise ValueError(f"successors_per_state={self.successors_per_state} must lie in [1, num_states - 1].")
        if not 0 <= self.stay_probability < 1:
            raise ValueError(f"stay_probability={self.stay_probability} must lie in [0, 1).")
        if not 1 <= self.initial_states <= self.num_states:
            raise ValueError(f"initial_states={self.initial_states} must lie in [1, num_states].")
        if self.emission_concentration <= 0:
            raise ValueError(f"emission_concentration={self.emission_concentration} must be > 0.")


class HiddenMarkovLaw:
    """p(x_1..L) = sum over state paths of pi(h_1) prod_t B[h_t, x_t] prod_t A[h_t, h_t+1], all in float64.

    Attributes:
        initial: `[K]` the law of the first hidden state (zero outside `initial_states` states).
        transition: `[K, K]` rows sum to 1; `stay_probability` on the diagonal, the rest on a few successors.
        emission: `[K, V]` rows sum to 1; zero outside each state's window of tokens.
    """

    def __init__(self, initial: torch.Tensor, transition: torch.Tensor, emission: torch.Tensor):
        self.initial = initial.double()
        self.transition = transition.double()
        self.emission = emission.double()
        for name, rows in (("initial", self.initial[None]), ("transition", self.transition), ("emission", self.emission)):
            if (rows < 0).any() or not torch.allclose(rows.sum(-1), torch.ones(rows.shape[0], dtype=torch.float64)):
                raise ValueError(f"the {name} probabilities must be non-negative rows that sum to 1")
        self.num_states, self.vocab_size = self.emission.shape

    @classmethod
    def random(cls, config: HMMLawConfig) -> "HiddenMarkovLaw":
        # numpy's Generator draws Dirichlet weights reproducibly from one seed (torch's Gamma takes no generator).
        rng = np.random.default_rng(config.law_seed)
        K, V = config.num_states, config.vocab_size

        def dirichlet(count: int, concentration: float) -> torch.Tensor:
            return torch.from_numpy(rng.dirichlet(np.full(count, concentration)))

        permutation = torch.from_numpy(rng.permutation(V))
        shift = max(1, V // K)
        emission = torch.zeros(K, V, dtype=torch.float64)
        for state in range(K):
            window = permutation[(state * shift + torch.arange(config.tokens_per_state)) % V]
            emission[state, window] = dirichlet(config.tokens_per_state, config.emission_concentration)

        transition = torch.zeros(K, K, dtype=torch.float64)
        for state in range(K):
            others = torch.tensor([s for s in range(K) if s != state])
            successors = others[torch.from_numpy(rng.permutation(K - 1))[: config.successors_per_state]]
            transition[state, successors] = (1 - config.stay_probability) * dirichlet(config.successors_per_state, 1.0)
            transition[state, state] += config.stay_probability

        initial = torch.zeros(K, dtype=torch.float64)
        starts = torch.from_numpy(rng.permutation(K))[: config.initial_states]
        initial[starts] = dirichlet(config.initial_states, 1.0)
        return cls(initial, transition, emission)

    # --- sampling ------------------------------------------------------------------------------------------------

    def sample(self, num_sequences: int, length: int, generator: torch.Generator | None = None) -> torch.LongTensor:
        """`[N, L]` token ids drawn from the law (ancestral sampling of the hidden chain)."""
        states = torch.multinomial(self.initial.expand(num_sequences, -1), 1, generator=generator).squeeze(1)
        tokens = torch.empty(num_sequences, length, dtype=torch.long)
        for position in range(length):
            tokens[:, position] = torch.multinomial(self.emission[states], 1, generator=generator).squeeze(1)
            if position + 1 < length:
                states = torch.multinomial(self.transition[states], 1, generator=generator).squeeze(1)
        return tokens

    # --- exact likelihood ----------------------------------------------------------------------------------------

    def log_prob(self, tokens: torch.LongTensor, chunk_size: int = 65536) -> torch.Tensor:
        """Exact log p(x) per row of `[N, L]` ids (float64), by the scaled forward algorithm; -inf when p(x) = 0."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [N, L], got shape {list(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); [MASK] is not a token of the law")
        return torch.cat([self._log_prob_chunk(chunk) for chunk in tokens.split(chunk_size)]) if len(tokens) else (
            torch.empty(0, dtype=torch.float64)
        )

    def _log_prob_chunk(self, tokens: torch.LongTensor) -> torch.Tensor:
        emission_columns = self.emission.T  # [V, K]: the likelihood of each state given a token
        forward = self.initial * emission_columns[tokens[:, 0]]
        log_prob = torch.zeros(len(tokens), dtype=torch.float64)
        for position in range(tokens.shape[1]):
            if position:
                forward = (forward @ self.transition) * emission_columns[tokens[:, position]]
            scale = forward.sum(-1)
            log_prob += torch.log(scale)  # log 0 = -inf: an impossible prefix stays impossible
            # Dividing by a tiny positive number instead of 0 keeps an impossible row at 0 (no NaN).
            forward = forward / scale.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
        return log_prob

    # --- exact and Monte-Carlo entropy -----------------------------------------------------------------------------

    def exact_entropy(self, length: int) -> float:
        """H(X_1..L) in nats by enumerating all V^L sequences: exact, and only feasible for tiny laws (tests)."""
        if self.vocab_size**length > 2_000_000:
            raise ValueError(f"V^L = {self.vocab_size}^{length} sequences are too many to enumerate")
        every = torch.tensor(list(itertools.product(range(self.vocab_size), repeat=length)), dtype=torch.long)
        log_p = self.log_prob(every)
        possible = torch.isfinite(log_p)
        return float(-(log_p[possible].exp() * log_p[possible]).sum())

    def monte_carlo_entropy(
        self, length: int, num_sequences: int, generator: torch.Generator | None = None, chunk_size: int = 50_000
    ) -> dict:
        """H(X_1..L) / L estimated as the mean of -log p(x) / L over `num_sequences` law samples, each scored exactly.

        The estimate is unbiased (E_p[-log p(X)] = H(X) exactly); its standard error is the sample standard deviation
        over sqrt(N). Returns nats per token, its standard error, and the count.
        """
        sums, squares, count = 0.0, 0.0, 0
        remaining = num_sequences
        while remaining > 0:
            size = min(chunk_size, remaining)
            nll = -self.log_prob(self.sample(size, length, generator)) / length
            sums += float(nll.sum())
            squares += float((nll**2).sum())
            count += size
            remaining -= size
        mean = sums / count
        variance = max(squares / count - mean**2, 0.0) * count / max(count - 1, 1)
        return {
            "entropy_per_token": mean,
            "standard_error": math.sqrt(variance / count),
            "num_sequences": count,
            "method": "Monte Carlo: mean of the exact -log p(x) / L over fresh law samples",
        }

    # --- exact pair marginals --------------------------------------------------------------------------------------

    def state_marginals(self, length: int) -> torch.Tensor:
        """`[L, K]`: P(h_t = k) for every position."""
        marginals = [self.initial]
        for _ in range(length - 1):
            marginals.append(marginals[-1] @ self.transition)
        return torch.stack(marginals)

    def bigram_marginal(self, length: int) -> torch.Tensor:
        """`[V, V]`: the position-averaged pair law (1 / (L - 1)) sum_t P(x_t = a, x_t+1 = b), exact.

        P(x_t = a, x_t+1 = b) = sum_ij P(h_t = i) B[i, a] A[i, j] B[j, b] = (B^T diag(pi_t) A B)[a, b].
        """
        if length < 2:
            raise ValueError("pairs need length >= 2")
        marginals = self.state_marginals(length)[:-1].mean(0)  # the average is linear in pi_t
        return self.emission.T @ (marginals[:, None] * self.transition) @ self.emission

    def first_token_marginal(self) -> torch.Tensor:
        """`[V]`: P(x_1 = v); zero for the tokens no initial state emits."""
        return self.initial @ self.emission

    def describe(self) -> dict:
        impossible_pairs = int((self.bigram_marginal(2) == 0).sum())  # the pair support at t = 1 only
        return {
            "num_states": self.num_states,
            "vocab_size": self.vocab_size,
            "emitted_tokens_per_state": int((self.emission[0] > 0).sum()),
            "impossible_first_tokens": int((self.first_token_marginal() == 0).sum()),
            "impossible_pairs_at_position_1": impossible_pairs,
        }


def build_law(config: HMMLawConfig) -> HiddenMarkovLaw:
    return HiddenMarkovLaw.random(config)


def config_dict(config: HMMLawConfig) -> dict:
    return asdict(config)


class LawSampleStream(IterableDataset):
    """Endless fresh law samples for training: every batch is new, so nothing can be memorized.

    Rows are drawn `chunk_size` at a time from a generator seeded with `seed`; a resumed run re-draws the same
    stream (the Trainer skips the consumed batches), so a resumed trajectory is the uninterrupted one.
    """

    def __init__(self, law: HiddenMarkovLaw, length: int, seed: int, chunk_size: int = 4096):
        self.law, self.length, self.seed, self.chunk_size = law, length, seed, chunk_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            for row in self.law.sample(self.chunk_size, self.length, generator):
                yield {"input_ids": row}

