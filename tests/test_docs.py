"""The API reference (`make docs`) builds offline from the docstrings, one page per module."""

import os
import subprocess
import sys

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
