"""House rules of the package, checked on its source with the ``ast`` module (no imports run).

* no private name of one module used in another (``from vpl_plugin.x import _y`` or ``x._y``);
  importing a private *module* (``vpl_plugin._io``) is fine, that is what the underscore is for;
* every public function and method annotates its parameters and its return;
* no function body (docstring excluded) is longer than 150 lines;
* no import cycle between the package's modules, counting imports inside functions too (the ones
  under ``if TYPE_CHECKING:`` never run and are left out).

Known offenders in modules being rewritten are listed in the ``ALLOWED_*`` sets below; each entry
is reported when it is no longer needed, so the lists only shrink.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple


PACKAGE = "vpl_plugin"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_BODY_LINES = 150

# -- allow-lists: today's offenders in modules being rewritten (the CLI package, the demo). Empty
# them as those rewrites land; an entry that no longer matches an offence fails the test. --------
ALLOWED_PRIVATE_USES: Set[Tuple[str, str]] = set()  # (module using the name, "defining_module._name")
ALLOWED_UNANNOTATED: Set[str] = set()
ALLOWED_LONG_BODIES: Set[str] = set()
ALLOWED_CYCLES: Set[frozenset] = set()


# -- the package as data -------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES: Dict[str, ast.Module] = {name: ast.parse(p.read_text(), str(p)) for name, p in MODULES.items()}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(module: str, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.Module) -> Set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imports there never run)."""
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(module: str) -> Iterator[Tuple[ast.AST, str, Optional[str], Optional[str]]]:
    """(node, source module, imported name or None, bound alias) for each package import."""
    tree = TREES[module]
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield node, alias.name, None, alias.asname
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            if source and (source == PACKAGE or source.startswith(PACKAGE + ".")):
                for alias in node.names:
                    yield node, source, alias.name, alias.asname or alias.name


# -- rule 1: private names -------------------------------------------------------------------------
def _private_uses() -> Set[Tuple[str, str]]:
    found = set()
    for module in MODULES:
        aliases: Dict[str, str] = {}  # local name -> package module it is bound to
        for _node, source, name, bound in _imports(module):
            if name is None:
                if bound:
                    aliases[bound] = source
                continue
            target = f"{source}.{name}"
            if target in MODULES:  # `from vpl_plugin import _io`: a module, bound to a local name
                aliases[bound or name] = target
                continue
            if _is_private(name) and source != module:
                found.add((module, target))
        for node in ast.walk(TREES[module]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _is_private(node.attr)):
                owner = aliases[node.value.id]
                if f"{owner}.{node.attr}" not in MODULES and owner != module:
                    found.add((module, f"{owner}.{node.attr}"))
    return found


def test_no_private_names_across_modules():
    found = _private_uses()
    new = sorted(found - ALLOWED_PRIVATE_USES)
    assert not new, ("private names used outside their module (make them public, or move them to "
                     "the module that uses them):\n" + "\n".join(f"  {m} uses {t}" for m, t in new))
    stale = sorted(ALLOWED_PRIVATE_USES - found)
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


# -- rule 2: annotations ---------------------------------------------------------------------------
def _public_functions() -> Iterator[Tuple[str, ast.AST]]:
    """(qualified name, node) of public module-level functions and public methods of public classes."""
    for module, tree in TREES.items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_private(node.name):
                yield f"{module}.{node.name}", node
            elif isinstance(node, ast.ClassDef) and not _is_private(node.name):
                for item in node.body:
                    if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                            and not _is_private(item.name)):
                        yield f"{module}.{node.name}.{item.name}", item


def _missing_annotations(node) -> List[str]:
    args = node.args
    params = list(args.posonlyargs) + list(args.args) + list(args.kwonlyargs)
    params += [a for a in (args.vararg, args.kwarg) if a is not None]
    is_method = bool(args.args) and args.args[0].arg in ("self", "cls", "mcs")
    decorators = {getattr(d, "id", getattr(d, "attr", "")) for d in node.decorator_list}
    if "staticmethod" in decorators:
        is_method = False
    bound = args.args[0] if is_method else None  # self / cls needs no annotation
    missing = [a.arg for a in params if a.annotation is None and a is not bound]
    if node.returns is None and node.name != "__init__":
        missing.append("return")
    return missing


def _unannotated() -> Dict[str, List[str]]:
    out = {}
    for qualname, node in _public_functions():
        missing = _missing_annotations(node)
        if missing:
            out[qualname] = missing
    return out


def test_public_functions_are_annotated():
    found = _unannotated()
    new = {k: v for k, v in sorted(found.items()) if k not in ALLOWED_UNANNOTATED}
    assert not new, ("public functions without annotations (parameter names, or 'return'):\n"
                     + "\n".join(f"  {k}: {', '.join(v)}" for k, v in new.items()))
    stale = sorted(ALLOWED_UNANNOTATED - set(found))
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


# -- rule 3: function length -----------------------------------------------------------------------
def _body_lines(node) -> int:
    body = node.body
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]  # the docstring
    if not body:
        return 0
    return node.end_lineno - body[0].lineno + 1


def _long_bodies() -> Dict[str, int]:
    out = {}
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_BODY_LINES:
                    out[f"{module}.{node.name} (line {node.lineno})"] = n
    return out


def test_no_function_body_over_150_lines():
    found = _long_bodies()
    names = {k.split(" (line")[0]: v for k, v in found.items()}
    new = {k: v for k, v in sorted(names.items()) if k not in ALLOWED_LONG_BODIES}
    assert not new, (f"function bodies over {MAX_BODY_LINES} lines (docstring excluded); split them:\n"
                     + "\n".join(f"  {k}: {v} lines" for k, v in new.items()))
    stale = sorted(ALLOWED_LONG_BODIES - set(names))
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


# -- rule 4: import cycles -------------------------------------------------------------------------
def _import_graph() -> Dict[str, Set[str]]:
    """module -> package modules it imports (at import time or inside functions)."""
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for _node, source, name, _bound in _imports(module):
            target = f"{source}.{name}" if name is not None and f"{source}.{name}" in MODULES else source
            while target not in MODULES and "." in target:  # `import vpl_plugin.x.Y`-like oddities
                target = target.rsplit(".", 1)[0]
            if target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_init(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_no_import_cycles():
    # A package's __init__ re-exports its submodules, and a submodule importing a sibling through
    # the package (`from vpl_plugin.data import voc`) goes through that __init__: such edges
    # back into an __init__ are not cycles of code, so an __init__ only takes part via its own
    # imports (edges *out* of it).
    graph = {m: {t for t in targets if not _is_package_init(t)} for m, targets in _import_graph().items()}
    found = {frozenset(c) for c in _cycles(graph)}
    new = sorted(sorted(c) for c in found - ALLOWED_CYCLES)
    assert not new, "import cycles (move the shared names to a module both can import):\n" + "\n".join(
        "  " + " <-> ".join(c) for c in new)
    stale = [sorted(c) for c in ALLOWED_CYCLES - found]
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


# -- the checker itself ----------------------------------------------------------------------------
def test_checker_finds_planted_offences(monkeypatch):
    """Each rule fires on a small planted module (so an empty result above means something)."""
    planted = {
        "vpl_plugin.fake_a": ("from vpl_plugin.fake_b import _hidden\n"
                              "import vpl_plugin.fake_b as fb\n"
                              "def public(x, y: int):\n    return fb._other\n"),
        "vpl_plugin.fake_b": ("def _hidden() -> None:\n    pass\n"
                              "def f() -> None:\n    from vpl_plugin import fake_a\n"
                              + "    x = 1\n" * (MAX_BODY_LINES + 1)),
    }
    monkeypatch.setattr(sys.modules[__name__], "TREES", {k: ast.parse(v) for k, v in planted.items()})
    monkeypatch.setattr(sys.modules[__name__], "MODULES",
                        {k: Path(f"/planted/{k.split('.')[-1]}.py") for k in planted})
    assert _private_uses() == {("vpl_plugin.fake_a", "vpl_plugin.fake_b._hidden"),
                               ("vpl_plugin.fake_a", "vpl_plugin.fake_b._other")}
    assert _unannotated() == {"vpl_plugin.fake_a.public": ["x", "return"]}
    assert list(_long_bodies().values()) == [MAX_BODY_LINES + 2]  # the import and the assignments
    assert _cycles(_import_graph()) == [["vpl_plugin.fake_a", "vpl_plugin.fake_b"]]

