"""Corruption processes: per-token SNR paths for DSL and the masking process of MDLM.

DSL corrupts a sequence by giving every token its own signal-to-noise ratio s_i >= 0 and observing
z_i = s_i e_{x_i} + sqrt(s_i) eps_i (METHOD.md section 3). A training objective is therefore fully
described by the distribution of the SNR matrix [B, L]; the classes here are those distributions.

Every path has

* ``sample(batch_size, length, generator=None, device=None) -> snr [B, L]`` for training, and
* ``grid(num_steps) -> [num_steps + 1]`` increasing SNRs from 0 to ``snr_max`` for the continuous samplers
  (where a single scalar schedule is meaningful; the ROAR endpoint path is a random *order*, not a schedule).

``sample_with_rows`` additionally says which rows are ROAR endpoint rows, so that losses can log the
endpoint and continuous parts separately. ``lengths`` (the number of real tokens per row) lets the ROAR path
draw k ~ U{0..n-1} over the real tokens of padded rows; padding positions get SNR 0 and are never counted.

MDLM's masking process (log-linear schedule, antithetic t) is at the bottom of the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SNRSample",
    "SNRPath",
    "ROARPath",
    "LogNormalPath",
    "LogLinearPath",
    "LinearPath",
    "ConstantPath",
    "MixturePath",
    "build_snr_path",
    "SNR_PATH_NAMES",
    "sample_mdlm_times",
    "mdlm_alpha",
    "mdlm_loss_weight",
    "mdlm_mask_tokens",
]


def _check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def _check_shape(batch_size: int, length: int) -> None:
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be >= 1, got batch_size={batch_size}, length={length}")


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


@dataclass
class SNRSample:
    """An SNR draw: ``snr`` [B, L] (float32) and ``roar_rows`` [B] (bool, True for ROAR endpoint rows)."""

    snr: torch.Tensor
    roar_rows: torch.Tensor


class SNRPath:
    """Base class of the per-token SNR distributions used for training and of their inference grids."""

    def sample_with_rows(
        self,
        batch_size: int,
        length: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        lengths: torch.Tensor | None = None,
    ) -> SNRSample:
        """Draw an SNR matrix [batch_size, length] and mark the ROAR endpoint rows (see :class:`SNRSample`)."""
        raise NotImplementedError

    def sample(
        self,
        batch_size: int,
        length: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw an SNR matrix [batch_size, length] (float32, >= 0)."""
        return self.sample_with_rows(batch_size, length, generator=generator, device=device, lengths=lengths).snr

    def grid(self, num_steps: int) -> torch.Tensor:
        """An increasing grid of ``num_steps + 1`` SNRs from 0 to ``snr_max`` (float64) for the continuous sampler."""
        raise NotImplementedError(f"{type(self).__name__} has no scalar SNR schedule")


class _ContinuousPath(SNRPath):
    """A path whose rows are all continuous (no endpoint rows); subclasses implement ``_continuous_rows``."""

    def _continuous_rows(self, batch_size, length, generator, device) -> torch.Tensor:
        raise NotImplementedError

    def sample_with_rows(self, batch_size, length, generator=None, device=None, lengths=None) -> SNRSample:
        _check_shape(batch_size, length)
        snr = self._continuous_rows(batch_size, length, generator, device)
        return SNRSample(snr=snr, roar_rows=torch.zeros(batch_size, dtype=torch.bool, device=snr.device))


class ROARPath(SNRPath):
    """Random-order autoregression endpoints (METHOD.md section 3, "ROAR endpoint part").

    Per sequence, k ~ U{0..n-1} (n = number of real tokens); a uniformly random subset of k tokens gets
    ``snr_max`` (clean) and the rest SNR 0 (masked). With ``smoothed=True`` the masked tokens get
    s ~ U[0, smoothed_snr_lo) and the clean ones s ~ U[clean_low_fraction, 1] * snr_max instead [choice].
    """

    def __init__(
        self,
        snr_max: float = 100.0,
        smoothed: bool = False,
        smoothed_snr_lo: float = 1.0,
        clean_low_fraction: float = 0.8,
    ):
        _check_positive("snr_max", snr_max)
        _check_positive("smoothed_snr_lo", smoothed_snr_lo)
        _check_fraction("clean_low_fraction", clean_low_fraction)
        self.snr_max = float(snr_max)
        self.smoothed = smoothed
        self.smoothed_snr_lo = float(smoothed_snr_lo)
        self.clean_low_fraction = float(clean_low_fraction)

    @staticmethod
    def visible_mask(
        batch_size: int,
        length: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bool [B, L]: for each row, k ~ U{0..n-1} uniformly chosen real positions are visible (the rest masked)."""
        _check_shape(batch_size, length)
        if lengths is None:
            lengths = torch.full((batch_size,), length, device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        # A uniformly random order of the real positions: sort uniform keys, padding sorts last.
        keys = torch.rand(batch_size, length, generator=generator, device=device)
        positions = torch.arange(length, device=device)
        keys = keys.masked_fill(positions[None, :] >= lengths[:, None], 2.0)
        rank = keys.argsort(dim=1).argsort(dim=1)
        # k ~ U{0..n-1}: floor(u * n) with u ~ U[0, 1).
        u = torch.rand(batch_size, generator=generator, device=device)
        num_visible = (u * lengths).floor().long().clamp(max=(lengths - 1).clamp(min=0))
        return rank < num_visible[:, None]

    def sample_with_rows(self, batch_size, length, generator=None, device=None, lengths=None) -> SNRSample:
        visible = self.visible_mask(batch_size, length, generator=generator, device=device, lengths=lengths)
        if self.smoothed:
            u = torch.rand(batch_size, length, generator=generator, device=visible.device)
            clean = self.snr_max * (self.clean_low_fraction + (1.0 - self.clean_low_fraction) * u)
            masked = self.smoothed_snr_lo * u
            snr = torch.where(visible, clean, masked)
        else:
            snr = visible.float() * self.snr_max
        return SNRSample(snr=snr, roar_rows=torch.ones(batch_size, dtype=torch.bool, device=visible.device))

    def __repr__(self) -> str:
        return f"ROARPath(snr_max={self.snr_max}, smoothed={self.smoothed})"


class LogNormalPath(_ContinuousPath):
    """log s ~ N(mu, sigma^2), one SNR per sequence (default) or per token [choice].

    Defaults are the OpenWebText values of METHOD.md (mu 2.69, sigma 1.41, median SNR ~14.7); text8-like data
    uses mu 1.4, sigma 0.55. The grid takes quantiles of the same distribution, truncated at ``snr_max``.

    With ``per_token``, ``per_token_fraction`` < 1 draws per-token SNRs for that share of the rows only (each row
    chooses by a coin) and one SNR for each of the others: the SDE samplers show the network every position at one
    SNR, which independent per-token draws almost never produce, so a mixture trains on both.
    """

    def __init__(
        self,
        mu: float = 2.69,
        sigma: float = 1.41,
        per_token: bool = False,
        snr_max: float = 100.0,
        per_token_fraction: float = 1.0,
    ):
        if not math.isfinite(mu):
            raise ValueError(f"mu must be finite, got {mu!r}")
        _check_positive("sigma", sigma)
        _check_positive("snr_max", snr_max)
        _check_fraction("per_token_fraction", per_token_fraction)
        if per_token_fraction != 1.0 and not per_token:
            raise ValueError(f"per_token_fraction={per_token_fraction} needs per_token=True (it splits per-token rows).")
        self.mu, self.sigma, self.per_token, self.snr_max = float(mu), float(sigma), per_token, float(snr_max)
        self.per_token_fraction = float(per_token_fraction)

    def _continuous_rows(self, batch_size, length, generator, device):
        columns = length if self.per_token else 1
        normal = torch.randn(batch_size, columns, generator=generator, device=device)
        if self.per_token and self.per_token_fraction < 1.0:
            one_snr = torch.rand(batch_size, 1, generator=generator, device=device) >= self.per_token_fraction
            normal = torch.where(one_snr, normal[:, :1], normal)
        return torch.exp(self.mu + self.sigma * normal).expand(batch_size, length).contiguous()

    def grid(self, num_steps: int) -> torch.Tensor:
        _check_num_steps(num_steps)
        normal = torch.distributions.Normal(torch.tensor(self.mu, dtype=torch.float64), self.sigma)
        top = normal.cdf(torch.tensor(math.log(self.snr_max), dtype=torch.float64))
        quantiles = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64) * top
        grid = torch.exp(normal.icdf(quantiles[1:]))
        return torch.cat([torch.zeros(1, dtype=torch.float64), grid])

    def __repr__(self) -> str:
        fraction = f", per_token_fraction={self.per_token_fraction}" if self.per_token_fraction != 1.0 else ""
        return f"LogNormalPath(mu={self.mu}, sigma={self.sigma}, per_token={self.per_token}{fraction})"


class LogLinearPath(_ContinuousPath):
    """log s ~ U[log snr_min, log snr_max] per sequence (or per token); the grid is 0 followed by a geometric grid."""

    def __init__(self, snr_min: float = 0.01, snr_max: float = 100.0, per_token: bool = False):
        _check_positive("snr_min", snr_min)
        _check_positive("snr_max", snr_max)
        if snr_min >= snr_max:
            raise ValueError(f"snr_min must be below snr_max, got snr_min={snr_min}, snr_max={snr_max}")
        self.snr_min, self.snr_max, self.per_token = float(snr_min), float(snr_max), per_token

    def _continuous_rows(self, batch_size, length, generator, device):
        columns = length if self.per_token else 1
        u = torch.rand(batch_size, columns, generator=generator, device=device)
        log_snr = math.log(self.snr_min) + u * (math.log(self.snr_max) - math.log(self.snr_min))
        return torch.exp(log_snr).expand(batch_size, length).contiguous()

    def grid(self, num_steps: int) -> torch.Tensor:
        _check_num_steps(num_steps)
        geometric = torch.logspace(
            math.log10(self.snr_min), math.log10(self.snr_max), num_steps, dtype=torch.float64
        )
        return torch.cat([torch.zeros(1, dtype=torch.float64), geometric])

    def __repr__(self) -> str:
        return f"LogLinearPath(snr_min={self.snr_min}, snr_max={self.snr_max}, per_token={self.per_token})"


class LinearPath(_ContinuousPath):
    """s ~ U[0, snr_max] per sequence (or per token); the grid is uniform on [0, snr_max]."""

    def __init__(self, snr_max: float = 100.0, per_token: bool = False):
        _check_positive("snr_max", snr_max)
        self.snr_max, self.per_token = float(snr_max), per_token

    def _continuous_rows(self, batch_size, length, generator, device):
        columns = length if self.per_token else 1
        u = torch.rand(batch_size, columns, generator=generator, device=device)
        return (u * self.snr_max).expand(batch_size, length).contiguous()

    def grid(self, num_steps: int) -> torch.Tensor:
        _check_num_steps(num_steps)
        return torch.linspace(0.0, self.snr_max, num_steps + 1, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"LinearPath(snr_max={self.snr_max}, per_token={self.per_token})"


class ConstantPath(_ContinuousPath):
    """Every token at one fixed SNR (0 = all masked); useful for evaluation at a given noise level."""

    def __init__(self, snr: float = 0.0):
        _check_nonnegative("snr", snr)
        self.snr = float(snr)

    def _continuous_rows(self, batch_size, length, generator, device):
        return torch.full((batch_size, length), self.snr, device=device)

    def __repr__(self) -> str:
        return f"ConstantPath(snr={self.snr})"


class MixturePath(SNRPath):
    """The DSL training mixture: a fraction ``rho`` of each batch from the ROAR path, the rest continuous.

    How many rows are ROAR (``row_count``):

    * ``"stochastic"`` (default): floor(rho * B + u), u ~ U[0, 1): exactly rho * B when that is an integer, and
      rho * B in expectation otherwise (so batch size 1 still sees ROAR rows with probability rho);
    * ``"floor"``: floor(rho * B), the reference code's ``B // 4`` (no ROAR rows at all below 1 / rho rows).

    Which rows are ROAR is uniformly random (the reference takes the first rows; rows are exchangeable, so the
    law of the batch is the same). ``grid`` is the continuous part's grid.
    """

    ROW_COUNTS = ("stochastic", "floor")

    def __init__(
        self,
        roar: ROARPath | None = None,
        continuous: SNRPath | None = None,
        rho: float = 0.25,
        row_count: str = "stochastic",
    ):
        _check_fraction("rho", rho)
        if row_count not in self.ROW_COUNTS:
            raise ValueError(f"row_count={row_count!r} is not supported; accepted: {self.ROW_COUNTS}")
        self.roar = roar if roar is not None else ROARPath()
        self.continuous = continuous if continuous is not None else LogNormalPath()
        self.rho = float(rho)
        self.row_count = row_count

    def num_roar_rows(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> int:
        if self.row_count == "floor":
            return int(math.floor(self.rho * batch_size))
        u = torch.rand((), generator=generator, device=device).item()
        return min(batch_size, int(math.floor(self.rho * batch_size + u)))

    def sample_with_rows(self, batch_size, length, generator=None, device=None, lengths=None) -> SNRSample:
        _check_shape(batch_size, length)
        num_roar = self.num_roar_rows(batch_size, generator=generator, device=device)
        order = torch.randperm(batch_size, generator=generator, device=device)
        roar_rows = torch.zeros(batch_size, dtype=torch.bool, device=device)
        roar_rows[order[:num_roar]] = True
        roar = self.roar.sample_with_rows(batch_size, length, generator=generator, device=device, lengths=lengths)
        continuous = self.continuous.sample_with_rows(batch_size, length, generator=generator, device=device)
        snr = torch.where(roar_rows[:, None], roar.snr, continuous.snr)
        return SNRSample(snr=snr, roar_rows=roar_rows | continuous.roar_rows)

    def grid(self, num_steps: int) -> torch.Tensor:
        return self.continuous.grid(num_steps)

    def __repr__(self) -> str:
        return (
            f"MixturePath(rho={self.rho}, row_count={self.row_count!r}, roar={self.roar!r}, "
            f"continuous={self.continuous!r})"
        )


# The reference code's `mixed` SNR path (DSL2 `snrs.MixedSNRPath` with `configs/snrpath/mixed.yaml`): B // 4 rows
# on ROAR endpoints, the rest per-sequence log-normal with mu 4.0, sigma 1.5. Its parameters are fixed by the name;
# other values go through "mixture".
REFERENCE_MIXED_RHO = 0.25
REFERENCE_MIXED_LOGNORMAL_MU = 4.0
REFERENCE_MIXED_LOGNORMAL_SIGMA = 1.5

SNR_PATH_NAMES = ("mixture", "reference_mixed", "roar", "roar_smoothed", "lognormal", "loglinear", "linear")
LOGNORMAL_SNR_PATHS = ("mixture", "reference_mixed", "lognormal")  # the paths whose continuous rows are log-normal


def build_snr_path(
    name: str = "mixture",
    *,
    rho: float = 0.25,
    snr_max: float = 100.0,
    lognormal_mu: float = 2.69,
    lognormal_sigma: float = 1.41,
    per_token: bool = False,
    snr_min: float = 0.01,
    roar_smoothed: bool = False,
    smoothed_snr_lo: float = 1.0,
    per_token_fraction: float = 1.0,
) -> SNRPath:
    """Build an SNR path from flat options (the form they take in ``DSLTrainingArguments`` and on the CLI).

    ``name`` is one of ``SNR_PATH_NAMES``:

    * "mixture": a fraction ``rho`` of the rows (stochastic rounding) on ROAR endpoints (smoothed when
      ``roar_smoothed``), the rest log-normal (``lognormal_mu``, ``lognormal_sigma``): METHOD.md's mixture;
    * "reference_mixed": the reference code's `mixed` path, floor(B / 4) ROAR rows and log-normal (4.0, 1.5);
      ``rho``, ``lognormal_mu`` and ``lognormal_sigma`` do not apply;
    * "lognormal": every row log-normal, no ROAR rows (the reference code's default path, mu 2.69, sigma 1.41);
    * "roar" / "roar_smoothed", "loglinear", "linear": one path for every row.

    ``per_token_fraction`` (with ``per_token``) applies to the log-normal paths only.
    """
    if name not in SNR_PATH_NAMES:
        raise ValueError(f"unknown SNR path {name!r}; accepted: {', '.join(SNR_PATH_NAMES)}")
    _check_positive("snr_max", snr_max)
    if per_token_fraction != 1.0 and name not in LOGNORMAL_SNR_PATHS:
        raise ValueError(
            f"per_token_fraction={per_token_fraction} applies to the log-normal paths {LOGNORMAL_SNR_PATHS}, "
            f"not to snr_path={name!r}."
        )
    roar = ROARPath(
        snr_max=snr_max, smoothed=roar_smoothed or name == "roar_smoothed", smoothed_snr_lo=smoothed_snr_lo
    )
    if name in ("roar", "roar_smoothed"):
        return roar
    if name == "loglinear":
        return LogLinearPath(snr_min=snr_min, snr_max=snr_max, per_token=per_token)
    if name == "linear":
        return LinearPath(snr_max=snr_max, per_token=per_token)
    if name == "reference_mixed":
        continuous = LogNormalPath(
            mu=REFERENCE_MIXED_LOGNORMAL_MU, sigma=REFERENCE_MIXED_LOGNORMAL_SIGMA, per_token=per_token, snr_max=snr_max,
            per_token_fraction=per_token_fraction,
        )
        return MixturePath(roar=roar, continuous=continuous, rho=REFERENCE_MIXED_RHO, row_count="floor")
    lognormal = LogNormalPath(
        mu=lognormal_mu, sigma=lognormal_sigma, per_token=per_token, snr_max=snr_max, per_token_fraction=per_token_fraction
    )
    if name == "lognormal":
        return lognormal
    return MixturePath(roar=roar, continuous=lognormal, rho=rho)


# ---------------------------------------------------------------------------------------------------------------
# MDLM masking (METHOD.md section 2)
# ---------------------------------------------------------------------------------------------------------------


def sample_mdlm_times(
    batch_size: int,
    sampling_eps: float = 1e-3,
    antithetic: bool = True,
    shared_offset: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Diffusion times t in [sampling_eps, 1], one per row, low-discrepancy over the batch as in MDLM.

    With ``antithetic`` (MDLM's default) u_i = (r_i + i) / n, so exactly one u falls in each stratum
    [i/n, (i+1)/n); ``shared_offset`` uses one r for the whole batch instead of one per row. Then
    t = (1 - sampling_eps) u + sampling_eps.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= sampling_eps < 1.0:
        raise ValueError(f"sampling_eps must lie in [0, 1), got {sampling_eps!r}")
    if antithetic:
        offsets = torch.rand(1 if shared_offset else batch_size, generator=generator, device=device)
        u = (offsets + torch.arange(batch_size, device=offsets.device)) / batch_size
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
    return (1.0 - sampling_eps) * u + sampling_eps


def mdlm_alpha(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The log-linear schedule alpha_t = 1 - (1 - eps) t: the probability that a token is still unmasked."""
    return 1.0 - (1.0 - eps) * t


def mdlm_loss_weight(t: torch.Tensor) -> torch.Tensor:
    """w(t) = -alpha'_t / (1 - alpha_t) = (1 - eps) / ((1 - eps) t) = 1 / t for the log-linear schedule (any eps)."""
    return 1.0 / t


def mdlm_mask_tokens(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    eps: float = 1e-3,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each real token independently with probability 1 - alpha_t; returns (noisy_ids, masked [B, L] bool).

    Padding positions (attention_mask == 0) are never masked: they are not part of the sequence.
    """
    move_chance = (1.0 - mdlm_alpha(t, eps)).to(torch.float32)[:, None]
    masked = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < move_chance
    if attention_mask is not None:
        masked &= attention_mask.bool()
    return input_ids.masked_fill(masked, mask_token_id), masked
