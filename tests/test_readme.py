"""The README teaches what the code does: its GRQO snippet runs beside grqo.py alone, the
names it imports exist, it stays short, and its links (and those of the pages it points
to) lead somewhere."""

import ast
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "docs" / "EXPERIMENTS.md", ROOT / "deform_attn" / "README.md"]
MAX_README_BYTES = 15_000

FENCED_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")      # [text](target) and ![alt](target)


def grqo_snippet(text: str) -> str:
    """The fenced python block of the README that imports grqo_loss."""
    blocks = [body for language, body in FENCED_BLOCK.findall(text)
              if language == "python" and "from grqo import grqo_loss" in body]
    assert len(blocks) == 1, "README.md should hold one python block importing grqo_loss"
    return blocks[0]


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCED_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return {heading_anchor(line.lstrip("#")) for line in text.splitlines()
            if re.match(r"#{1,6} ", line)}


def relative_links(page: Path) -> list[str]:
    text = FENCED_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z]+:", target)]          # http:, https:, mailto:


def test_grqo_snippet_runs_beside_grqo_py_alone(tmp_path):
    shutil.copy(ROOT / "grqo.py", tmp_path / "grqo.py")
    (tmp_path / "snippet.py").write_text(grqo_snippet(README.read_text(encoding="utf-8")))
    # -E: PYTHONPATH is ignored, so only the snippet's own folder (grqo.py) can be imported.
    result = subprocess.run([sys.executable, "-E", "snippet.py"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    number = r"([-+\w.]+)"          # anything float() reads, nan and inf included
    loss = re.search(rf"GRQO loss {number} = advantage term {number} \+ KL term {number}",
                     result.stdout)
    assert loss, result.stdout
    total, advantage_term, kl_term = map(float, loss.groups())
    assert math.isfinite(total)
    assert total == pytest.approx(advantage_term + kl_term, abs=2e-6)
    assert kl_term >= 0
    gradients = re.search(rf"gradient norm: costs {number}, objectness {number}",
                          result.stdout)
    assert gradients, result.stdout
    assert all(float(value) > 0 for value in gradients.groups())


def top_level_names(module: Path) -> set[str]:
    """What `from module import name` can reach: the module's top-level definitions."""
    names = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def test_readme_imports_name_what_the_project_defines():
    text = README.read_text(encoding="utf-8")
    imports = re.findall(r"^\s*from (\w+) import ([\w, ]+)$", text, re.MULTILINE)
    project_imports = [(module, names) for module, names in imports
                       if (ROOT / f"{module}.py").is_file()]
    assert project_imports, "README.md should show how to import the project's files"
    for module, names in project_imports:
        imported = {name.strip() for name in names.split(",")}
        missing = imported - top_level_names(ROOT / f"{module}.py")
        assert not missing, f"README.md imports {sorted(missing)} from {module}.py"


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes, over {MAX_README_BYTES}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(page):
    dead = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            dead.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            dead.append(target)
    assert not dead, f"dead links in {page.relative_to(ROOT)}: {dead}"
