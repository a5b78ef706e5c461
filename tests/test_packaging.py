"""The non-editable install: one `dsl_diffusion` namespace, never bare `trainer`/`pipelines`/`evaluation`."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("modeling_dsl", "trainer", "pipelines", "evaluation", "hub_cards")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (path,) = out.glob("dsl_diffusion-*.whl")
    return path


def test_wheel_installs_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"dsl_diffusion"}, top_levels
    for sub in SUBPACKAGES:
        assert f"dsl_diffusion/{sub}/__init__.py" in names
    assert "dsl_diffusion/trainer/ds_configs/zero3.json" in names
    assert "dsl_diffusion/modeling_dsl/modeling_dsl.py" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    ).decode()
    for command in ("dsl-convert-mdlm", "dsl-finetune", "dsl-generate", "dsl-evaluate", "dsl-push", "dsl-demo"):
        assert command in entry_points


def test_non_editable_install_imports_from_site_packages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    assert not (target / "trainer").exists() and not (target / "pipelines").exists()
    script = (
        "import dsl_diffusion.modeling_dsl as m, dsl_diffusion.trainer, dsl_diffusion.pipelines, "
        "dsl_diffusion.evaluation, dsl_diffusion.hub_cards; print(m.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(target)), result.stdout
