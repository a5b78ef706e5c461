"""Every relative link and every file path named in README.md and docs/*.md exists.

What is checked, in the prose of each page (fenced code blocks are left out: they hold commands and their output
paths, not references):

* Markdown links ``[text](target)``: the target, without its ``#anchor``, must exist relative to the page itself,
  as GitHub and the Hub resolve it. ``http(s)://`` and ``mailto:`` links and pure ``#anchor`` links are skipped.
* Inline code spans that name a repository path: a span without spaces that contains a ``/`` and ends in a file
  extension or a ``/`` (``trainer/losses.py``, ``benchmarks/results/mini-cpu/``), or one of the top-level files
  (``README.md``, ``CHANGELOG.md``, ``Makefile``, ...). It must exist relative to the page or to the repository
  root; a ``*`` in it is a glob that must match something.
* Anywhere on the page, commands and code blocks included: a path into one of the repository's own folders
  (``benchmarks/bench_speed.py``, ``tests/test_modeling.py``), relative to the repository root.

Skipped as not the repository's: paths under the folders a user's runs write (``out/``, ``outputs/``), paths
of the user's home or the file system (``~/...``, ``/...``), Hub ids (``owner/name``, no extension), URLs, and
spans with ``=``, ``(``, ``<`` or ``$`` (code, not a path).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_LEVEL_FILES = {"README.md", "CHANGELOG.md", "Makefile", "setup.py", "pytest.ini", "LICENSE"}
USER_OUTPUT_DIRS = ("out/", "outputs/")

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PATH_LIKE = re.compile(r"[\w.\-*]+/[\w.\-/*]*(\.\w+|/|\*)$")
REPO_FOLDERS = ("modeling_dsl", "trainer", "pipelines", "evaluation", "hub_cards", "benchmarks", "tests", "scripts", "docs")
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:%s)/[\w./*-]*[\w*/])" % "|".join(REPO_FOLDERS))


def prose(page: Path) -> str:
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def exists(candidate: Path) -> bool:
    if "*" in str(candidate):
        return any(candidate.parent.glob(candidate.name))
    return candidate.exists()


def links(page: Path) -> list[str]:
    targets = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def named_paths(page: Path) -> list[str]:
    paths = []
    for span in CODE_SPAN.findall(prose(page)):
        span = span.strip()
        if re.search(r"\s|[=(<$]|://", span) or span.startswith(("~", "/")) or span.startswith(USER_OUTPUT_DIRS):
            continue
        if span in TOP_LEVEL_FILES or PATH_LIKE.fullmatch(span):
            paths.append(span)
    return paths


def repo_paths(page: Path) -> list[str]:
    return REPO_PATH.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_exist(page):
    missing = [target for target in links(page) if not exists(page.parent / target)]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_named_paths_exist(page):
    missing = [path for path in named_paths(page) if not (exists(page.parent / path) or exists(ROOT / path))]
    assert not missing, f"{page.relative_to(ROOT)} names missing paths: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_paths_into_the_repository_exist(page):
    missing = [path for path in repo_paths(page) if not exists(ROOT / path)]
    assert not missing, f"{page.relative_to(ROOT)} names missing repository paths: {missing}"


def test_the_check_sees_the_pages_and_their_paths():
    """The rules above must find something, or a broken regex would pass every page."""
    assert ROOT / "docs" / "known_law.md" in PAGES
    readme_links = links(ROOT / "README.md")
    assert "docs/known_law.md" in readme_links and "docs/replication.md" in readme_links
    assert "scripts/setup.sh" in named_paths(ROOT / "README.md")
    assert "outputs/demo/" not in named_paths(ROOT / "README.md")
    assert "benchmarks/results/mini-cpu/ablation-*" in named_paths(ROOT / "docs" / "replication.md")
    assert "benchmarks/bench_speed.py" in repo_paths(ROOT / "docs" / "speed.md")  # inside a command
