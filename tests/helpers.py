"""What several test modules share besides conftest's fixtures: training a run of the 4-generator
workspace (`tws`, in conftest.py) as `leakpipe train` does, reading its weights, and leakpipe's modules
with the leakpipe imports of each, read from the source (the layer and code identity tests)."""

import ast
import functools
from pathlib import Path

from safetensors.torch import load_file

import leakpipe.pipeline
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import embed, graph, train

ROOT = Path(leakpipe.pipeline.__file__).parent.parent  # the checkout: pipeline/, stages/, workflows/

FAST = ["train.epochs=3", "model.embed_dim=16", "model.prototypes_per_class=2"]


def train_run(root, run, *sets):
    """Train, then embed every encoded split, as `leakpipe train` does."""
    ws = Workspace(root)
    cfg = ws.config(None, [*FAST, *sets])
    result = train.run(graph(ws, cfg), run, log=lambda m: None)
    embed.run(graph(ws, cfg), run, log=lambda m: None)
    return result


def weights(root, run):
    return load_file(str(train.run_dir(Workspace(root), run) / "model.safetensors"))


@functools.cache
def modules() -> dict[str, Path]:
    """Every leakpipe module by its import name, with its file (scanned once per session)."""
    out = {}
    for folder, package in (
        ("pipeline", "leakpipe.pipeline"),
        ("stages", "leakpipe.stages"),
        ("workflows", "leakpipe.workflows"),
    ):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            name = ".".join((package, *rel.parts))
            out[name.removesuffix(".__init__")] = path
    return out


@functools.cache
def source_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _type_only(tree: ast.AST) -> set[int]:
    """Line numbers of the imports under `if TYPE_CHECKING:`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


@functools.cache
def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each leakpipe import of a module, lazy ones inside functions too; `from a import
    b` imports module a.b when there is one, else a. Imports under `if TYPE_CHECKING:` are left out."""
    tree = source_tree(path)
    skip = _type_only(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            full = [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, f if f in modules() else node.module) for f in full]
    return [(line, name) for line, name in out if name.startswith("leakpipe.")]
