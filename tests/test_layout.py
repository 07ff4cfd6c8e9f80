"""Package layout, read from the source (AST, nothing imported): no import cycle in any package
or across them (imports inside functions count), what each package may import, and the mirrored
pieces of the two frameworks carry the same names and parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dba", "cli", "jax_model", "torch_ref", "train", "torch_train", "bench")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Every Import/ImportFrom under `node`, at any depth (inside functions and classes too),
    except in the body of an `if TYPE_CHECKING:` block."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield from _imports(ast.Module(body=[sub], type_ignores=[]))
            continue
        yield from _imports(child)


def _modules(*packages: str) -> dict[str, Path]:
    """Dotted module name -> file, each package's __init__ under the package's own name."""
    out = {}
    for package in packages:
        for path in sorted((REPO / package).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Edges module -> the modules of the given packages it imports. `from pkg import name` points
    at the submodule `pkg.name` when there is one, else at the package's __init__ (importing a
    submodule runs the package's __init__ first, but only once: that is no cycle of ours)."""
    modules = _modules(*packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.stem == "__init__" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    base = ".".join(filter(None, [here.rsplit(".", node.level - 1)[0], base]))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph(package)
    assert len(graph) >= 4 and all(name.startswith(package) for name in graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in {package}: {' -> '.join(cycle)}"


def test_no_import_cycle_across_packages():
    graph = import_graph(*PACKAGES)
    assert {"train.run", "train.jax_backend", "torch_train.backend"} <= graph["cli.train"]
    assert "jax_model" in graph["train.jax_backend"] and "torch_ref.optim" in graph["torch_train.step"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_cycle_finder_sees_imports_inside_functions(tmp_path):
    graph = {"p": set(), "p.a": {"p.b"}, "p.b": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]
    tree = ast.parse("def f():\n    import p.b\nif TYPE_CHECKING:\n    import p.c\nelse:\n    import p.d\n")
    assert [n.names[0].name for n in _imports(tree)] == ["p.b", "p.d"]


def _signatures(path: Path) -> dict[str, list[str]]:
    """'name' / 'Class.method' -> parameter names (keyword-only ones after a '*')."""
    out: dict[str, list[str]] = {}

    def params(fn: ast.FunctionDef) -> list[str]:
        a = fn.args
        names = [x.arg for x in a.posonlyargs + a.args]
        if a.vararg:
            names.append("*" + a.vararg.arg)
        elif a.kwonlyargs:
            names.append("*")
        return names + [x.arg for x in a.kwonlyargs]

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            out[node.name] = []
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = params(item)
    return out


# The mirrored public pieces: the same name and parameters in both frameworks.
MIRRORED = {
    "model": ["DBAModel.as_tokens", "DBAModel.embed", "DBAModel.unembed", "DBAModel.forward_cached",
              "Attention.queries_and_kv", "Attention.kv_heads", "Attention.null_kv"],
    "cached_attention": ["cached_attend", "rotate_queries"],
    "loss": ["cross_entropy"],
    "layers": ["rope_cos_sin", "apply_rope", "split_heads", "merge_heads", "kv_heads", "hadamard"],
    "decode": ["prefill", "decode_step", "decode_logits"],
    "sampling": ["generate", "filter_logits"],
    "evaluate": ["score_policy", "decode_step_seconds"],
    "recache": ["recache"],
    "kvcache": ["quantize", "dequantize", "StreamCache", "LayerCache", "Cache", "Cache.layer", "Cache.with_layers",
                "nbytes", "write"],
}


@pytest.mark.parametrize("module", sorted(MIRRORED))
def test_mirrors_share_names_and_parameters(module):
    jax_sigs = _signatures(REPO / "jax_model" / f"{module}.py")
    torch_sigs = _signatures(REPO / "torch_ref" / f"{module}.py")
    for name in MIRRORED[module]:
        assert name in jax_sigs and name in torch_sigs, (module, name)
        assert jax_sigs[name] == torch_sigs[name], (module, name, jax_sigs[name], torch_sigs[name])


def test_attention_and_block_take_and_return_a_cache():
    """Attention/Block: (x, positions, cache=None, *, ..., fresh, decode_block, cache_attend); JAX
    adds its `deterministic` flag (torch reads `self.training`). The attention over the cache is
    an argument (`cache_attend`, threaded from `DBAModel.forward_cached`), never module state."""
    for package, call in (("jax_model", "__call__"), ("torch_ref", "forward")):
        sigs = _signatures(REPO / package / "model.py")
        for cls in ("Attention", "Block"):
            params = [p for p in sigs[f"{cls}.{call}"] if p != "deterministic"]
            assert params[:4] == ["self", params[1], "positions", "cache"], (package, cls, params)
            assert params[4:] == ["*", "fresh", "decode_block", "cache_attend"], (package, cls, params)
        assert sigs["DBAModel.forward_cached"][-1] == "cache_attend", (package, sigs["DBAModel.forward_cached"])


@pytest.mark.parametrize("package,kernels", [("jax_model", "pallas_decode"), ("torch_ref", "triton_decode")])
def test_model_imports_neither_decode_nor_the_kernels(package, kernels):
    """The model files show the model: the decode functions call it, the fused decode kernel is
    passed in by them (`cache_attend`), so model.py imports neither, at any depth."""
    graph = import_graph(package)
    reach, todo = set(), [f"{package}.model"]
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    for banned in (f"{package}.decode", f"{package}.{kernels}", f"{package}.sampling", f"{package}.evaluate"):
        assert banned not in reach, (banned, sorted(reach))


# ---- what each package may import ------------------------------------------------------------
# dba/ is the framework-free core; torch_ref/ never needs JAX (a Mac user of the torch path installs
# none) and jax_model/ never needs torch; bench/ imports no test module.
FORBIDDEN = {
    "dba": ("jax", "jaxlib", "flax", "optax", "orbax", "torch", "jax_model", "torch_ref", "train", "cli", "bench"),
    "torch_ref": ("jax", "jaxlib", "flax", "optax", "orbax", "jax_model", "train", "cli"),
    "jax_model": ("torch", "torch_ref", "train", "cli"),
    "train": ("torch", "torch_ref", "torch_train", "cli"),
    # the PyTorch trainer: train/'s framework-free loop and torch_ref, never JAX itself
    "torch_train": ("jax", "jaxlib", "flax", "optax", "orbax", "jax_model", "cli"),
    "bench": ("tests", "parity_tests", "cli"),
}


def _top_level_imports(path: Path) -> set[str]:
    out = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def _module_files(package: str) -> list[Path]:
    """The package's modules: its .py files in folders that are packages all the way down (a
    folder without an __init__.py is data, e.g. dba/hf_remote/: the code a Hugging Face export
    carries, which tests/test_hf_export.py checks imports torch and transformers only)."""
    root, out = REPO / package, []
    for path in sorted(root.rglob("*.py")):
        d = path.parent
        while d != root and (d / "__init__.py").exists():
            d = d.parent
        if d == root:
            out.append(path)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_it_may(package):
    bad = {}
    for path in _module_files(package):
        found = _top_level_imports(path) & set(FORBIDDEN[package])
        if found:
            bad[str(path.relative_to(REPO))] = sorted(found)
    assert not bad, f"{package}/ may not import {', '.join(FORBIDDEN[package])}: {bad}"


_BLOCKED_IMPORT = """
import importlib, pkgutil, sys
BLOCKED = {blocked!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the test: {{name}}")
        return None

sys.meta_path.insert(0, Block())
import dba
names = [m.name for m in pkgutil.walk_packages(dba.__path__, "dba.")]
for name in names:
    importlib.import_module(name)
from dba import KVPolicy, ModelConfig, human_bytes, kv_bytes
cfg = ModelConfig(vocab_size=50257, n_layer=12, n_head=12, d_model=768, attn_mode="decoupled", sem_dim=48,
                  geo_dim=96, attn_dim=144)
assert human_bytes(kv_bytes(cfg, 256)["total_bytes"]) == "1.69MB"
print(len(names), "modules")
"""


@pytest.mark.slow
def test_dba_imports_with_both_frameworks_blocked():
    """Every module of dba/ imports (and the KV accounting runs) in a fresh interpreter where
    importing JAX, torch or any package above dba/ fails."""
    import subprocess
    import sys

    code = _BLOCKED_IMPORT.format(blocked=FORBIDDEN["dba"])
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[0]) >= 15


# ---- the README's module map names every module -----------------------------------------------
MAPPED = ("dba", "jax_model", "torch_ref", "train", "torch_train", "cli", "bench")


def readme_module_map(text: str | None = None) -> dict[str, set[str]]:
    """{package: module files named under its heading} in the README's Architecture map (the first
    code block after '## Architecture'): a heading is `pkg/` at the start of a line, entries are the
    `name.py` words on the indented lines below it."""
    import re

    text = (REPO / "README.md").read_text() if text is None else text
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    out: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        head = re.match(r"^(\w+)/(\s|$)", line)
        if head:
            package = head.group(1)
            out.setdefault(package, set())
        elif line.startswith(" ") and package is not None:
            names = re.findall(r"\b([A-Za-z_]\w*\.py)\b", line.split("  ", 2)[1] if line.startswith("  ") else line)
            out[package].update(names)
    return out


def test_readme_names_every_module():
    mapped = readme_module_map()
    missing = {pkg: sorted({p.name for p in (REPO / pkg).glob("*.py")} - mapped.get(pkg, set())) for pkg in MAPPED}
    missing = {pkg: names for pkg, names in missing.items() if names}
    assert not missing, f"modules the README's Architecture map does not name: {missing}"
    helpers = {p.name for p in (REPO / "tests").glob("*.py") if not p.name.startswith("test_")} - {"__init__.py"}
    assert helpers <= mapped.get("tests", set()), helpers - mapped.get("tests", set())
    stale = {pkg: sorted(n for n in names if not (REPO / pkg / n).exists()) for pkg, names in mapped.items()}
    assert not {k: v for k, v in stale.items() if v}, f"the map names modules that do not exist: {stale}"


def test_readme_map_reader_reads_entries_not_prose():
    text = ("## Architecture\n\nprose naming fake.py\n```\njax_model/   the model: not_a_module.py in prose\n"
            "  model.py          Attention; see layers.py (a description)\n"
            "                    continued: kvcache.py is prose here too\n"
            "  decode.py, sampling.py   two entries on one line\ntrain/\n  run.py  the loop\n```\n")
    assert readme_module_map(text) == {"jax_model": {"model.py", "decode.py", "sampling.py"}, "train": {"run.py"}}
    real = readme_module_map()
    assert {"model.py", "attention_kernels.py"} <= real["jax_model"] and "optim.py" in real["torch_ref"]
