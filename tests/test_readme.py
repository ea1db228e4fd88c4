"""The README's commands and Python snippets are the product's front door: keep them working."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks[0].strip() == "pip install torch==2.13.0 -e . && kawhi-kernels demo"
    assert blocks[1].strip() == 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q tests'
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[0].strip() in ci and blocks[1].strip() in ci


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_snippet_runs(index):
    exec(compile(python_blocks()[index], f"README.md snippet {index}", "exec"), {})
