"""The layout rules, read from the source (ast; nothing is imported): no import cycle among luq's modules
(function-level imports count too), the core never imports the zoo of demo and test models, and the
benches use luq only through its public names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "luq").rglob("*.py"))}


def imported(tree: ast.AST, importer: str, is_package: bool) -> list[tuple[str, int]]:
    """(luq module, line) of every import in `tree`, at any depth: `from luq import x` names
    the submodule luq.x where there is one, else luq itself; relative imports are resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return [(name, line) for name, line in found if name == "luq" or name.startswith("luq.")]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {target for target, _ in imported(tree, name, path.name == "__init__.py")}
        graph[name] = {t for t in targets if t in MODULES and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_luq_modules():
    assert cycles(import_graph()) == []


def test_the_core_never_imports_the_zoo():
    """Only the zoo imports the zoo: a built-in model name or the default calibration text reaches it as
    a "module:function" string (luq.models.loading.BUILTIN, luq.calibration.DEFAULT_TEXT)."""
    bad = []
    for name, path in MODULES.items():
        if name == "luq.zoo" or name.startswith("luq.zoo."):
            continue
        tree = ast.parse(path.read_text(), str(path))
        bad += [f"{path.relative_to(ROOT)}:{line} imports {mod}"
                for mod, line in imported(tree, name, path.name == "__init__.py")
                if mod == "luq.zoo" or mod.startswith("luq.zoo.")]
    assert not bad, "\n".join(bad)


def test_the_benches_use_only_public_luq_names():
    bad = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()  # the local names bound to luq, its modules or its names
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {alias.asname or "luq" for alias in node.names if alias.name.split(".")[0] == "luq"}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "luq":
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.endswith("__"):  # __version__ is public
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
                    aliases.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute) and _root_name(sub) in aliases:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} assigns to {ast.unparse(sub)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and node.args:
                owner = node.args[0]  # monkeypatch.setattr(luq.x, ...) / setattr(luq.x, ...)
                if _root_name(owner) in aliases or (isinstance(owner, ast.Constant) and str(owner.value).startswith("luq.")):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} sets an attribute of {ast.unparse(owner)}")
    assert not bad, "\n".join(bad)


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None
