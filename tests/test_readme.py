"""The README's set-up commands stay true: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_two_setup_commands_each_creating_its_environment():
    cmds = setup_commands()
    assert len(cmds) == 2
    assert all(c.startswith("python3 -m venv .venv && ") and "torch==2.13.0" in c for c in cmds)


def test_ci_runs_the_readme_test_command():
    test_cmd = setup_commands()[1]
    assert "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci/run").read_text()
