"""The hybrid-defaults sweep of the known-law benchmark (`benchmarks/known_law/hybrid_sweep.py`) in its quick mode on
a tiny budget: the report's structure, the ranking rule and that the chosen setting is one of the grid's."""

import json
import os
import sys

import pytest


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.known_law import hybrid_sweep  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_threaded")


def test_quick_sweep_report(tmp_path):
    argv = ["--quick", "--steps", "4", "6", "--coarse_samples", "24", "--final_samples", "16", "--entropy_samples",
            "500", "--output_dir", str(tmp_path)]  # fmt: skip
    assert hybrid_sweep.main(argv) == 0
    report = json.loads((tmp_path / "hybrid_sweep.json").read_text())
    assert (tmp_path / "hybrid_sweep.md").read_text().startswith("# The hybrid sampler's defaults")
    assert (tmp_path / "nll_excess_vs_steps.png").stat().st_size > 0

    # The chosen setting is an evidence-mode setting of the grid or of its log-normal variants, and a finalist.
    candidates = report["grid"] + [v for v in report["variants"] if v["commit_mode"] == "evidence"]
    assert report["chosen"] in candidates and report["chosen"] in report["finalists"]
    assert all(setting in candidates for setting in report["candidates"])
    assert report["chosen_label"] == hybrid_sweep.setting_label(report["chosen"])
    assert hybrid_sweep.OLD_DEFAULTS in report["finalists"]
    # One "sample"-mode row shows its bias; it is never a candidate.
    assert [v["commit_mode"] for v in report["variants"]].count("sample") == 1

    # Stage 2: every finalist and the SDE at every T and seed; the SDE makes T + 1 calls, the hybrid T_c + 1 for the
    # SDE phase and its commit plus at most T_d + 1 discrete calls.
    sde = hybrid_sweep.setting_label(hybrid_sweep.SDE)
    assert set(report["final_table"]) == {sde, *(hybrid_sweep.setting_label(s) for s in report["finalists"])}
    for label, per_T in report["final_table"].items():
        assert sorted(per_T, key=int) == ["4", "6"]
        for T, stats in per_T.items():
            assert stats["seeds"] == [0, 1]
            if label == sde:
                assert stats["nfe"] == int(T) + 1
            else:
                assert int(T) + 1 <= stats["nfe"] <= int(T) + 2
    for row in report["final_rows"]:
        assert row["samples"] == 16 and row["num_samples"] == 16

    # The ranking rule: settings within the impossible-share tolerance first, each group by its worst ratio.
    keys = [(e["impossible_excess"] > hybrid_sweep.IMPOSSIBLE_TOLERANCE, e["worst_ratio"]) for e in report["coarse_ranking"]]
    assert keys == sorted(keys)
    chosen_key = hybrid_sweep.rank_key(report["final_rows"], report["chosen_label"], report["steps"])
    assert report["chosen"] in report["candidates"]
    for setting in report["candidates"]:
        assert chosen_key <= hybrid_sweep.rank_key(report["final_rows"], hybrid_sweep.setting_label(setting), report["steps"])
