"""The API reference (`make docs`) builds offline from the docstrings, one page per module."""

import os
import subprocess
import sys
import tomllib

import pytest

import wspace as ws
from tests.helpers import ROOT


def test_api_reference_builds_a_page_per_public_module(tmp_path):
    pytest.importorskip("pdoc")  # the `dev` extra
    out = tmp_path / "api"
    subprocess.run(
        [sys.executable, "-m", "pdoc", "-o", str(out), "wspace"],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    for module in ws.__all__:
        page = out / "wspace" / f"{module}.html"
        assert page.is_file(), f"no API page for wspace.{module}"
        summary = getattr(ws, module).__doc__.strip().splitlines()[0]
        assert summary.split("`")[0][:30] in page.read_text(), f"wspace.{module}: no docstring"
    assert os.path.isfile(out / "index.html") and os.path.isfile(out / "search.js")


def test_citation_and_changelog_match_the_package():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        cff = f.read()
    assert f"version: {project['version']}\n" in cff
    assert f'repository-code: "{project["urls"]["Source"]}"' in cff
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## [{project['version']}]" in f.read()
    with open(os.path.join(ROOT, "CITATION.bib")) as f:
        bib = f.read()
    papers = ("2007.12927", "2305.08960", "2006.06880", "1803.03635", "2403.15022", "2205.00334")
    for arxiv_id in papers:  # the six papers behind the methods (README table)
        assert f"eprint    = {{{arxiv_id}}}" in bib, arxiv_id
    assert os.path.isfile(os.path.join(ROOT, "wspace", "py.typed"))
