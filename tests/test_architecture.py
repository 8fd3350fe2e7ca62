"""The house keeps its architecture: no import cycle among the toolkit's modules (function-local and type-only
imports included), imports that point down the layers, and no module over about 400 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGES = ("models", "utils")
SCRIPTS = ("train_vae", "sample", "evaluate")
MAX_LINES = 420

# what each layer may import of the toolkit (by module-name prefix); a layer not listed may import anything below
# the scripts. Ground floor: utils.errors, utils.fields, utils.files, utils.grids, utils.threads,
# utils.sleeping_waits.
GROUND = ("utils.errors", "utils.fields", "utils.files", "utils.grids", "utils.threads", "utils.sleeping_waits")
ALLOWED = {
    "ground": GROUND,
    "models": ("models", "utils.errors", "utils.fields"),
    "utils.data": ("utils.data", *GROUND),
    "utils.evaluation": ("utils.evaluation", "utils.data", "models", *GROUND),
    "utils.training": ("utils.training", "utils.evaluation", "utils.data", "utils.config", "models", *GROUND),
    "utils.inference": ("utils.inference", "utils.evaluation", "utils.training.run_folder", "utils.data",
                        "utils.config", "models", *GROUND),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def toolkit_sources() -> dict[str, str]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")] + [REPO / f"{s}.py" for s in SCRIPTS]
    return {module_name(p): p.read_text() for p in files}


def imports(source: str, known: set[str]) -> set[str]:
    """The toolkit modules a source imports anywhere in it: at the top, inside functions, under TYPE_CHECKING.
    ``from a.b import c`` names the module a.b.c when that is one, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_cycles(sources: dict[str, str]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (or a module importing itself), as sorted lists."""
    known = set(sources)
    graph = {m: imports(src, known) for m, src in sources.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layer(module: str) -> str | None:
    if module in GROUND:
        return "ground"
    return next((name for name in sorted(ALLOWED, key=len, reverse=True)
                 if name != "ground" and (module == name or module.startswith(name + "."))), None)


def layer_violations(sources: dict[str, str]) -> list[str]:
    known = set(sources)
    bad = []
    for m, src in sorted(sources.items()):
        for target in sorted(imports(src, known)):
            if target.split(".")[0] in SCRIPTS:
                bad.append(f"{m} imports the script {target}")
            own = layer(m)
            if own is not None and not any(target == a or target.startswith(a + ".") for a in ALLOWED[own]):
                bad.append(f"{m} ({own}) imports {target}")
    return bad


def test_no_import_cycle():
    assert import_cycles(toolkit_sources()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    """A cycle hidden in a function and behind TYPE_CHECKING, as the ones this test was written for."""
    planted = {
        "pkg": "",
        "pkg.a": "def f():\n    from pkg.b import g\n",
        "pkg.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n",
        "pkg.c": "import pkg.a\n",
        "pkg.d": "from pkg.a import f\n",
    }
    assert import_cycles(planted) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert import_cycles({**planted, "pkg.c": ""}) == []


def test_imports_point_down_the_layers():
    assert layer_violations(toolkit_sources()) == []


def test_a_planted_upward_import_is_reported():
    sources = toolkit_sources()
    sources["models.vae"] += "\ndef f():\n    from utils.training.loop import train\n"
    assert layer_violations(sources) == ["models.vae (models) imports utils.training.loop"]


def test_no_module_is_over_about_400_lines():
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")] + [REPO / f"{s}.py" for s in SCRIPTS]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def layout_files(block: str) -> set[str]:
    """The files the layout block of docs/development.md names, as paths: a line at the margin opens a folder
    (``models/``), one indented two spaces a sub-folder (``  data/``) or a file of the folder; deeper lines go on
    with the line above; a name with a slash is a path from the root."""
    found, top, sub = set(), "", ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        first = (line.split() or [""])[0]
        if indent == 0:
            top, sub = (first if first.endswith("/") else ""), ""
        elif indent == 2:
            sub = first if first.endswith("/") else ""
        found |= {name if "/" in name else top + sub + name for name in re.findall(r"[\w/]+\.py\b", line)}
    return found


def test_the_layout_names_every_module_and_only_those():
    """docs/development.md holds the one layout (the README links to it); a module added, moved or removed without
    it fails here."""
    text = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    block = re.search(r"^## Layout\n+```\n(.*?)^```", text, re.MULTILINE | re.DOTALL).group(1)
    modules = {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
               if p.name != "__init__.py"} | {f"{s}.py" for s in SCRIPTS}
    named = layout_files(block)
    assert sorted(modules - named) == [], "modules the layout of docs/development.md does not name"
    assert sorted(named - modules) == [], "files the layout of docs/development.md names that do not exist"


def test_the_layout_reader_reads_folders_sub_folders_and_paths():
    block = "a.py  b.py   the scripts\npkg/   uses lib/x.py\n  c.py  what\n  sub/  d.py (D), e.py\n        f.py\n"
    assert layout_files(block) == {"a.py", "b.py", "lib/x.py", "pkg/c.py", "pkg/sub/d.py", "pkg/sub/e.py",
                                   "pkg/sub/f.py"}
