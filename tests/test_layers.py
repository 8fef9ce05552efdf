"""The layers contract of docs/ARCHITECTURE.md ("Floors: one way down"), read from the source with ``ast``.

* every library module (speechlm/, alignment/) sits on a floor and imports only from its own floor or below
  (all imports count, those inside functions too; only ``if TYPE_CHECKING:`` imports are exempt);
* no import circles among library modules, not even inside one floor;
* no library file over 600 lines;
* scripts (tools/, recipes/) are entry points: no library module or test imports them;
* no ``spec_from_file_location``, no ``runpy.run_path`` and no ``sys.path`` insert/append in speechlm/, alignment/,
  tools/, recipes/, tests/ (no code loads a file by its path).
"""

from __future__ import annotations

import ast
import itertools
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("speechlm", "alignment")
SCRIPT_DIRS = ("tools", "recipes")
MAX_LINES = 600

#: (module prefix, floor), bottom to top; a module takes the floor of its longest matching prefix.
FLOORS: tuple[tuple[str, float], ...] = (
    ("speechlm", 1),                # the package itself: only its version
    ("speechlm.errors", 1),
    ("speechlm.atomic", 1),
    ("speechlm.paths", 1),
    ("speechlm.schedule", 1),       # the pure learning-rate rule (trainer and aligner trainer)
    ("speechlm.config", 2),
    ("speechlm.models", 3),
    ("speechlm.data", 4),
    ("alignment", 5),
    ("speechlm.training", 6),
    ("speechlm.eval", 7),
    ("speechlm.inference", 7.5),    # inference (and serving code) above the evaluations
    ("speechlm.serving", 7.5),
    ("speechlm.perf", 8),
)
FLOOR_NAMES = {1: "errors/atomic/paths/schedule", 2: "config", 3: "models", 4: "data", 5: "alignment", 6: "training",
               7: "eval", 7.5: "inference", 8: "perf"}


# ---------------------------------------------------------------------------------------------- the source
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def library_files() -> dict[str, Path]:
    """``{module name: file}`` of every library module."""
    out = {}
    for top in LIBRARY_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _py_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, names)`` of every import in ``tree`` outside ``if TYPE_CHECKING:`` blocks;
    relative imports are resolved against ``module``."""
    out: list[tuple[int, str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            out.append((node.lineno, base, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _resolve(target: str, names: list[str]) -> list[str]:
    """The library modules an import statement reaches: ``from pkg import sub`` names the submodule ``pkg.sub``
    when it is one, else the module ``pkg`` itself."""
    modules = library_files()
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    if not names or len(found) < len(names):
        # names that are not submodules come from ``target`` itself (or its nearest parent that is a module)
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            found.append(".".join(parts))
    return found


@cache
def import_graph() -> dict[str, dict[str, tuple[Path, int, str]]]:
    """``{module: {imported library module: (file, line, the import as written)}}``."""
    graph: dict[str, dict[str, tuple[Path, int, str]]] = {}
    for module, path in library_files().items():
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, tuple[Path, int, str]] = {}
        for line, target, names in _imports(tree, module, path.name == "__init__.py"):
            if target.split(".")[0] not in LIBRARY_DIRS:
                continue
            written = f"from {target} import {', '.join(names)}" if names else f"import {target}"
            for dep in _resolve(target, names):
                if dep != module:
                    edges.setdefault(dep, (path, line, written))
        graph[module] = edges
    return graph


def floor_of(module: str) -> float | None:
    best = None
    for prefix, floor in FLOORS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, floor)
    return None if best is None else best[1]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _where(path: Path, line: int) -> str:
    return f"{_rel(path)}:{line}"


# ---------------------------------------------------------------------------------------------- the contract
def unfloored(modules) -> list[str]:
    return [m for m in modules if floor_of(m) is None]


def test_every_library_module_has_a_floor():
    lost = unfloored(library_files())
    assert not lost, f"modules on no floor (add them to FLOORS and docs/ARCHITECTURE.md): {lost}"


def upward_imports(graph: dict[str, dict[str, tuple[Path, int, str]]]) -> list[str]:
    """One line per import edge of ``graph`` that goes up a floor."""
    bad = []
    for module, edges in graph.items():
        own = floor_of(module)
        for dep, (path, line, written) in sorted(edges.items()):
            up = floor_of(dep)
            if own is not None and up is not None and up > own:
                bad.append(f"{_where(path, line)}: {module} (floor {FLOOR_NAMES[own]}) imports {dep} "
                           f"(floor {FLOOR_NAMES[up]}) upward: `{written}`")
    return bad


def test_imports_go_one_way_down():
    bad = upward_imports(import_graph())
    assert not bad, "imports that go up a floor:\n" + "\n".join(bad)


def _cycles(graph: dict[str, dict]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one closed path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:
        nonlocal counter
        # iterative DFS: (node, iterator over its successors)
        work = [(v, iter(sorted(graph.get(v, {}))))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, succ = work[-1]
            advanced = False
            for w in succ:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_path_through(graph, comp) for comp in components]


def _path_through(graph: dict[str, dict], comp: list[str]) -> list[str]:
    """A closed import path inside one component, from its first module back to it (breadth-first)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_no_import_circles():
    graph = import_graph()
    lines = []
    for cycle in _cycles(graph):
        steps = []
        for a, b in itertools.pairwise(cycle):
            path, line, written = graph[a][b]
            steps.append(f"    {_where(path, line)}: {a} -> {b} (`{written}`)")
        lines.append(" -> ".join(cycle) + "\n" + "\n".join(steps))
    assert not lines, "import circles:\n" + "\n".join(lines)


def big_files(paths) -> dict[str, int]:
    """``{file: lines}`` of the files over MAX_LINES lines."""
    return {_rel(p): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}


def test_no_library_file_over_600_lines():
    big = big_files(library_files().values())
    assert not big, f"library files over {MAX_LINES} lines: {big}"


def _script_module_names() -> set[str]:
    """Names under which a script could be imported (``train_aligner``, ``tools.align``, ``benchmarks.benchlib``)."""
    names = {"tools", "recipes"}
    for path in _py_files(*SCRIPT_DIRS):
        rel = path.relative_to(ROOT).with_suffix("").parts
        names.add(rel[-1])
        names.add(".".join(rel))
        names.add(".".join(rel[1:]))
    return names - {""}


def script_imports(files: dict[str, Path], scripts: set[str], test_modules: set[str]) -> list[str]:
    """One line per import in ``files`` (``{module name: file}``) of a module named in ``scripts``."""
    library_tops = set(LIBRARY_DIRS)
    bad = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for line, target, names in _imports(tree, module, path.name == "__init__.py"):
            if target.split(".")[0] in library_tops or target in test_modules:
                continue
            hits = [t for t in (target, *(f"{target}.{n}" for n in names)) if t in scripts]
            if hits:
                bad.append(f"{_where(path, line)}: imports the script {hits[0]} (scripts are entry points: "
                           "import the library module it calls, or run it as a subprocess)")
    return bad


def test_no_library_module_or_test_imports_a_script():
    tests = {_module_name(p): p for p in _py_files("tests")}
    bad = script_imports({**library_files(), **tests}, _script_module_names(), {p.stem for p in tests.values()})
    assert not bad, "\n".join(bad)


#: Ways of loading code around the installed packages (the project installs editable: imports just work).
FORBIDDEN = re.compile(r"spec_from_file_location|sys\.path\.(insert|append)|runpy\.run_path")


def path_hacks(paths) -> list[str]:
    """One line per source line of ``paths`` that loads code around the installed packages."""
    bad = []
    for path in paths:
        for n, text in enumerate(path.read_text().splitlines(), 1):
            m = FORBIDDEN.search(text)
            if m:
                bad.append(f"{_where(path, n)}: {m.group(0)}: {text.strip()}")
    return bad


def test_no_path_hacks():
    me = Path(__file__).resolve()  # this file names the patterns it looks for
    bad = path_hacks(p for p in _py_files(*LIBRARY_DIRS, *SCRIPT_DIRS, "tests") if p.resolve() != me)
    assert not bad, "code loaded around the installed packages:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------- the checker
def test_the_checker_sees_function_level_relative_and_type_checking_imports():
    src = ("from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from speechlm.eval import report\n"
           "def f():\n    from ..training import loop\n    import alignment.tokens\n"
           "from . import boundaries\n")
    found = _imports(ast.parse(src), "speechlm.data.batching", is_package=False)
    assert [(t, n) for _, t, n in found] == [("typing", ["TYPE_CHECKING"]), ("speechlm.training", ["loop"]),
                                             ("alignment.tokens", []), ("speechlm.data", ["boundaries"])]
    assert _resolve("speechlm.data", ["boundaries"]) == ["speechlm.data.boundaries"]
    assert floor_of("speechlm.models.connectors.ssr") == 3 and floor_of("alignment.kinds") == 5
    assert floor_of("speechlm.inference") > floor_of("speechlm.eval.report") > floor_of("speechlm.training.loop")


def test_the_cycle_finder_names_the_circle():
    graph = {"a": {"b": 0}, "b": {"c": 0}, "c": {"a": 0, "d": 0}, "d": {}, "e": {"e": 0}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"x": {"y": 0}, "y": {}}) == []


def test_each_check_flags_a_breach(tmp_path):
    """The contract's checks above, fed a breach each (and a near miss that must pass)."""
    assert unfloored(["speechlm.models.encoder", "speechlmx.y", "other"]) == ["speechlmx.y", "other"]

    f = tmp_path / "m.py"
    graph = {"speechlm.models.encoder": {"speechlm.data.corpus": (f, 3, "from speechlm.data import corpus"),
                                         "speechlm.config": (f, 4, "from speechlm import config"),
                                         "speechlm.models.attention": (f, 5, "from . import attention")},
             "speechlm.inference": {"speechlm.eval.report": (f, 5, "from speechlm.eval import report")},
             "speechlm.eval.report": {"speechlm.inference": (f, 6, "from speechlm import inference")}}
    assert [b.split(": ")[1] for b in upward_imports(graph)] == [
        "speechlm.models.encoder (floor models) imports speechlm.data.corpus (floor data) upward",
        "speechlm.eval.report (floor eval) imports speechlm.inference (floor inference) upward"]

    f.write_text("x = 1\n" * MAX_LINES)
    g = tmp_path / "big.py"
    g.write_text("x = 1\n" * (MAX_LINES + 1))
    assert big_files([f, g]) == {str(g): MAX_LINES + 1}

    f.write_text("import gpu_check\nfrom benchmarks import benchlib\nfrom speechlm import align\n"
                 "import test_helpers\nimport json\n")
    scripts = {"gpu_check", "benchmarks.benchlib", "align"}
    assert [b.split(": imports the script ")[1].split(" ")[0] for b in
            script_imports({"tests.test_x": f}, scripts, {"test_helpers"})] == ["gpu_check", "benchmarks.benchlib"]

    f.write_text("import sys\nsys.path.insert(0, '.')\nsys.path.append('x')\nsys.pathology = 1\n"
                 "import runpy\nrunpy.run_path('a.py')\nimportlib.util.spec_from_file_location('m', 'm.py')\n")
    assert [b.split(": ")[0].rsplit(":", 1)[1] for b in path_hacks([f])] == ["2", "3", "6", "7"]
