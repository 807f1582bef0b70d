"""Every example runs end to end with --quick, and every Python snippet in the README executes."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_quick(name, capsys):
    load(name).main(["--quick"])
    assert capsys.readouterr().out.strip()


def readme_snippets():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_snippets_execute():
    namespace: dict = {}
    snippets = readme_snippets()
    assert len(snippets) >= 5
    for code in snippets:  # in order: later sections reuse what earlier ones built
        exec(compile(code, "README.md", "exec"), namespace)
