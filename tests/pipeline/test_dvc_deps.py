"""dvc.yaml's code deps cover the ferflow modules each stage runs (issue 9, item 8).

The import closure of a stage is derived statically with `ast` (nothing is imported), from
the `ferflow.stages` function its CLI command calls and from `config.load_params`, through
which every command reads params. It is followed per name, not per module:

- a *symbol* is a module-level name (function, class, constant). Following one walks its
  whole definition (decorators, defaults, annotations, body; a class with every method) and
  resolves each name in it: a definition of the same module, a ferflow import made at module
  level or anywhere inside that module's functions (lazy imports), or an attribute of an
  imported ferflow module (`zoo.build_model` is ferflow.models.zoo:build_model); a module
  used other than through an attribute, or a name that cannot be found, counts whole;
- a module counts once anything is imported from it, an import statement met inside a
  followed body counts by itself, and so do the parent packages; importing runs a module's
  top-level statements other than definitions and imports, so those are followed too. A
  module-level import is followed only where a followed name uses it;
- a string naming a sibling module's file ("pyfunc_model.py") counts that whole module:
  code that MLflow ships by path;
- over-approximated: branches the stage's cmd never takes, whole classes; not seen:
  dynamic look-ups (getattr, __import__). Modules with no statement but a docstring, and
  allow-listed modules, are left out and not followed: what only an allow-listed module
  calls runs on its behalf and cannot change outputs either.
"""

import ast
from pathlib import Path

import pytest
import yaml

from . import REPO

SRC = REPO / "src"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

# dvc stage -> (`ferflow` command in its cmd, the ferflow.stages function that command calls)
STAGES = {
    "fetch": ("fetch", "fetch"), "prepare": ("prepare", "prepare"), "prepare-union": ("prepare", "prepare"),
    "train": ("train", "train"), "evaluate": ("evaluate", "evaluate"), "zero-shot": ("evaluate", "zero_shot"),
    "register": ("register", "register"), "promote": ("promote", "promote"), "report": ("report", "report"),
}
ROOTS = [("ferflow.config", "load_params")]  # what every command runs before its stage function

_MLFLOW_ONLY = "MLflow logging: writes the MLflow store and mlflow_run.json (cache: false), no cached output"
ALLOWED_ALL = {
    "src/ferflow/errors.py": "exception types: whether a stage fails, never what it writes",
    "src/ferflow/__init__.py": "the version string, recorded as provenance: a release bump alone computes nothing new",
    "src/ferflow/tracking/__init__.py": "switches MLflow telemetry off",
    "src/ferflow/cpus.py": "how many processes run: how fast, not what (results come back in input order)",
}
ALLOWED = {  # paths as in deps: a folder covers everything under it
    "fetch": {"src/ferflow": "the archive's bytes are pinned by its sha256 in params (data.archives), so no "
                             "code can change them; test_dvc_fetch runs this stage in a workspace without src/"},
    "train": {f"src/ferflow/tracking/{m}.py": _MLFLOW_ONLY for m in ("runs", "service", "lineage")},
    "evaluate": {f"src/ferflow/tracking/{m}.py": _MLFLOW_ONLY for m in ("eval_logging", "service", "lineage")},
    "report": {f"src/ferflow/tracking/{m}.py": "read only with --from-registry, which the stage's cmd never passes"
               for m in ("queries", "service")},
}


class Package:
    """The parsed modules of one package under `src`, by dotted name."""

    def __init__(self, src: Path, name: str = "ferflow"):
        self.src, self.name, self._trees = src, name, {}

    def path(self, module: str):
        base = self.src.joinpath(*module.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            self._trees[module] = ast.parse(self.path(module).read_text(), str(self.path(module)))
        return self._trees[module]

    def bindings(self, module: str, nodes) -> dict:
        """name -> (module, None) for a module, (module, attr) for a symbol: ferflow imports only."""
        found = {}
        for node in (n for top in nodes for n in ast.walk(top)):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = a.name if a.asname else a.name.split(".")[0]
                    found[a.asname or target] = (target, None)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one package up per extra dot
                    up = module.split(".")[: -1 if self.path(module).name != "__init__.py" else None]
                    base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    found[a.asname or a.name] = (sub, None) if self.path(sub) else (base, a.name)
        return {k: v for k, v in found.items() if v[0].split(".")[0] == self.name}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _locals(fn) -> set:
    """Names a function binds itself (arguments, assignments, nested defs): they hide module names."""
    names = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    hidden, todo = set(), list(fn.body) if isinstance(fn.body, list) else [fn.body]
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
            continue  # its own scope
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) or isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.id if isinstance(n, ast.Name) else n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            hidden.update(n.names)
        if not isinstance(n, ast.Lambda):
            todo.extend(ast.iter_child_nodes(n))
    return names - hidden


def _defs(tree: ast.Module) -> dict:
    defs = {}
    for st in tree.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.setdefault(st.name, []).append(st)
        elif isinstance(st, (ast.Assign, ast.AnnAssign)):
            for target in st.targets if isinstance(st, ast.Assign) else [st.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        defs.setdefault(n.id, []).append(st)
    return defs


def _docstring(tree: ast.Module) -> list:
    first = tree.body[:1]
    return first if first and isinstance(first[0], ast.Expr) and isinstance(first[0].value, ast.Constant) else []


def _side_effects(tree: ast.Module) -> list:
    skip = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom)
    return [s for s in tree.body if not isinstance(s, skip) and s not in _docstring(tree)]


def closure(pkg: Package, roots, skip=()) -> set:
    """Module names whose code `roots` [(module, name)] can run; `skip`: modules not followed."""
    modules, seen, todo = set(), set(), list(roots)

    def touch(module):
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            todo.append((".".join(parts[:i]), ""))  # "": the module's top-level statements

    while todo:
        item = todo.pop()
        module, name = item
        if item in seen or module in skip or pkg.path(module) is None:
            continue
        seen.add(item)
        if module not in modules:
            modules.add(module)
            touch(module)
        tree = pkg.tree(module)
        defs = _defs(tree)
        top = pkg.bindings(module, [s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))])
        if name == "":
            nodes = _side_effects(tree)
        elif name in defs:
            nodes = defs[name]
        elif name in top:  # a re-export: follow it where it comes from
            todo.append(top[name] if top[name][1] else (top[name][0], "*"))
            continue
        else:  # "*", or a name this module does not define: all of it
            nodes = tree.body
        bound = {**top, **pkg.bindings(module, nodes)}

        def visit(node, local=frozenset()):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                local = local | _locals(node)
            if isinstance(node, ast.Import):  # `import a.b` runs a.b even though it binds only `a`
                for a in node.names:
                    touch(a.name)
            elif isinstance(node, ast.ImportFrom):
                for target, _ in pkg.bindings(module, [node]).values():
                    touch(target)
            parts = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
            if parts is None:
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
                    sibling = module.rpartition(".")[0] + "." + node.value[:-3]
                    if "/" not in node.value and pkg.path(sibling):
                        todo.append((sibling, "*"))
                for child in ast.iter_child_nodes(node):
                    visit(child, local)
            elif parts[0] in local:
                pass
            elif parts[0] in bound:
                target, attr = bound[parts[0]]
                if attr is not None:
                    todo.append((target, attr))
                else:  # a module: descend through submodules to the attribute used
                    rest = parts[1:]
                    while rest and pkg.path(f"{target}.{rest[0]}"):
                        target = f"{target}.{rest.pop(0)}"
                    todo.append((target, rest[0] if rest else "*"))
            elif parts[0] in defs:
                todo.append((module, parts[0]))

        for node in nodes:
            visit(node)
    return {m for m in modules if any(s not in _docstring(pkg.tree(m)) for s in pkg.tree(m).body)}


def stage_body(name: str) -> dict:
    return DVC[name].get("do", DVC[name])


def covered(path: str, entries) -> bool:
    return any(path == e or path.startswith(e.rstrip("/") + "/") for e in entries)


def uncovered(pkg: Package, roots, deps, allowed) -> list:
    """Closure files (relative to the repo) that neither deps nor the allow-list cover."""
    skip = {m for m in _all_modules(pkg) if covered(_rel(pkg, m), allowed)}
    files = sorted(_rel(pkg, m) for m in closure(pkg, roots, skip))
    return [f for f in files if not covered(f, deps)]


def _all_modules(pkg: Package) -> list:
    return [".".join(p.relative_to(pkg.src).with_suffix("").parts).removesuffix(".__init__")
            for p in (pkg.src / pkg.name).rglob("*.py")]


def _rel(pkg: Package, module: str) -> str:
    return pkg.path(module).relative_to(pkg.src.parent).as_posix()


def _cli_calls() -> dict:
    """`ferflow` command -> the `stages.<fn>` names its function in the cli package uses."""
    calls = {}
    modules = sorted((SRC / "ferflow" / "cli").glob("*.py"))
    for fn in (node for path in modules for node in ast.parse(path.read_text()).body):
        for dec in getattr(fn, "decorator_list", []):
            if isinstance(dec, ast.Call) and _dotted(dec.func) == ["app", "command"]:
                name = dec.args[0].value if dec.args else fn.name.replace("_", "-")
                calls[name] = {p[1] for n in ast.walk(fn) if (p := _dotted(n)) and len(p) == 2 and p[0] == "stages"}
    return calls


def test_stage_map_matches_dvc_yaml_and_cli():
    assert set(STAGES) == set(DVC), "a new dvc.yaml stage needs its entry in STAGES"
    calls = _cli_calls()
    for stage, (command, function) in STAGES.items():
        cmd = stage_body(stage)["cmd"].split()
        assert cmd[:2] == ["ferflow", command], stage
        assert ("--zero-shot" in cmd) == (function == "zero_shot"), stage
        assert function in calls[command], f"cli `{command}` does not call stages.{function}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_the_import_closure(stage):
    pkg = Package(SRC)
    deps = [d for d in stage_body(stage).get("deps", []) if "${" not in d]
    allowed = {**ALLOWED_ALL, **ALLOWED.get(stage, {})}
    missing = [d for d in [*deps, *allowed] if not (REPO / d).exists()]
    assert not missing, f"dvc.yaml stage {stage}: deps or allow-list entries that do not exist: {missing}"
    roots = [("ferflow.stages", STAGES[stage][1]), *ROOTS]
    assert not (gaps := uncovered(pkg, roots, deps, allowed)), f"dvc.yaml stage {stage}: add to deps: {gaps}"


def test_closure_follows_lazy_imports_per_function(tmp_path):
    """The check itself: a lazy import added inside a used function is found; a module
    used only by a function the stage never calls is not."""
    files = {
        "src/pkg/__init__.py": '"""docstring only: ignored"""\n',
        "src/pkg/stages.py": "def train():\n    from pkg.training import trainer\n    return trainer.fit()\n\n"
                             "def other():\n    from pkg import unrelated\n    return unrelated.go()\n",
        "src/pkg/training/__init__.py": "",
        "src/pkg/training/trainer.py": "from pkg import labels, unrelated\n\nLIMIT = labels.N\n\n"
                                       "def fit():\n    unrelated = 0  # a local: not the module\n"
                                       "    return helper() + LIMIT + unrelated\n\n"
                                       "def helper():\n    return 1\n\ndef unused():\n    return unrelated.go()\n",
        "src/pkg/labels.py": "N = 3\n",
        "src/pkg/unrelated.py": "def go():\n    return 0\n",
        "src/pkg/extra.py": "def boost():\n    return 2\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    pkg = Package(tmp_path / "src", "pkg")
    roots, deps = [("pkg.stages", "train")], ["src/pkg/stages.py", "src/pkg/training", "src/pkg/labels.py"]
    assert closure(pkg, roots) == {"pkg.stages", "pkg.training.trainer", "pkg.labels"}
    assert uncovered(pkg, roots, deps, {}) == []

    trainer = tmp_path / "src/pkg/training/trainer.py"  # a new lazy import, not in deps
    trainer.write_text(trainer.read_text().replace("return 1", "from pkg.extra import boost\n    return boost()"))
    pkg = Package(tmp_path / "src", "pkg")
    assert uncovered(pkg, roots, deps, {}) == ["src/pkg/extra.py"]
    assert uncovered(pkg, roots, deps, {"src/pkg/extra.py": "allowed"}) == []

