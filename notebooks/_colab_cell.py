# The first code cell of every notebook (copy it verbatim; tests/test_notebooks.py checks it).
# In Colab it installs wspace from the Source URL in pyproject.toml; elsewhere it does nothing
# (run the notebook where wspace is installed, e.g. the repository's .venv after `make setup`).
import subprocess
import sys

if "google.colab" in sys.modules:
    wspace_source = "wspace @ git+https://github.com/wspace-research/wspace"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", wspace_source], check=True)
