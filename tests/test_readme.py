"""The README's Python blocks run in order, as pasted into one interpreter.

They run in a fresh interpreter that imports this checkout (as from the repository root),
in an empty working directory (their ``runs/`` go there), with ``WSPACE_README_STEPS``
capping the training lengths (the blocks read it; unset, they run at full length).
"""

import os
import re
import subprocess
import sys

from tests.helpers import FAST_RUN_FLAGS, ROOT, _env

_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)

# Executes the blocks in one namespace; a failure names the block and its first line.
_RUNNER = """
import sys, traceback
namespace = {"__name__": "__main__"}
for i, block in enumerate(BLOCKS, 1):
    try:
        exec(compile(block, f"<README block {i}>", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"README block {i} of {len(BLOCKS)} failed: {block.splitlines()[0]!r}")
print(f"all {len(BLOCKS)} blocks ran")
"""


def readme_python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        return _BLOCK.findall(f.read())


def test_readme_blocks_are_found():
    blocks = readme_python_blocks()
    assert len(blocks) >= 7 and blocks[0].startswith("import os")
    assert all("WSPACE_README_STEPS" not in b for b in blocks[1:])  # read once, by the tour


def test_readme_python_blocks_run_in_order_in_one_interpreter(tmp_path):
    env = {**_env(FAST_RUN_FLAGS), "WSPACE_README_STEPS": "20"}
    code = f"BLOCKS = {readme_python_blocks()!r}\n{_RUNNER}"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    assert f"all {len(readme_python_blocks())} blocks ran" in run.stdout
