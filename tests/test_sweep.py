"""The step-budget sweep (`dsl-evaluate`): NFE-to-reach interpolation and plots with known answers, argument
validation, the report rendering, and the sweep end to end on a tiny random model with the offline MiniLM
featurizer and a tiny judge, including resuming an interrupted run."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dsl_diffusion.evaluation import (
    Curve,
    SweepArguments,
    compare_curves,
    curves_from_rows,
    measure_noise_floor,
    minilm_encoder_path,
    nfe_to_reach,
    plot_metric_vs_nfe,
    render_markdown,
    run_sweep,
)
from dsl_diffusion.evaluation.sweep import main as sweep_main
from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion
from dsl_diffusion.trainer.tokenization import train_bpe_tokenizer
from helpers import PNG_SIGNATURE, tiny_dsl_config


pytestmark = pytest.mark.usefixtures("single_threaded")  # conftest.py: one thread per library


# ---------------------------------------------------------------------------------------------------------------
# Curves and plots
# ---------------------------------------------------------------------------------------------------------------


def test_nfe_to_reach_interpolates_in_log_nfe():
    curve = Curve("dsl / remdm", nfe=[100, 10, 1000], values=[0.4, 0.2, 0.5])  # sorted by NFE on construction
    assert curve.nfe == [10, 100, 1000] and curve.values == [0.2, 0.4, 0.5]
    nfe, status = nfe_to_reach(curve, 0.3)
    assert status == "interpolated" and nfe == pytest.approx(math.sqrt(10 * 100))  # halfway in log-NFE
    assert nfe_to_reach(curve, 0.45)[0] == pytest.approx(math.exp((math.log(100) + math.log(1000)) / 2))
    assert nfe_to_reach(curve, 0.1) == (10, "at_first_point")
    assert nfe_to_reach(curve, 0.6) == (None, "not_reached")
    # Lower is better (e.g. Gen PPL): reached when the value drops to the target.
    ppl = Curve("ppl", nfe=[10, 100], values=[60.0, 20.0])
    assert nfe_to_reach(ppl, 40.0, higher_is_better=False)[0] == pytest.approx(math.sqrt(1000))
    with pytest.raises(ValueError, match="positive"):
        Curve("bad", nfe=[0, 10], values=[0.1, 0.2])
    with pytest.raises(ValueError, match="2 NFE values but 1"):
        Curve("bad", nfe=[1, 10], values=[0.1])


def test_compare_curves_reports_speedups_and_unreached_points():
    baseline = Curve("mdlm / remdm", nfe=[128, 256, 512, 1024], values=[0.06, 0.22, 0.35, 0.80])
    candidate = Curve("dsl / remdm", nfe=[32, 64, 128], values=[0.10, 0.30, 0.45])
    points = compare_curves(baseline, candidate)
    assert [point.status for point in points] == ["at_first_point", "interpolated", "interpolated", "not_reached"]
    assert points[0].speedup == pytest.approx(4.0)
    expected_nfe = math.exp(math.log(32) + (0.22 - 0.10) / (0.30 - 0.10) * (math.log(64) - math.log(32)))
    assert points[1].candidate_nfe == pytest.approx(expected_nfe)
    assert points[1].speedup == pytest.approx(256 / expected_nfe)
    assert points[3].candidate_nfe is None and points[3].speedup is None
    assert "NOT reached" in points[3].describe() and "fewer" in points[1].describe()


def test_compare_curves_claims_no_ratio_within_the_noise_floor():
    """Known curves and a noise floor of 0.05: a match read where the two curves differ by less than the floor is
    "no separation" (no ratio); where they differ by more it keeps its ratio, at any floor below that gap."""
    baseline = Curve("mdlm", nfe=[8, 16, 32, 64], values=[0.10, 0.20, 0.30, 0.40])
    close = Curve("dsl", nfe=[8, 16, 32, 64], values=[0.13, 0.23, 0.33, 0.43])  # 0.03 above: within 0.05
    points = compare_curves(baseline, close, noise_floor=0.05)
    assert [p.status for p in points] == ["no_separation"] * 4 and all(p.speedup is None for p in points)
    assert "no separation" in points[1].describe() and points[1].noise_floor == 0.05
    assert all(p.status != "no_separation" for p in compare_curves(baseline, close, noise_floor=0.02))
    far = Curve("dsl", nfe=[8, 16, 32, 64], values=[0.20, 0.30, 0.40, 0.50])  # 0.10 above: one doubling ahead
    points = compare_curves(baseline, far, noise_floor=0.05)
    assert [p.status for p in points] == ["at_first_point", "at_first_point", "interpolated", "interpolated"]
    assert points[3].speedup == pytest.approx(2.0)
    # Lower is better: the same rule on the mirrored values.
    mirrored = compare_curves(
        Curve("mdlm", baseline.nfe, [-v for v in baseline.values]), Curve("dsl", far.nfe, [-v for v in far.values]),
        higher_is_better=False, noise_floor=0.05,
    )
    assert [p.status for p in mirrored] == [p.status for p in points]
    with pytest.raises(ValueError, match=r"noise_floor=-0.1 must be a finite number >= 0"):
        compare_curves(baseline, far, noise_floor=-0.1)
    assert baseline.value_at(4) == 0.10 and baseline.value_at(128) == 0.40
    assert baseline.value_at(math.sqrt(8 * 16)) == pytest.approx(0.15)


def test_measure_noise_floor_takes_the_larger_of_seed_and_estimator_spread():
    rows = [
        {"sampler": "a", "num_steps": 8, "seed": 0, "mauve": 0.30, "mauve_std": 0.01},
        {"sampler": "a", "num_steps": 8, "seed": 1, "mauve": 0.36, "mauve_std": 0.02},
        {"sampler": "a", "num_steps": 16, "seed": 0, "mauve": 0.50, "mauve_std": 0.01},
    ]
    floor = measure_noise_floor(rows, "mauve", cell_keys=("sampler", "num_steps"), std_key="mauve_std")
    assert floor.seed_spread == pytest.approx(0.06) and floor.estimator_spread == pytest.approx(0.04)
    assert floor.value == pytest.approx(0.06) and floor.measured
    single = measure_noise_floor(rows[:1], "mauve", cell_keys=("sampler", "num_steps"))
    assert (single.value, single.seed_spread, single.estimator_spread, single.measured) == (0.0, None, None, False)


def test_plot_and_curves_from_rows(tmp_path):
    rows = [
        {"checkpoint": "dsl", "sampler": "remdm", "nfe": 8.0, "mauve": 0.2},
        {"checkpoint": "dsl", "sampler": "remdm", "nfe": 16.0, "mauve": 0.3},
        {"checkpoint": "dsl", "sampler": "mdlm", "nfe": 8.0, "mauve": 0.1},
    ]
    curves = curves_from_rows(rows, "mauve")
    assert [(c.label, c.nfe) for c in curves] == [("dsl / remdm", [8.0, 16.0]), ("dsl / mdlm", [8.0])]
    path = plot_metric_vs_nfe(curves, tmp_path / "plots" / "mauve.png", "MAUVE", caption="featurizer x")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="No curves"):
        plot_metric_vs_nfe([], tmp_path / "empty.png", "MAUVE")


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def test_sweep_arguments_validation():
    args = SweepArguments(checkpoints=["runs/dsl-final/", "base=runs/mdlm"], sampler_kwargs='{"remdm": {"eta": 0.02}}')
    assert args.checkpoint_labels() == {"dsl-final": "runs/dsl-final/", "base": "runs/mdlm"}
    assert args.parsed_sampler_kwargs == {"remdm": {"eta": 0.02}}
    assert SweepArguments(checkpoints=["a"], mauve_num_buckets="12").mauve_num_buckets == 12
    with pytest.raises(ValueError, match="not valid JSON"):
        SweepArguments(checkpoints=["a"], sampler_kwargs="{eta: 1}")
    with pytest.raises(ValueError, match=r"not in --samplers"):
        SweepArguments(checkpoints=["a"], sampler_kwargs='{"roar": {}}')
    with pytest.raises(ValueError, match="both --baseline and --candidate"):
        SweepArguments(checkpoints=["a"], baseline="a / mdlm")
    with pytest.raises(ValueError, match="share the label"):
        SweepArguments(checkpoints=["x/model", "y/model"]).checkpoint_labels()
    with pytest.raises(ValueError, match="num_samples"):
        SweepArguments(checkpoints=["a"], num_samples=1)
    with pytest.raises(ValueError, match="reference_format"):
        SweepArguments(checkpoints=["a"], reference_format="raw")
    with pytest.raises(ValueError, match=r"\['eta'\] cannot be set there"):
        SweepArguments(checkpoints=["a"], samplers=["dsl-sde"], sampler_kwargs='{"dsl-sde": {"eta": 0.1}}')
    with pytest.raises(ValueError, match=r"\['num_steps'\] cannot be set there"):
        SweepArguments(checkpoints=["a"], samplers=["mdlm"], sampler_kwargs='{"mdlm": {"num_steps": 3}}')
    with pytest.raises(ValueError, match="sampler='ddpm' is not supported"):
        SweepArguments(checkpoints=["a"], samplers=["ddpm"])


# ---------------------------------------------------------------------------------------------------------------
# End to end on a tiny model
# ---------------------------------------------------------------------------------------------------------------

SUBJECTS = ["The council", "A local team", "The new museum", "Our school", "The river trust", "The old bakery"]
EVENTS = ["opened a garden", "won a prize", "raised money for the library", "planned a summer fair"]
DETAILS = ["after a long wait.", "with help from neighbours.", "despite the rain.", "for the first time."]


def reference_documents() -> list[str]:
    return [
        f"{subject} {event} {detail} Everyone said it was a good day for the town."
        for subject in SUBJECTS
        for event in EVENTS
        for detail in DETAILS[:2]
    ]


@pytest.fixture(scope="module")
def sweep_assets(tmp_path_factory):
    """A tiny random DSL checkpoint with a small BPE tokenizer, a tiny judge sharing that tokenizer, and reference
    documents in a local JSONL file."""
    root = tmp_path_factory.mktemp("sweep_assets")
    documents = reference_documents()
    tokenizer = train_bpe_tokenizer(documents, vocab_size=300)
    vocab_size = tokenizer.mask_token_id
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(
        tiny_dsl_config(
            vocab_size=vocab_size,
            mask_token_id=vocab_size,
            max_position_embeddings=16,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    checkpoint = root / "tiny-dsl"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    judge = root / "judge"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(judge)
    tokenizer.save_pretrained(judge)
    references = root / "references.jsonl"
    references.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    return {"checkpoint": checkpoint, "judge": judge, "references": references}


def sweep_arguments(assets, output_dir, **overrides) -> SweepArguments:
    settings = dict(
        checkpoints=[f"tiny={assets['checkpoint']}"],
        samplers=["mdlm", "dsl-sde"],
        steps=[2, 4],
        num_samples=8,
        batch_size=4,
        seq_len=16,
        device="cpu",
        output_dir=str(output_dir),
        reference_source=str(assets["references"]),
        featurizer=minilm_encoder_path(),
        featurizer_batch_size=8,
        mauve_seeds=[25, 26],
        judge=str(assets["judge"]),
        baseline="tiny / mdlm",
        candidate="tiny / dsl-sde",
    )
    settings.update(overrides)
    return SweepArguments(**settings)


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_end_to_end_and_resume(sweep_assets, tmp_path):
    output_dir = tmp_path / "sweep"
    report = run_sweep(sweep_arguments(sweep_assets, output_dir))

    rows = report["rows"]
    assert [(row["sampler"], row["num_steps"]) for row in rows] == [
        ("mdlm", 2),
        ("mdlm", 4),
        ("dsl-sde", 2),
        ("dsl-sde", 4),
    ]
    for row in rows:
        assert 0.0 <= row["mauve"] <= 1.0 and row["gen_ppl"] > 1.0 and row["frechet_distance"] >= 0.0
        assert 0.0 < row["entropy"] <= math.log(16) and row["num_samples"] == 8 and row["num_references"] == 8
    nfe = {(row["sampler"], row["num_steps"]): row["nfe"] for row in rows}
    assert nfe[("dsl-sde", 2)] == 3 and nfe[("dsl-sde", 4)] == 5  # one call per SDE step and the final read-out
    assert 1 <= nfe[("mdlm", 2)] <= 3 and 1 <= nfe[("mdlm", 4)] <= 5

    # Every report names the featurizer, the judge, the sample counts and the seeds.
    markdown = (output_dir / "results.md").read_text()
    assert f"featurizer `{minilm_encoder_path()}`" in markdown and f"judge `{sweep_assets['judge']}`" in markdown
    assert "8 references" in markdown and "8 samples per cell" in markdown and "k-means seeds [25, 26]" in markdown
    assert "| tiny | dsl-sde | 4 | 5.0 |" in markdown and "| references (data) |" in markdown
    assert "NFE needed to reach the baseline's MAUVE" in markdown
    assert markdown == render_markdown(json.loads((output_dir / "sweep_results.json").read_text()))
    comparison = report["nfe_comparison"]
    assert comparison["baseline"] == "tiny / mdlm" and len(comparison["points"]) == 2
    for name in ("mauve_vs_nfe.png", "gen_ppl_vs_nfe.png"):
        assert (output_dir / name).read_bytes()[:8] == PNG_SIGNATURE

    # Samples: decoded without skipping special tokens, drawn chunk by chunk with seeds seed + k.
    cell = output_dir / "cells" / "tiny" / "dsl-sde" / "T4"
    samples = read_samples(cell / "samples.jsonl")
    assert len(samples) == 8 and all(len(sample["token_ids"]) == 16 for sample in samples)
    assert json.loads((cell / "generation.json").read_text())["seed"] == 1

    # Interrupt one cell: its results are gone and its samples stop in the middle of the second chunk.
    finished = {
        path: path.stat().st_mtime_ns for path in output_dir.glob("cells/*/*/*/results.json") if path.parent != cell
    }
    (cell / "results.json").unlink()
    (cell / "samples.jsonl").unlink()
    lines = [json.dumps(sample) + "\n" for sample in samples]
    (cell / "samples.partial.jsonl").write_text("".join(lines[:5]) + lines[5][:20])
    resumed = run_sweep(sweep_arguments(sweep_assets, output_dir))
    assert read_samples(cell / "samples.jsonl") == samples  # the redrawn chunk is the same chunk
    assert not (cell / "samples.partial.jsonl").exists()
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # finished cells were skipped
    assert resumed["rows"] == rows

    # New metric settings recompute the metrics from the stored samples; other generation settings are refused.
    rescored = run_sweep(sweep_arguments(sweep_assets, output_dir, mauve_seeds=[7]))
    assert [row["nfe"] for row in rescored["rows"]] == [row["nfe"] for row in rows]
    assert read_samples(cell / "samples.jsonl") == samples
    with pytest.raises(ValueError, match="other generation settings"):
        run_sweep(sweep_arguments(sweep_assets, output_dir, top_p=0.5, baseline=None, candidate=None))


def test_sweep_command_line(sweep_assets, tmp_path):
    output_dir = tmp_path / "cli"
    argv = [
        "--checkpoints",
        str(sweep_assets["checkpoint"]),
        "--samplers",
        "remdm",
        "--steps",
        "2",
        "--sampler_kwargs",
        '{"remdm": {"eta": 0.1}}',
        "--num_samples",
        "4",
        "--batch_size",
        "2",
        "--seq_len",
        "16",
        "--device",
        "cpu",
        "--output_dir",
        str(output_dir),
        "--reference_source",
        str(sweep_assets["references"]),
        "--featurizer",
        minilm_encoder_path(),
        "--judge",
        str(sweep_assets["judge"]),
    ]
    assert sweep_main(argv) == 0
    report = json.loads((output_dir / "sweep_results.json").read_text())
    assert [(row["checkpoint"], row["sampler"], row["num_samples"]) for row in report["rows"]] == [
        ("tiny-dsl", "remdm", 4)
    ]
    assert report["sampler_kwargs"] == {"remdm": {"eta": 0.1}}
    generation = json.loads((output_dir / "cells" / "tiny-dsl" / "remdm" / "T2" / "generation.json").read_text())
    assert generation["sampler_kwargs"] == {"remdm": {"eta": 0.1}}["remdm"]


def test_sweep_refuses_unknown_curves_before_any_work(sweep_assets, tmp_path):
    with pytest.raises(ValueError, match="'tiny / roar' is not a curve of this sweep"):
        run_sweep(sweep_arguments(sweep_assets, tmp_path / "a", candidate="tiny / roar"))
    assert not (tmp_path / "a").exists()
