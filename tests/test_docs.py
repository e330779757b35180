"""Every ```python block of the README and docs/ runs as a script and exits 0.

Blocks fenced as ```python run; use ```py or ```text for snippets that are not
meant to run on their own. Also: docs/architecture.md's table names the module
that defines each public name.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import offloop

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        if not path.exists():
            continue
        for n, match in enumerate(FENCE.finditer(path.read_text()), 1):
            found.append((f"{path.relative_to(ROOT)}#{n}", match.group(1)))
    return found


@pytest.mark.parametrize(("where", "code"), blocks(), ids=[w for w, _ in blocks()])
def test_doc_example_runs(where: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout}\n{proc.stderr}"


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    commands = [line.split("#")[0].strip() for line in head if line.strip().startswith("make ")]
    assert commands[:2] == ["make demo", "make test"], head


def test_the_readme_names_every_extra() -> None:
    # A user installs what the README's table names: an extra missing there
    # (cron, reload) is found only when a feature says it is not installed.
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+) = ", section, re.MULTILINE))
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| extra | brings | for |", 1)[1].split("\n\n", 1)[0]
    named = set()
    for row in table.splitlines()[2:]:
        named.update(re.findall(r"`([\w-]+)`", row.split("|")[1]))
    assert {"flask", "dev"} <= extras
    assert sorted(extras - named) == []
    assert sorted(named - extras) == []


# A row of the table "public name -> module" in docs/architecture.md.
TABLE_ROW = re.compile(r"^\| `offloop\.(\w+)` \| `(offloop(?:\.\w+)*)` \|$", re.MULTILINE)


def names_defined_in(module: types.ModuleType) -> set[str]:
    """The names ``module``'s own source defines or assigns at top level (imports excluded)."""
    assert module.__file__ is not None
    names: set[str] = set()
    for node in ast.parse(Path(module.__file__).read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_architecture_table_finds_the_module_behind_every_public_name() -> None:
    rows = TABLE_ROW.findall((ROOT / "docs" / "architecture.md").read_text())
    listed = [name for name, _ in rows]
    assert sorted(listed) == sorted(offloop.__all__), "the table and offloop.__all__ differ"
    assert len(listed) == len(set(listed)), "a name is listed twice"
    for name, module_name in rows:
        module = importlib.import_module(module_name)
        # offloop/__init__.py rewrites __module__ to "offloop", so compare objects.
        assert getattr(module, name, None) is getattr(offloop, name), (
            f"{module_name}.{name} is not offloop.{name}"
        )
        assert name in names_defined_in(module), f"{module_name} imports {name}, not defines it"


def test_the_api_reference_documents_every_public_name() -> None:
    reference = (ROOT / "docs" / "reference.md").read_text()
    documented = re.findall(r"^::: offloop\.(\w+)$", reference, re.MULTILINE)
    public = [name for name in offloop.__all__ if name != "__version__"]
    assert sorted(documented) == sorted(public)
