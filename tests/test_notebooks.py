"""Notebooks: each starts with the Colab install cell, stores a figure, and executes cleanly."""

import json
import os
import tomllib

import pytest

from tests.helpers import ROOT, notebook_names

COLAB_CELL = os.path.join(ROOT, "notebooks", "_colab_cell.py")


def _cells(name):
    with open(os.path.join(ROOT, "notebooks", f"{name}.ipynb")) as f:
        return json.load(f)["cells"]


def _code(cell):
    return "".join(cell["source"]).strip()


def test_colab_cell_installs_from_the_source_url():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Source"]
    with open(COLAB_CELL) as f:
        assert f'git+{url}"' in f.read()


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_starts_with_colab_cell_and_stores_a_figure(name):
    with open(COLAB_CELL) as f:
        expected = "\n".join(line for line in f.read().splitlines() if not line.startswith("#"))
    code = [c for c in _cells(name) if c["cell_type"] == "code"]
    first = "\n".join(line for line in _code(code[0]).splitlines() if not line.startswith("#"))
    assert first.strip() == expected.strip(), f"{name}: first code cell is not the Colab cell"
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{name}: no stored figure; run `make notebooks`"
