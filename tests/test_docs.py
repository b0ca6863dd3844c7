"""Docs that must match the code."""

import re
from pathlib import Path

from rtlib import abstract_build, count_parameters, load_spec
from rtlib.spec.reference import spec_reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_spec_reference_is_in_sync_with_the_schema():
    current = (ROOT / "docs" / "spec-reference.md").read_text()
    assert current == spec_reference_markdown(), "run: python tools/spec_reference.py"


def test_readme_parameter_counts_match_inspect():
    readme = (ROOT / "README.md").read_text()
    for name in ("wikitext103", "enwik8", "pg19", "cifar10", "imagenet64"):
        params = count_parameters(abstract_build(load_spec(ROOT / f"specs/paper/{name}.yaml"))[0])
        row = re.search(rf"^\| `specs/paper/{name}.yaml` \|.*$", readme, re.M)
        assert row, f"README has no row for {name}"
        assert f"{params:,}" in row.group(0), (name, params, row.group(0))


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_cmd = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    assert test_cmd.strip() in ci


def test_readme_python_examples_run(monkeypatch):
    import jax

    monkeypatch.chdir(ROOT)  # the examples use repository-relative spec paths
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    with jax.numpy_dtype_promotion("standard"):  # as a user runs them
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_readme_commands_name_real_subcommands_and_files():
    from rtlib.cli import _parser

    readme = (ROOT / "README.md").read_text()
    commands = {a.dest: a for a in _parser()._subparsers._group_actions}["command"].choices
    lines = [line for block in re.findall(r"```(?:bash|text)\n(.*?)```", readme, re.S)
             for line in block.splitlines()]
    used = [part.strip().split()[:3] for line in lines for part in line.split("&&")
            if part.strip().startswith(("rtlib ", "$ rtlib "))]
    assert len(used) >= 8
    for words in used:
        words = [w for w in words if w != "$"]
        assert words[1] in commands, words
        paths = [w for w in words[2:] if w.startswith("specs/")]
        assert all((ROOT / w).is_file() for w in paths), words
