"""The layout that lets the project be read: one subject per file and no file too long to
read, imports that point one way (down), model.py's table of contents true to its sections,
and the README's reading order naming what exists where it says."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 1_300

# The project's modules from the lowest to the highest: a module may import only modules
# before it. A new module takes its place here.
LAYERS = ["bert", "deform_attn", "grqo", "shapes", "data", "model", "losses", "checkpoints",
          "evaluate", "train_sft", "train_grqo", "export", "predict", "demo"]


def project_files() -> list[Path]:
    """The project's Python files, tests and benchmarks aside."""
    return sorted(ROOT.glob("*.py")) + sorted((ROOT / "deform_attn").glob("*.py"))


def module_of(path: Path) -> str:
    return path.parent.name if path.parent != ROOT else path.stem


def imported_modules(path: Path) -> set[str]:
    """The project modules a file imports anywhere in it (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


@pytest.mark.parametrize("path", project_files(), ids=lambda path: path.name)
def test_no_project_file_is_too_long_to_read(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines, over {MAX_LINES}"


def test_imports_point_down_the_layers_so_no_import_circles():
    modules = {module_of(path) for path in project_files()}
    assert modules == set(LAYERS), f"place every module in LAYERS: {modules ^ set(LAYERS)}"
    upward = [f"{path.relative_to(ROOT)} imports {name}" for path in project_files()
              for name in imported_modules(path) - {module_of(path)}
              if LAYERS.index(name) > LAYERS.index(module_of(path))]
    assert not upward, upward


def test_no_file_imports_a_training_script_but_train_grqo():
    importers = [path.name for path in project_files()
                 if imported_modules(path) & {"train_sft", "train_grqo"}
                 and path.name != "train_grqo.py"]
    assert not importers, importers


def banners(text: str) -> list[str]:
    """The titles of a file's section banners, "# ------ title", in order."""
    return re.findall(r"^# -{3,} (.+)$", text, re.MULTILINE)


def table_of_contents(text: str) -> list[str]:
    """The section names in model.py's docstring: the lines of its indented table."""
    docstring = ast.get_docstring(ast.parse(text))
    table = docstring.split(":\n\n", 1)[1].split("\n\n", 1)[0]
    return [re.split(r"\s{2,}", line.strip())[0] for line in table.splitlines()
            if line.startswith("    ") and not line.startswith("     ")]


def test_model_py_table_of_contents_lists_its_sections_in_file_order():
    text = (ROOT / "model.py").read_text(encoding="utf-8")
    assert table_of_contents(text) == banners(text)
    assert len(banners(text)) >= 8


def defined_names(path: Path) -> set[str]:
    """What a file defines or imports at its top level, and its classes' members as
    "Class.member"."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    names.add(f"{node.name}.{member.target.id}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def reading_order(readme: str) -> list[tuple[str, str]]:
    """(file, name) for every `name` the README's reading order mentions after a link to a
    Python file, the file being the last one linked before it."""
    section = readme.split("## Reading order\n", 1)[1].split("\n## ", 1)[0]
    section = re.sub(r"\[`[^`]*`\]\(", "](", section)        # a link's text is not a name
    pairs, current = [], None
    for link, name in re.findall(r"\]\(([^)]+)\)|`([^`]+)`", section):
        if link:
            current = link if link.endswith(".py") else None
        elif current and re.fullmatch(r"[A-Za-z_]\w*(\.\w+)?", name):
            pairs.append((current, name))
    return pairs


def test_every_name_of_the_readme_reading_order_exists_where_it_says():
    pairs = reading_order((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(pairs) >= 10 and ("model.py", "DINOR1.forward") in pairs
    missing = [f"{name} in {file}" for file, name in pairs
               if name not in defined_names(ROOT / file)]
    assert not missing, missing
