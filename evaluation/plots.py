"""Quality-against-compute curves: plots of a metric against NFE per sampler, and the NFE a curve needs to reach a
baseline's quality, reported only where the metric separates the curves from its measured noise floor.

Plots use matplotlib's object-oriented API (``matplotlib.figure.Figure`` and its Agg canvas), so they never touch
pyplot's global state or need a display.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter


__all__ = [
    "Curve",
    "plot_metric_vs_nfe",
    "nfe_to_reach",
    "NFEComparison",
    "NoiseFloor",
    "compare_curves",
    "curves_from_rows",
    "measure_noise_floor",
]


@dataclass
class Curve:
    """One line of a quality-against-NFE plot: a label (``"checkpoint / sampler"``) and its points."""

    label: str
    nfe: list[float]
    values: list[float]

    def __post_init__(self):
        if len(self.nfe) != len(self.values):
            raise ValueError(
                f"Curve {self.label!r} has {len(self.nfe)} NFE values but {len(self.values)} metric values"
            )
        if any(not (math.isfinite(n) and n > 0) for n in self.nfe):
            raise ValueError(f"Curve {self.label!r} has NFE values that are not positive numbers: {self.nfe}")
        order = sorted(range(len(self.nfe)), key=lambda i: self.nfe[i])
        self.nfe = [float(self.nfe[i]) for i in order]
        self.values = [float(self.values[i]) for i in order]

    def value_at(self, nfe: float) -> float:
        """The curve at ``nfe``, linear in log-NFE between measured points and held at its end values outside them
        (never extrapolated)."""
        if nfe <= self.nfe[0]:
            return self.values[0]
        for (n0, v0), (n1, v1) in zip(zip(self.nfe, self.values), zip(self.nfe[1:], self.values[1:])):
            if nfe <= n1:
                fraction = (math.log(nfe) - math.log(n0)) / (math.log(n1) - math.log(n0))
                return v0 + fraction * (v1 - v0)
        return self.values[-1]


def plot_metric_vs_nfe(
    curves: Sequence[Curve],
    path: str | Path,
    metric_name: str,
    title: str | None = None,
    log_y: bool = False,
    caption: str | None = None,
    xticks: Sequence[float] | None = None,
    styles: Mapping[str, Mapping] | None = None,
) -> Path:
    """Save a PNG of ``metric_name`` against NFE (log scale), one line per curve.

    ``caption`` (e.g. the featurizer, judge, sample counts and seeds) is printed in small type under the title.
    ``xticks`` are the labelled NFEs (default: every measured NFE; pass the step budgets when samplers spend a call
    or two more than T, or the labels collide). ``styles`` maps a curve's label to matplotlib line keywords (color,
    linestyle, marker, ...), so that related curves can share a color. With more than six curves the legend goes
    beside the axes, where it covers no point.
    """
    if not curves:
        raise ValueError("No curves to plot")
    styles = styles or {}
    beside = len(curves) > 6
    figure = Figure(figsize=(8.4 if beside else 6.4, 4.6), layout="constrained")
    ax = figure.subplots()
    for curve in curves:
        ax.plot(curve.nfe, curve.values, **{"marker": "o", **styles.get(curve.label, {})}, label=curve.label)
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(xticks)) if xticks else sorted({nfe for curve in curves for nfe in curve.nfe}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (denoiser forward passes per sample)")
    ax.set_ylabel(metric_name)
    ax.grid(True, which="major", alpha=0.3)
    if beside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    if caption:
        ax.set_title(caption, fontsize=7, wrap=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    return path


def nfe_to_reach(curve: Curve, target: float, higher_is_better: bool = True) -> tuple[float | None, str]:
    """The smallest NFE at which ``curve`` reaches ``target``, interpolating linearly in log-NFE between points.

    Returns ``(nfe, status)``: ``"interpolated"`` (crossed between two measured points), ``"at_first_point"`` (the
    cheapest measured point already reaches the target: the true NFE may be lower, the curve says nothing below
    its first point), or ``(None, "not_reached")`` when no measured point reaches the target (nothing is
    extrapolated).
    """

    def reaches(value: float) -> bool:
        return value >= target if higher_is_better else value <= target

    if reaches(curve.values[0]):
        return curve.nfe[0], "at_first_point"
    for (n0, v0), (n1, v1) in zip(zip(curve.nfe, curve.values), zip(curve.nfe[1:], curve.values[1:])):
        if reaches(v1):
            fraction = (target - v0) / (v1 - v0)
            return math.exp(math.log(n0) + fraction * (math.log(n1) - math.log(n0))), "interpolated"
    return None, "not_reached"


@dataclass
class NFEComparison:
    """For one point of the baseline curve: the NFE the candidate needs to match its metric value.

    ``status``: ``"interpolated"``, ``"at_first_point"`` (a bound), ``"not_reached"`` (see :func:`nfe_to_reach`),
    or ``"no_separation"``: the metric does not separate the two curves where the match would be read, so no
    ratio is claimed (``speedup`` is None; ``candidate_nfe`` keeps the point estimate for the record).
    ``noise_floor`` is the difference below which the metric does not separate two values.
    """

    baseline_nfe: float
    baseline_value: float
    candidate_nfe: float | None
    status: str
    speedup: float | None
    noise_floor: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, metric_name: str = "MAUVE") -> str:
        head = f"baseline {metric_name} {self.baseline_value:.4g} at NFE {self.baseline_nfe:g}"
        if self.status == "no_separation":
            return f"{head}: no separation (the curves lie within the noise floor {self.noise_floor:.3g} there)"
        if self.status == "not_reached":
            return f"{head}: NOT reached by the candidate within its measured NFE range"
        if self.status == "at_first_point":
            return (
                f"{head}: reached at the candidate's cheapest point, NFE <= {self.candidate_nfe:g} "
                f"(>= {self.speedup:.3g}x fewer)"
            )
        return f"{head}: candidate needs NFE {self.candidate_nfe:.4g} ({self.speedup:.3g}x fewer)"


def compare_curves(
    baseline: Curve, candidate: Curve, higher_is_better: bool = True, noise_floor: float = 0.0
) -> list[NFEComparison]:
    """The "NFE needed to reach the baseline's metric": for every baseline point (n, v), :func:`nfe_to_reach` on
    the candidate, giving m. ``speedup = n / m`` (a lower bound when the status is ``"at_first_point"``).

    A ratio is claimed only where the metric separates the two cells it compares, (candidate, m) and
    (baseline, m): their values must differ by more than ``noise_floor`` (e.g. from :func:`measure_noise_floor`).
    Otherwise the candidate is as good as the baseline at the same NFE within noise, and the status is
    ``"no_separation"``; two curves that lie within the noise floor of each other never give a ratio. Likewise
    ``"not_reached"`` needs the candidate's best value to fall short of v by more than the floor. The
    baseline's value at m is read with :meth:`Curve.value_at` (held at its end values outside its range).
    """
    if not (math.isfinite(noise_floor) and noise_floor >= 0):
        raise ValueError(f"noise_floor={noise_floor!r} must be a finite number >= 0")
    best_candidate = max(candidate.values) if higher_is_better else min(candidate.values)
    comparisons = []
    for nfe, value in zip(baseline.nfe, baseline.values):
        candidate_nfe, status = nfe_to_reach(candidate, value, higher_is_better)
        if status == "not_reached":
            separated = abs(value - best_candidate) > noise_floor
        else:
            # The candidate's value where the match is read: the target itself, or its cheapest point's (a bound).
            candidate_value = candidate.values[0] if status == "at_first_point" else value
            separated = abs(candidate_value - baseline.value_at(candidate_nfe)) > noise_floor
        if not separated:
            status = "no_separation"
        comparisons.append(
            NFEComparison(
                baseline_nfe=nfe,
                baseline_value=value,
                candidate_nfe=candidate_nfe,
                status=status,
                speedup=None if candidate_nfe is None or status == "no_separation" else nfe / candidate_nfe,
                noise_floor=noise_floor,
            )
        )
    return comparisons


@dataclass
class NoiseFloor:
    """How far apart two values of a metric must be before the metric separates them.

    ``seed_spread``: the largest max - min of the metric over the sampling seeds of one cell (None without
    repeated seeds). ``estimator_spread``: twice the largest standard deviation the metric's own estimator
    reported for one cell (e.g. MAUVE over k-means seeds; None when it reports none). ``value`` is the larger of
    the two, 0 when neither was measured (then nothing is checked against noise: ``measured`` is False).
    """

    value: float
    seed_spread: float | None
    estimator_spread: float | None

    @property
    def measured(self) -> bool:
        return self.seed_spread is not None or self.estimator_spread is not None

    def to_dict(self) -> dict:
        return {**asdict(self), "measured": self.measured}


def measure_noise_floor(
    rows: Sequence[Mapping], metric: str, cell_keys: Sequence[str], std_key: str | None = None
) -> NoiseFloor:
    """The :class:`NoiseFloor` of ``metric`` from result rows: a cell is the rows sharing ``cell_keys`` (the same
    sampler and step budget, different sampling seeds); ``std_key`` names the estimator's per-row standard
    deviation, if it has one."""
    cells: dict[tuple, list[float]] = {}
    for row in rows:
        if row.get(metric) is not None:
            cells.setdefault(tuple(row[key] for key in cell_keys), []).append(float(row[metric]))
    spreads = [max(values) - min(values) for values in cells.values() if len(values) > 1]
    stds = [float(row[std_key]) for row in rows if std_key is not None and row.get(std_key) is not None]
    seed_spread = max(spreads) if spreads else None
    estimator_spread = 2.0 * max(stds) if stds else None
    parts = [part for part in (seed_spread, estimator_spread) if part is not None]
    return NoiseFloor(value=max(parts, default=0.0), seed_spread=seed_spread, estimator_spread=estimator_spread)


def curves_from_rows(
    rows: Sequence[Mapping], metric: str, group_keys: Sequence[str] = ("checkpoint", "sampler")
) -> list[Curve]:
    """Group result rows (dicts with ``nfe`` and ``metric``) into one :class:`Curve` per ``group_keys`` value."""
    groups: dict[str, tuple[list, list]] = {}
    for row in rows:
        if row.get(metric) is None or row.get("nfe") is None:
            continue
        label = " / ".join(str(row[key]) for key in group_keys)
        nfe, values = groups.setdefault(label, ([], []))
        nfe.append(row["nfe"])
        values.append(row[metric])
    return [Curve(label, nfe, values) for label, (nfe, values) in groups.items()]
