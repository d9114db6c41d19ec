"""The package's shape: no import circles between its modules (kernels and models included),
and nothing too long to hold in one's head: no function over 80 lines, no class over 400, no module
over 400 lines of code (docstrings and comments aside). docs/usage.md's options are the config's.

Every `import` / `from ... import` of a package module counts, at any depth of the file (a function's
lazy import, an `if TYPE_CHECKING:` block): a circle hidden that way is still one a reader has to
untangle. The compiled core (`_C`) is a leaf.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "splitreason_engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each package module's package modules, by name."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                names = [a.name for a in node.names if a.name != "_C"]
                subs = {f"{base}.{n}" for n in names if f"{base}.{n}" in files}
                found |= subs | ({base} if len(subs) < len(names) else set())
        edges[name] = {m for m in found if m in files and m != name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circles():
    edges = imports()
    assert "splitreason_engine.engine" in edges and "splitreason_engine.kernels.ops" in edges
    assert "splitreason_engine.parallel" in edges["splitreason_engine.runner"]  # the finder sees imports
    found = circles(edges)
    assert not found, "import circles: " + "; ".join(
        " <-> ".join(g) + " (" + ", ".join(f"{m} -> {sorted(edges[m] & set(g))}" for m in g) + ")" for g in found)


MAX_FUNCTION, MAX_CLASS, MAX_MODULE_CODE = 80, 400, 400


def code_lines(source: str) -> int:
    """Lines that are neither blank, comments nor docstrings."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docstrings)


def test_code_lines_skip_docstrings_and_comments():
    assert code_lines('"""doc\nmore"""\n# note\n\nx = 1\ndef f():\n    """doc"""\n    return x\n') == 3


def test_no_function_class_or_module_is_too_long():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if code_lines(source) > MAX_MODULE_CODE:
            too_long.append(f"{module_name(path)}: {code_lines(source)} lines of code")
        for node in ast.walk(ast.parse(source)):
            limit = (MAX_FUNCTION if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     else MAX_CLASS if isinstance(node, ast.ClassDef) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "over the limits: " + "; ".join(too_long)


def test_the_options_table_in_the_docs_is_the_configs():
    """docs/usage.md documents the engine's options with EngineConfig's own table (field, default,
    CLI flag, help): edit the field, then paste options_table() between the markers."""
    from splitreason_engine.engine_config import options_table

    text = (PACKAGE.parent / "docs" / "usage.md").read_text()
    between = text.split("<!-- options:start -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert between == options_table()
