"""What code a function reaches, read from leakpipe's source (never imported).

A module's *units* are its top-level functions, classes and assignments, plus one unit of the statements
that bind no name (what runs on import). A unit refers to another by a name: one defined in its module,
one imported from a leakpipe module (`from leakpipe.pipeline.math import dct` then `dct.lowpass`, or
`from leakpipe.pipeline.math.dct import lowpass`), at module level or inside a function (a lazy import).
`reach` follows those references from a few roots, across modules, and returns every unit it meets: the
names a function's code can call, construct or read. A module named bare (passed as a value, or handed to
`getattr`) counts as all of its units. Each unit carries the hash of its normalised source (comments,
docstrings, formatting and type annotations dropped, a class's fields aside), so the result is a code
identity at the granularity of a function.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.store.hashing import hash_bytes

PACKAGE = "leakpipe."
TOP = "<module>"  # the unit of a module's statements that bind no name: they run when it is imported
WHOLE = "*"  # a reference to a module itself (named bare): all of its units
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@dataclass(frozen=True)
class Unit:
    hash: str  # of its normalised source: the statements that bind its name, docstrings and types dropped
    refs: frozenset[tuple[str, str]]  # (module, name); name WHOLE: the whole module


@dataclass(frozen=True)
class Module:
    units: dict[str, Unit]  # by the name they bind (a name bound twice: both statements are one unit)
    imported: dict[str, tuple[str, str]]  # a top-level name imported from leakpipe -> (module, name or WHOLE)
    external: frozenset[str]  # the top-level names imported from outside leakpipe (torch, numpy ...)


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def strip_docstrings(body: list[ast.stmt], scope: bool = True) -> list[ast.stmt]:
    """The statements without the docstrings of the module (`scope`), classes and functions in them: the
    blocks of compound statements are walked, never their expressions (lambdas have no docstrings)."""
    if scope and body and _is_docstring(body[0]):
        body = body[1:] or [ast.Pass()]
    for node in body:
        for block in ("body", "orelse", "finalbody"):
            stmts = getattr(node, block, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                setattr(node, block, strip_docstrings(stmts, block == "body" and isinstance(node, _DEFS)))
        for handler in (*getattr(node, "handlers", ()), *getattr(node, "cases", ())):
            handler.body = strip_docstrings(handler.body, False)
    return body


@functools.lru_cache(maxsize=None)
def _package_dir(package: str) -> Path | None:
    """The folder of `leakpipe.pipeline`, `leakpipe.stages` or `leakpipe.workflows` (found, not imported)."""
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@functools.lru_cache(maxsize=None)
def source_path(module: str) -> Path | None:
    """The file of a leakpipe module, found without importing anything below its top package (finding
    `a.b.c` with importlib would import `a.b`, and torch with it); None if there is no such module."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "leakpipe":
        return None
    base = _package_dir(".".join(parts[:2]))
    if base is None:
        return None
    rest = parts[2:]
    for path in ([base.joinpath(*rest).with_suffix(".py")] if rest else []) + [base.joinpath(*rest, "__init__.py")]:
        if path.is_file():
            return path
    return None


def is_module(name: str) -> bool:
    return name.startswith(PACKAGE) and source_path(name) is not None


def _imports(node: ast.AST) -> dict[str, tuple[str, str] | None]:
    """The names an import statement binds: name -> (leakpipe module, name or WHOLE), None if the name
    comes from outside leakpipe."""
    out: dict[str, tuple[str, str] | None] = {}
    if isinstance(node, ast.Import):
        for a in node.names:  # `import leakpipe.x.y as z` binds z; without `as`, the top name
            inside = a.name.startswith(PACKAGE)
            out[a.asname or a.name.split(".")[0]] = (a.name if a.asname else "leakpipe", WHOLE) if inside else None
    elif isinstance(node, ast.ImportFrom):
        inside = bool(node.module) and node.module.startswith(PACKAGE) and not node.level
        for a in node.names:
            full = f"{node.module}.{a.name}"
            out[a.asname or a.name] = ((full, WHOLE) if is_module(full) else (node.module, a.name)) if inside else None
    return out


def _bound(stmt: ast.stmt) -> list[str]:
    """The top-level names a statement binds (a def, a class, assignment targets, names bound inside a
    top-level `if` or `try`)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(stmt, (ast.If, ast.Try)):
        inner = [s for s in ast.walk(stmt) if isinstance(s, ast.stmt) and s is not stmt]
        return [n for s in inner if not isinstance(s, (ast.Import, ast.ImportFrom)) for n in _bound(s)]
    return []


def _attribute_chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """`a.b.c` as ("a", ["b", "c"]); None if it does not start at a name."""
    parts: list[str] = []
    at: ast.expr = node
    while isinstance(at, ast.Attribute):
        parts.append(at.attr)
        at = at.value
    return (at.id, parts[::-1]) if isinstance(at, ast.Name) else None


def _resolve(target: tuple[str, str], attrs: list[str]) -> tuple[str, str]:
    """A module reference followed by attributes: `dct.lowpass` -> (dct's module, "lowpass"), a
    submodule's attribute through the submodule; what is not a name of a module stays the module."""
    module, name = target
    for attr in attrs:
        if name != WHOLE:
            break
        if is_module(f"{module}.{attr}"):
            module = f"{module}.{attr}"
        else:
            name = attr
    return module, name


def _arguments(args: ast.arguments) -> list[ast.arg]:
    return [a for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a is not None]


def _header(node) -> list[ast.AST]:
    """What a def evaluates where it is defined: decorators, defaults, annotations."""
    args = node.args
    out = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
    if not isinstance(node, ast.Lambda):
        out += [*node.decorator_list, *(a.annotation for a in _arguments(args) if a.annotation)]
        out += [node.returns] if node.returns else []
    return out


def _class_scope(node: ast.ClassDef, lazy: dict) -> list:
    """A class body is a scope its methods do not see: a method's name, decorators and defaults are
    read in it, its body in the scope around the class."""
    methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    rest = [n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    free = _scope(rest + [h for m in methods for h in _header(m)], {m.name for m in methods}, lazy)
    for m in methods:
        free += _scope(m.body, {a.arg for a in _arguments(m.args)}, lazy)
    return free


def _scope(nodes: list, bound: set[str], lazy: dict) -> list[tuple[str, list[str]]]:
    """The names read in one scope's `nodes`, and by the scopes nested in it, that the scope does not
    bind (`bound`: its parameters, then what it assigns, loops over, catches or defines; not what it
    declares `global`), as (name, attributes read from it): `dct.lowpass(x)` is ("dct", ["lowpass"]).
    Records the leakpipe imports it meets in `lazy`. One pass: this reads every unit status reaches."""
    reads: list[tuple[str, list[str]]] = []
    own, declared, stack = set(bound), set(), list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            own.update([node.name] if not isinstance(node, ast.Lambda) else [])
            stack += _header(node)
            body = node.body if isinstance(node.body, list) else [node.body]
            reads += _scope(body, {a.arg for a in _arguments(node.args)}, lazy)
        elif isinstance(node, ast.ClassDef):
            own.add(node.name)
            stack += [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
            reads += _class_scope(node, lazy)
        elif isinstance(node, _COMPREHENSIONS):  # its first iterable is read outside, the rest inside
            gens = node.generators
            stack.append(gens[0].iter)
            inner = [g.target for g in gens] + [g.iter for g in gens[1:]] + [c for g in gens for c in g.ifs]
            inner += [getattr(node, k) for k in ("elt", "key", "value") if getattr(node, k, None) is not None]
            reads += _scope(inner, set(), lazy)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            lazy.update(_imports(node))
        elif isinstance(node, ast.Global):
            declared.update(node.names)
        elif isinstance(node, ast.Attribute) and (chain := _attribute_chain(node)) is not None:
            reads.append(chain)
        elif isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                reads.append((node.id, []))
            else:
                own.add(node.id)
        else:
            if isinstance(node, ast.ExceptHandler) and node.name:
                own.add(node.name)
            stack.extend(ast.iter_child_nodes(node))
    local = own - declared
    return [r for r in reads if r[0] not in local]


def _refs(stmt: ast.stmt, names: set[str], imported: dict, module: str) -> frozenset[tuple[str, str]]:
    """What a unit's code refers to: (module, name) of leakpipe units, (module, WHOLE) for a bare module."""
    lazy: dict[str, tuple[str, str] | None] = {}
    free = _scope([stmt], set(), lazy)
    refs = set()
    for name, attrs in free:
        if name in lazy:  # a lazy import binds in its function, before the module's names
            target = lazy[name]
        elif name in names:
            target = (module, name)
        else:
            target = imported.get(name)
        if target is not None and target[0] != "leakpipe":
            refs.add(_resolve(target, attrs))
    return frozenset(refs)


def _only_imports(stmt: ast.stmt) -> bool:
    """`if TYPE_CHECKING:` imports, `try: import x except ImportError: ...` fallbacks."""
    if not isinstance(stmt, (ast.If, ast.Try)):
        return False
    inner = [s for s in ast.walk(stmt) if isinstance(s, ast.stmt) and s is not stmt]
    return all(isinstance(s, (ast.Import, ast.ImportFrom, ast.Pass)) for s in inner)


def drop_types(body: list[ast.stmt], fields: bool = False) -> list[ast.stmt]:
    """The statements without their annotations (a function's arguments and return, a variable's): types,
    which never change what runs, so tightening them changes no identity. The annotations of a class body
    stay (`fields`: they are a dataclass's fields). Walks statements, never expressions."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in _arguments(node.args):
                a.annotation = None
            node.returns = None
            node.body = drop_types(node.body)
        elif isinstance(node, ast.ClassDef):
            node.body = drop_types(node.body, fields=True)
        elif isinstance(node, ast.AnnAssign) and not fields:
            bare = ast.Assign([node.target], node.value, None) if node.value is not None else ast.Pass()
            node = ast.copy_location(bare, node)
        else:
            for block in ("body", "orelse", "finalbody"):
                stmts = getattr(node, block, None)
                if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                    setattr(node, block, drop_types(stmts, fields))
            for handler in (*getattr(node, "handlers", ()), *getattr(node, "cases", ())):
                handler.body = drop_types(handler.body, fields)
        out.append(node)
    return out


@functools.lru_cache(maxsize=None)
def _parse(module: str, path: str, mtime_ns: int) -> Module:  # the mtime: an edit in this process counts
    tree = ast.parse(Path(path).read_text(), path)
    imported: dict[str, tuple[str, str] | None] = {}
    of: dict[str, list[ast.stmt]] = {}  # a name -> the statements that bind it, in order
    for stmt in strip_docstrings(tree.body):
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or _only_imports(stmt):
            imported.update({k: v for s in ast.walk(stmt) for k, v in _imports(s).items()})
        else:
            for name in _bound(stmt) or [TOP]:
                of.setdefault(name, []).append(stmt)
    names = set(of) - {TOP}
    refs = {name: frozenset().union(*(_refs(s, names, imported, module) for s in stmts)) for name, stmts in of.items()}
    # types dropped after the references (a parameter's annotation names the class whose methods run); the
    # syntax trees are not kept: a process that holds every module's tree spends a second freeing them
    units = {
        name: Unit(hash_bytes("\n".join(ast.unparse(s) for s in drop_types(stmts)).encode()), refs[name])
        for name, stmts in of.items()
    }
    inside = {k: v for k, v in imported.items() if v is not None}
    return Module(units, inside, frozenset(k for k, v in imported.items() if v is None))


def parsed(module: str) -> Module:
    """A leakpipe module's units, parsed once per version of its file."""
    path = source_path(module)
    if path is None:
        raise UserError(f"code: {module!r} is not a leakpipe module with Python source")
    return _parse(module, str(path), path.stat().st_mtime_ns)


def unit_of(module: str, name: str, seen: frozenset = frozenset(), parse=parsed) -> tuple[str, str] | None:
    """The unit that defines `name` in `module`, through re-exports (`from x import name` in module); None
    for a name the module imports from outside leakpipe, or a module attribute (`__file__`)."""
    m = parse(module)
    if name in m.units or name in (TOP, WHOLE):
        return module, name
    if name in m.imported and (module, name) not in seen:
        return unit_of(*m.imported[name], seen | {(module, name)}, parse)
    if name in m.external or name.startswith("__"):
        return None
    raise UserError(f"code: {module} has no top-level name {name!r}")


Ref = tuple[str, str]  # (module, unit)


def _ref(entry: str) -> Ref:
    module, _, name = entry.partition(":")
    return module, name


def walk(roots: tuple[str, ...], skip: frozenset[str] = frozenset()) -> dict[Ref, Ref | None]:
    """{(module, unit): the unit that first reached it (None for a root)} of every unit the roots
    ("module:name") reach, not entering the modules in `skip`. A module's TOP unit comes with the first
    of its units reached (it runs on import)."""
    todo: list[tuple[Ref, Ref | None]] = [(_ref(r), None) for r in roots]
    found: dict[Ref, Ref | None] = {}
    parse = functools.lru_cache(maxsize=None)(parsed)  # each file's mtime read once per walk
    while todo:
        (module, name), parent = todo.pop()
        if (module, name) in found or module in skip:
            continue
        found[(module, name)] = parent
        m = parse(module)
        if name == WHOLE:
            todo += [((module, n), (module, name)) for n in m.units]
        elif name in m.units:
            refs = (unit_of(*r, parse=parse) for r in m.units[name].refs if r[0] not in skip)
            todo += [(r, (module, name)) for r in refs if r is not None]
            todo.append(((module, TOP), (module, name)))
    return found


_REACHED: dict[tuple, tuple[dict[str, str], dict[Path, int]]] = {}


def _mtimes(modules: set[str]) -> dict[Path, int]:
    paths = [source_path(m) for m in modules]
    return {p: p.stat().st_mtime_ns for p in paths if p is not None}


def _unchanged(files: dict[Path, int]) -> bool:
    try:
        return all(p.stat().st_mtime_ns == t for p, t in files.items())
    except OSError:
        return False


def reach(roots: tuple[str, ...], skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """{"module:unit": hash of its normalised source} of every unit the roots reach (see `walk`),
    remembered until a file it read changes: status asks once per stage instance."""
    known = _REACHED.get((roots, skip))
    if known is not None and _unchanged(known[1]):
        return dict(known[0])
    found = walk(roots, skip)
    units = {(m, n): parsed(m).units.get(n) for m, n in found}
    identity = {f"{m}:{n}": u.hash for (m, n), u in sorted(units.items()) if u is not None}
    _REACHED[(roots, skip)] = (dict(identity), _mtimes({m for m, _ in found}))
    return identity


def trail(roots: tuple[str, ...], unit: str, skip: frozenset[str] = frozenset()) -> list[str]:
    """How the roots reach `unit` ("module:name"): the chain of units from a root to it."""
    found, out = walk(roots, skip), []
    at: Ref | None = _ref(unit)
    while at is not None:
        out.append(":".join(at))
        at = found[at]
    return out[::-1]
