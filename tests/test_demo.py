"""The README's main job (`dsl-demo`) end to end at the reduced "ci" size: real training, sampling and metrics."""

import json
import math
import os
import shutil

import pytest

from dsl_diffusion.evaluation.demo import (
    DemoArguments,
    eos_fraction,
    headline_table,
    main,
    metric_noise_floors,
    nfe_to_match,
    plan_cells,
    remdm_knobs,
    training_arguments,
)


ABLATIONS = ["--ablations", "table_path", "legacy_recipe", "--ablation_step_budgets", "4"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    main(["--preset", "ci", "--output_dir", str(out), "--judge", "smollm2", "--save_steps", "10"] + ABLATIONS)
    return out


def test_demo_writes_every_artifact(demo_dir):
    for name in ("results.json", "results.md", "mauve_vs_nfe.png", "frechet_vs_nfe.png", "samples.txt"):
        assert (demo_dir / name).stat().st_size > 0, name
    for stage in ("tokenizer", "pretrain", "arm-mdlm", "arm-dsl", "samples"):
        assert (demo_dir / stage / "done.json").is_file(), stage
    assert (demo_dir / "mauve_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_numbers_are_finite_and_in_range(demo_dir):
    report = json.loads((demo_dir / "results.json").read_text())
    args = DemoArguments(preset="ci", ablations=["table_path", "legacy_recipe"], ablation_step_budgets=[4])
    rows = report["results"]
    assert sorted(row["cell"] for row in rows) == sorted(cell.name for cell in plan_cells(args))
    for row in rows:
        assert 0.0 <= row["mauve"] <= 1.0 and row["mauve_std"] >= 0.0
        assert math.isfinite(row["frechet"]) and row["frechet"] >= 0.0
        assert 0.0 <= row["entropy"] <= math.log(args.block_size) + 1e-9
        assert 0.0 <= row["eos_fraction"] <= 1.0
        assert math.isfinite(row["gen_ppl"]) and row["gen_ppl"] > 1.0
        assert row["num_samples"] == args.samples_per_cell
        assert 1 <= row["nfe"] <= row["num_steps"] + 1
    assert report["judge"]["gguf_file"].endswith(".gguf")
    assert report["reference"]["eos_fraction"] >= 2 / args.block_size  # wrapped rows: [BOS] ... [EOS], BOS = EOS
    for arm in ("mdlm", "dsl"):
        record = report["arms"][arm]
        assert record["steps"] == args.finetune_steps
        diagnostics = record["diagnostics"]
        assert 0.0 <= diagnostics["all_masked_eos_probability"] <= diagnostics["all_masked_top_token_probability"] <= 1
        assert 0.0 < diagnostics["converter_mask_slot_weight_at_z0"] < 1.0
        assert math.isfinite(record["eval"]["eval_loss"])
    # The ablation arms: the dsl arm's weights through the table, and a legacy-recipe arm through the converter.
    assert {"dsl-table+remdm-cap@T4", "dsl-legacy+remdm-cap@T4"} <= {row["cell"] for row in rows}
    assert "dsl-table+remdm-cap@T8" not in {row["cell"] for row in rows}
    assert report["arms"]["dsl-table"]["diagnostics"]["endpoint_inputs"] == "table"
    assert report["arms"]["dsl"]["diagnostics"]["endpoint_inputs"] == "converter"
    assert report["arms"]["dsl-legacy"]["diagnostics"]["endpoint_inputs"] == "converter"
    assert report["arms"]["dsl-legacy"]["recipe"] == "legacy"
    # The AR reference saw as many tokens as pretraining + one arm, and judges every cell in-domain.
    ar = report["arms"]["ar"]
    assert ar["tokens"] == report["arms"]["mdlm"]["tokens"] + args.pretrain_steps * args.batch_size * args.block_size
    assert math.isfinite(ar["eval"]["eval_ppl"]) and ar["eval"]["eval_ppl"] > 1.0
    # (None only where a collapsed sampler emitted nothing but EOS, which the protocol does not count.)
    scored = [row["ar_gen_ppl"] for row in rows if row["ar_gen_ppl"] is not None]
    assert len(scored) >= len(rows) // 2 and all(math.isfinite(p) and p > 1.0 for p in scored)
    by_sampler = {row["sampler"]: row for row in rows}
    assert by_sampler["ar"]["nfe"] == args.block_size - 1 and by_sampler["roar"]["nfe"] == args.block_size
    # The DSL arm trains its own token directions (higher learning rate); the MDLM arm never touches them.
    assert report["arms"]["mdlm"]["directions_mean_cosine_to_init"] == pytest.approx(1.0, abs=1e-6)
    assert report["arms"]["dsl"]["directions_mean_cosine_to_init"] < 1.0 - 1e-5
    # The headline: for each T of MDLM+ReMDM, the NFE every DSL sampler needs to match it, in MAUVE and Frechet.
    headline = report["nfe_to_match_mdlm_remdm"]
    assert set(headline) == {"mauve", "frechet"}
    for per_candidate in headline.values():
        assert set(per_candidate) == {"dsl+remdm", "dsl+hybrid", "dsl+dsl-sde", "dsl-table+remdm", "dsl-legacy+remdm"}
        for points in per_candidate.values():
            assert [p["baseline_nfe"] for p in points] == sorted(p["baseline_nfe"] for p in points)
            assert len(points) == len(args.step_budgets)
            assert all(p["status"] in ("interpolated", "at_first_point", "not_reached", "no_separation") for p in points)
    assert set(report["noise_floor"]) == {"mauve", "frechet"} and report["noise_floor"]["mauve"]["measured"]
    assert "NFE each DSL sampler needs to match MDLM+ReMDM" in (demo_dir / "results.md").read_text()


def test_eos_fraction_counts_every_position():
    assert eos_fraction([[0, 5, 6, 0], [0, 0, 0, 0]], eos_token_id=0) == pytest.approx(6 / 8)


def _row(curve, nfe, mauve, frechet, seed=0, mauve_std=0.0):
    return {
        "curve": curve, "nfe": nfe, "num_steps": nfe, "mauve": mauve, "frechet": frechet, "seed": seed,
        "mauve_std": mauve_std,
    }


def test_nfe_to_match_reads_the_headline_off_the_curves():
    rows = [_row("mdlm+remdm", n, m, f) for n, m, f in ((4, 0.1, 3.0), (8, 0.2, 2.0), (16, 0.3, 1.0))]
    rows += [_row("dsl+remdm", n, m, f) for n, m, f in ((4, 0.2, 2.5), (8, 0.3, 1.0), (16, 0.35, 0.5))]
    rows += [_row("dsl+remdm", 8, 0.31, 1.02, seed=1)]  # a noise-floor seed: it sets the floor, not the curves
    headline = nfe_to_match(rows, seed=0)
    mauve = headline["mauve"]["dsl+remdm"]
    assert [p["status"] for p in mauve] == ["at_first_point", "at_first_point", "interpolated"]
    assert mauve[2]["candidate_nfe"] == pytest.approx(8.0) and mauve[2]["speedup"] == pytest.approx(2.0)
    frechet = headline["frechet"]["dsl+remdm"]  # lower is better: 2.0 is crossed halfway (in log-NFE) from 4 to 8
    assert frechet[1]["status"] == "interpolated"
    assert frechet[1]["candidate_nfe"] == pytest.approx(4 * 2 ** ((2.5 - 2.0) / 1.5))
    assert frechet[2]["candidate_nfe"] == pytest.approx(8.0)
    assert [p["noise_floor"] for p in mauve] == pytest.approx([0.01] * 3)  # the seed-to-seed spread at NFE 8
    floors = metric_noise_floors(rows)
    table = headline_table(headline, floors)
    assert "| mauve | 16 | 0.3000 | 8.0 (2.00x) |" in table and "| mauve | 4 | 0.1000 | <= 4.0 (1.00x) |" in table
    assert "mauve: A ratio is given only where the two curves differ by more than the noise floor 0.01 " in table
    worse = [dict(r, curve="dsl+remdm", mauve=r["mauve"] / 10) for r in rows if r["curve"] == "mdlm+remdm"]
    assert nfe_to_match(rows[:3] + worse, seed=0)["mauve"]["dsl+remdm"][0]["status"] == "not_reached"


def test_headline_says_no_separation_when_the_curves_lie_within_their_noise_floor():
    """The `make demo` case: every MAUVE at the floor of ~0.004, k-means std 0.001. A ratio read off such curves
    ("<= 8.0 (8.00x)") is noise: the table must say "no separation". Frechet separates the same cells, so it keeps
    its ratios; a candidate whose best value misses the baseline by less than the floor is not "not reached"."""
    mauve_at_floor = {8: 0.0040, 16: 0.0041, 32: 0.0039, 64: 0.0042}
    rows = [_row("mdlm+remdm", n, m, 3.0 - n / 32, mauve_std=0.001) for n, m in mauve_at_floor.items()]
    rows += [_row("dsl+remdm", n, m + 0.0003, 2.5 - n / 32, mauve_std=0.001) for n, m in mauve_at_floor.items()]
    rows += [_row("dsl+remdm", 8, 0.0043, 2.25, seed=1)]  # seed-to-seed: MAUVE 0.0003 apart, Frechet 0.0
    headline = nfe_to_match(rows, seed=0)
    assert [p["status"] for p in headline["mauve"]["dsl+remdm"]] == ["no_separation"] * 4
    assert all(p["speedup"] is None for p in headline["mauve"]["dsl+remdm"])
    frechet = headline["frechet"]["dsl+remdm"]  # 0.5 better at every NFE (floor 0: the two seeds agree)
    assert [p["status"] for p in frechet] == ["at_first_point", "at_first_point", "interpolated", "interpolated"]
    assert [p["speedup"] for p in frechet][2:] == pytest.approx([2.0, 64 / 32 / 2 ** 0.5])
    table = headline_table(headline, metric_noise_floors(rows))
    assert "| mauve | 64 | 0.0042 | no separation |" in table and "(8.00x)" not in table
    assert "2 x the estimator's std (k-means seeds) 0.002" in table
    # Without any measured noise the same flat curves would claim a ratio: the floor is what stops it.
    unmeasured = [dict(row, mauve_std=None) for row in rows if row["seed"] == 0]
    assert "no_separation" not in {p["status"] for p in nfe_to_match(unmeasured, seed=0)["mauve"]["dsl+remdm"]}
    assert "The noise floor was not measured" in headline_table(nfe_to_match(unmeasured, 0), metric_noise_floors(unmeasured))

    # A candidate that falls short of the baseline's best by less than the floor: no separation, not "not reached".
    short = [_row("mdlm+remdm", 8, 0.10, 1.0, mauve_std=0.01), _row("mdlm+remdm", 16, 0.30, 1.0, mauve_std=0.01)]
    short += [_row("dsl+remdm", 8, 0.05, 1.0), _row("dsl+remdm", 16, 0.29, 1.0)]
    assert [p["status"] for p in nfe_to_match(short, 0)["mauve"]["dsl+remdm"]] == ["interpolated", "no_separation"]


def test_demo_resumes_without_redoing_finished_stages(demo_dir):
    before = {stage: os.path.getmtime(demo_dir / stage / "done.json") for stage in ("pretrain", "arm-dsl")}
    first_run = json.loads((demo_dir / "arm-mdlm" / "done.json").read_text())
    assert first_run["resumed_from_checkpoint"] is None
    # An arm stopped after its step-10 checkpoint (of 15 steps) resumes from that checkpoint, not from scratch.
    (demo_dir / "arm-mdlm" / "done.json").unlink()
    shutil.rmtree(demo_dir / "arm-mdlm" / "checkpoint-15")
    assert sorted(p.name for p in (demo_dir / "arm-mdlm").glob("checkpoint-*")) == ["checkpoint-10"]
    main(["--preset", "ci", "--output_dir", str(demo_dir), "--judge", "none", "--save_steps", "10"])
    after = {stage: os.path.getmtime(demo_dir / stage / "done.json") for stage in before}
    assert before == after
    resumed = json.loads((demo_dir / "arm-mdlm" / "done.json").read_text())
    assert resumed["resumed_from_checkpoint"] == "checkpoint-10" and resumed["steps"] == 15
    assert resumed["eval"]["eval_loss"] == pytest.approx(first_run["eval"]["eval_loss"], rel=1e-4)


def test_cell_plan_follows_the_published_remdm_settings():
    assert remdm_knobs(num_steps=16, length=64)["strategy"] == "cap"
    assert remdm_knobs(num_steps=64, length=64) == {"strategy": "loop", "eta": 0.02, "t_on": 0.55, "t_off": 0.05, "alpha_on": 0.9}
    args = DemoArguments(preset="ci")
    cells = plan_cells(args)
    floor = args.noise_floor_steps
    assert {c.seed for c in cells if c.num_steps == floor and c.arm != "ar"} == {0, 1}
    assert {c.seed for c in cells if c.num_steps != floor} == {0}
    replication = plan_cells(DemoArguments(preset="replication"))
    assert {c.num_steps for c in replication if c.seed == 1} == {8}
    # The headline pair (MDLM+ReMDM, DSL+ReMDM) at all 5 budgets, MDLM / DSL-SDE / hybrid at 2, the AR reference.
    assert sum(c.seed == 0 for c in replication) == 2 * 5 + 3 * 2 + 1
    curves = {}
    for c in replication:
        curves.setdefault(c.name.split("@")[0].replace("-cap", "").replace("-loop", ""), set()).add(c.num_steps)
    assert curves["mdlm+remdm"] == curves["dsl+remdm"] == {4, 8, 16, 32, 64}
    assert curves["mdlm+mdlm"] == curves["dsl+dsl-sde"] == curves["dsl+hybrid"] == {4, 16}
    assert len({c.name for c in cells}) == len(cells)


def test_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="preset='huge' is not supported"):
        DemoArguments(preset="huge")
    with pytest.raises(ValueError, match="top_p=1.5"):
        DemoArguments(preset="ci", top_p=1.5)
    with pytest.raises(ValueError, match=r"noise_floor_steps=5 must be one of step_budgets=\[4, 8\]"):
        DemoArguments(preset="ci", noise_floor_steps=5)
    with pytest.raises(ValueError, match="dropout=1.0 must lie in"):
        DemoArguments(preset="ci", dropout=1.0)
    with pytest.raises(ValueError, match=r"secondary_step_budgets=\[2\] must be a subset of step_budgets=\[4, 8\]"):
        DemoArguments(preset="ci", secondary_step_budgets=[2])
    with pytest.raises(ValueError, match="ar_steps=0 must be >= 1"):
        DemoArguments(preset="ci", ar_steps=0)


def test_ablation_arguments_are_checked():
    with pytest.raises(ValueError, match=r"ablations=\['lr'\] are not supported; accepted: \['legacy_recipe', 'table_path'\]"):
        DemoArguments(preset="ci", ablations=["lr"])
    with pytest.raises(ValueError, match=r"ablation_step_budgets=\[2\] must be a subset of step_budgets=\[4, 8\]"):
        DemoArguments(preset="ci", ablations=["table_path"], ablation_step_budgets=[2])


def test_arm_recipes(tmp_path):
    with pytest.raises(ValueError, match=r"arm_recipe='adam' is not supported; accepted: \('cosine', 'reference'\)"):
        DemoArguments(preset="ci", arm_recipe="adam")
    cosine = DemoArguments(preset="ci", output_dir=str(tmp_path))
    assert cosine.dsl_learning_rate == 1e-2
    shared = training_arguments(cosine, str(tmp_path / "a"), "dsl", 10, 3e-4, cosine.dsl_learning_rate)
    assert (shared.lr_scheduler_type, shared.learning_rate, shared.dsl_learning_rate) == ("cosine", 3e-4, 1e-2)
    reference = DemoArguments(preset="ci", output_dir=str(tmp_path), arm_recipe="reference")
    assert reference.dsl_learning_rate is None  # one AdamW group, as the authors' code
    named = training_arguments(reference, str(tmp_path / "b"), "dsl", 10, 3e-4, None, named_recipe="reference")
    assert (named.lr_scheduler_type, named.learning_rate, named.warmup_steps) == ("constant", 3e-4, 0)
    assert (named.ema_decay, named.eos_in_loss, named.snr_path, named.dsl_learning_rate) == (0.999, "drop", "lognormal", None)
    assert named.max_steps == 10 and named.per_device_train_batch_size == reference.batch_size
