"""Smoke test of benchmarks/bench_speed.py at its tiny shape: every section runs and reports a finite, positive
figure for every sampler. Never a timed assertion: the figures themselves depend on the machine's load."""

import json
import math
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench_speed():
    sys.path.insert(0, BENCHMARKS)
    threads = torch.get_num_threads()  # main() sets the thread count: give the other tests theirs back
    try:
        import bench_speed

        yield bench_speed
    finally:
        sys.path.remove(BENCHMARKS)
        torch.set_num_threads(threads)


def test_bench_speed_reports_every_sampler_and_section(tmp_path, bench_speed):
    output = tmp_path / "speed.json"
    # T = 21: the smallest step count at which ReMDM's loop window (t_off = 0.05) holds a step.
    bench_speed.main(["--shapes", "tiny", "--steps", "21", "--repeats", "1", "--sampler-repeats", "1", "--threads", "1",
                      "--output", str(output)])
    report = json.loads(output.read_text())

    def positive(value):
        return isinstance(value, float) and math.isfinite(value) and value > 0

    samplers = report["samplers"]["tiny"]["samplers"]
    assert set(samplers) == set(bench_speed.SAMPLERS)
    for name, entry in samplers.items():
        settings = [setting for setting in ("default", "after", "before") if setting in entry]
        assert settings in (["default"], ["after", "before"]), name
        for setting in settings:
            assert entry[setting]["nfe"] > 0 and positive(entry[setting]["per_nfe_over_forward"]["median"]), (name, setting)
        if "after" in entry:
            assert entry["after"]["nfe"] <= entry["before"]["nfe"] and positive(entry["run_before_over_after"]["median"])
    assert all(positive(value["median"]) for value in report["forward"]["tiny"]["ratios"].values())
    training = report["training"]["tiny"]
    assert positive(training["dsl_over_mdlm"]["median"])
    assert all(training[objective]["peak_mib_over_start"] >= 0 for objective in ("mdlm", "dsl"))
    assert positive(report["endpoint_cache"]["tiny"]["uncached_over_cached"]["median"])
    converter = report["converter"]["tiny"]
    assert all(positive(converter[mode]["one_pass_over_chunked"]["median"]) for mode in ("inference", "training"))
    sparse = report["sparse_converter"]["tiny"]
    assert sparse["top_k"] == [16] and positive(sparse["time"]["top_16"]["exact_over_sparse"]["median"])
    for drift in sparse["converter_drift"].values():
        assert all(0.0 < row["kept_mass_mean"] <= 1.0 + 1e-6 for key, row in drift.items() if key != "beta")
    assert all(positive(report["nucleus"][name]["full_sort_over_candidates"]["median"]) for name in ("peaked", "flat"))
    # The profiled run asks for logits where needed, as an unprofiled one does (the label wrapper keeps the signature).
    assert report["profile"]["calls_keeping_logits"] == report["profile"]["nfe"] > 0
    profile = (tmp_path / "sampler_profile.txt").read_text()
    assert "Self CPU" in profile and "aten::" in profile
    assert report["environment"]["threads"] == 1 and report["shapes"]["tiny"]["length"] == 32
