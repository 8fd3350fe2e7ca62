"""No code outside a part asks which part it has. A test of a part's registry name (``regulariser == "mmd"``,
``args.mode in ("sample", "interpolate")``, a ``match`` case) or of its class (``isinstance(x, MMD)``,
``type(x) is TCVAE``) is a list of names kept away from the registry: a new part misses it silently. The part
states what it needs instead, as a class attribute or method (docs/extending.md, "A part states what it needs").

The registries are the config's (``utils.config.REGISTRIES``) and the command lines' (``METRICS``, ``SAMPLERS``,
``MODES``), each found where it is defined, not by path. A part may test its own name or class inside its own
class or function; a part with no body of its own in the toolkit (a tuple of names, a data set or metric object,
a class of torch's) anywhere in its registry's module. The scripts, ``models/`` and ``utils/`` are read;
``tests/`` plant parts on purpose, and ``benchmarks/`` measure named configs on purpose (their names are the
benchmark's own tables; the sample modes they run are the modes' registry's).

When a comparison with a string counts (some keys are ordinary words elsewhere: ``"elbo"`` is a logged
statistic, ``"prior"`` a choice of ``--from``):

1. the compared expression names a part: its name (a variable, an attribute, a subscript's or ``.get``'s string
   key; a trailing ``_`` and a plural ``s`` dropped) is the last word of a registry's config key (``regulariser``,
   ``likelihood``, ...; ``data.name`` only in full) or of a command line's (``mode``, ``sampler``, ``metric``), or
   the same function looks it up in a registry (``X in SAMPLERS``, ``SAMPLERS[X]``, ``for X in SAMPLERS``): then
   any key of any registry counts;
2. any other expression: any key counts but those in ORDINARY.

The strings are a literal's, or those of a collection bound once to a name at the module's top (``args.mode in
DRAWN`` with ``DRAWN = ("sample", "interpolate")``).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO
from utils.fields import PartRules

SCANNED = ("models", "utils")  # and the scripts
SCRIPTS = ("train_vae", "sample", "evaluate")
CLI_WORDS = {"--metrics": "metric", "--sampler": "sampler", "--mode": "mode"}
# registry keys that are also ordinary words or other things' names in the code, counted only beside an expression
# that names a part (rule 1): each with where it is something else
ORDINARY = {
    "none": "the tracker spec train.log_with=none",
    "normal": "a distribution's name",
    "prior": "sample.py --from prior; the KL to the prior",
    "elbo": "the logged statistic and the results' key",
    "nll": "the results' key",
    "sigma": "the logged statistic (a learned σ)",
}
Scope = tuple[str, str]  # (module, qualified name of a class or function; "" for the whole module)


def registries() -> dict[str, Collection]:
    """Every registry of parts, by the config key or command-line flag that chooses from it."""
    from models.sampler_rules import SAMPLERS
    from utils.config import REGISTRIES
    from utils.evaluation.metrics import METRICS
    from utils.inference.modes import MODES

    return {**{key: registry.load() for key, registry in REGISTRIES.items()}, "--metrics": METRICS,
            "--sampler": SAMPLERS, "--mode": MODES}


def home(registry: Collection) -> tuple[str, str]:
    """(module, name) of the toolkit module whose assignment defines ``registry`` (the others import it)."""
    for module_name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if not file.startswith(str(REPO)):
            continue
        for name, value in list(vars(module).items()):
            if value is registry and name.isupper() and re.search(
                    rf"^{name}\b[^=\n]*=", Path(file).read_text(encoding="utf-8"), re.MULTILINE):
                return module_name, name
    raise LookupError(f"no toolkit module defines {registry!r}")


@dataclass
class Parts:
    owners: dict[str, set[Scope]]  # registry key -> where it may be compared
    registries_of: dict[str, list[str]]  # registry key -> the registries that hold it
    classes: dict[type, set[Scope]]  # registered class -> where it may be tested for
    registry_names: set[str]  # SAMPLERS, METRICS, ...
    words: set[str]  # the names of an expression that names a part
    config_keys: set[str]  # data.name, ...


def _members(value: object) -> list[object]:
    """What a registry entry is made of: the members of a tuple; a part's rules class (``PartRules``: what it
    states for the config, without torch) and the torch class it names, which subclasses it."""
    members = list(value) if isinstance(value, tuple) else [value]
    return members + [m.load() for m in members if isinstance(m, type) and issubclass(m, PartRules)
                      and m.load() is not m]


def _own_scopes(value: object, registry_home: str) -> set[Scope]:
    """Where a registered value's name may be tested: inside its own classes or function when the toolkit
    defines them (its module may hold other parts and their dispatch; a part's rules class and its torch class
    are both its own), else anywhere in the registry's module (a tuple of names, a data set or metric object, a
    class of torch's)."""
    bodies = {(m.__module__, m.__qualname__) for m in _members(value) if (isinstance(m, type) or inspect.isfunction(m))
              and (getattr(sys.modules.get(m.__module__), "__file__", None) or "").startswith(str(REPO))}
    return bodies or {(registry_home, "")}


@functools.cache
def parts() -> Parts:
    found = Parts({}, {}, {}, set(), set(CLI_WORDS.values()), set())
    for key, registry in registries().items():
        where, name = home(registry)
        found.registry_names.add(name)
        if not key.startswith("--"):
            found.config_keys.add(key)
            if key.split(".")[-1] != "name":  # too common a word: data.name counts only in full
                found.words.add(key.split(".")[-1])
        for entry in registry:
            value = registry[entry] if isinstance(registry, dict) else None
            found.owners.setdefault(entry, set()).update(_own_scopes(value, where))
            found.registries_of.setdefault(entry, []).append(name)
            for m in _members(value):
                if isinstance(m, type):
                    found.classes.setdefault(m, set()).update(_own_scopes(m, where))
    return found


def toolkit_sources() -> dict[str, str]:
    """Module name -> source, for the scripts and every module of the packages."""
    files = [p for pkg in SCANNED for p in (REPO / pkg).rglob("*.py")] + [REPO / f"{s}.py" for s in SCRIPTS]
    names = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in files]
    return {name: p.read_text(encoding="utf-8") for name, p in zip(names, files)}


def _strings(node: ast.AST, constants: dict[str, ast.AST] | None = None) -> list[str]:
    """The strings a literal holds, or a name bound to one at the module's top (``DRAWN = ("sample", ...)``)."""
    if isinstance(node, ast.Name) and constants and node.id in constants:
        node = constants[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _constants(tree: ast.Module) -> dict[str, ast.AST]:
    """Names bound once at the module's top to a literal collection: a list of names may hide behind one."""
    bound: dict[str, list[ast.AST]] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        for t in targets:
            if isinstance(t, ast.Name):
                bound.setdefault(t.id, []).append(node.value)
    return {name: values[0] for name, values in bound.items()
            if len(values) == 1 and isinstance(values[0], (ast.Tuple, ast.List, ast.Set))}


def _pattern_strings(p: ast.pattern) -> list[str]:
    if isinstance(p, ast.MatchValue):
        return _strings(p.value)
    if isinstance(p, ast.MatchOr):
        return [s for q in p.patterns for s in _pattern_strings(q)]
    if isinstance(p, ast.MatchAs) and p.pattern is not None:
        return _pattern_strings(p.pattern)
    return []


def _name(node: ast.AST) -> str | None:
    """The word an expression is known by: ``cfg.loss.regulariser`` -> regulariser, ``args.from_`` -> from."""
    if isinstance(node, ast.Name):
        word = node.id
    elif isinstance(node, ast.Attribute):
        word = node.attr
    elif isinstance(node, ast.Subscript) and _strings(node.slice)[:1] == [getattr(node.slice, "value", None)]:
        word = node.slice.value
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        word = node.args[0].value
    else:
        return None
    return word.rstrip("_").lower()


def _compared(node: ast.AST, constants: dict[str, ast.AST]) -> Iterator[tuple[ast.AST, list[str]]]:
    """(expression, the strings it is compared with) for each comparison or match case at ``node``."""
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In, ast.NotIn)):
                yield left, _strings(right, constants)
                yield right, _strings(left, constants)
    elif isinstance(node, ast.Match):
        for case in node.cases:
            yield node.subject, _pattern_strings(case.pattern)


def _looked_up(scope: ast.AST, registry_names: set[str]) -> set[str]:
    """The expressions (as source) that ``scope`` looks up in a registry: ``X in R``, ``R[X]``, ``R.get(X)``,
    ``for X in R`` (or ``R.items()``, ``R.keys()``)."""
    def is_registry(node: ast.AST) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("items",
                                                                                                        "keys"):
            node = node.func.value
        return (isinstance(node, ast.Name) and node.id in registry_names) or (
            isinstance(node, ast.Attribute) and node.attr in registry_names)

    found = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            if is_registry(node.comparators[0]):
                found.add(ast.unparse(node.left))
        elif isinstance(node, ast.Subscript) and is_registry(node.value):
            found.add(ast.unparse(node.slice))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and is_registry(node.func.value) and node.args):
            found.add(ast.unparse(node.args[0]))
        elif isinstance(node, (ast.For, ast.comprehension)) and is_registry(node.iter):
            target = node.target.elts[0] if isinstance(node.target, ast.Tuple) else node.target
            found.add(ast.unparse(target))
    return found


def _names_a_part(expr: ast.AST, looked_up: set[str], known: Parts) -> bool:
    word = _name(expr)
    source = ast.unparse(expr)
    return (word is not None and (word in known.words or word.removesuffix("s") in known.words)) or any(
        source == key or source.endswith("." + key) for key in known.config_keys) or source in looked_up


def _imports(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None) for each import of the module."""
    found: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                found[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                found[a.asname or a.name] = (node.module, a.name)
    return found


def _resolve(node: ast.AST, imports: dict[str, tuple[str, str | None]], class_names: set[str]) -> object:
    """The object a class expression (``MMD``, ``regularisers.MMD``) names through the module's imports; None when
    it is not an imported registered class's name."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in imports:
        return None
    module, attribute = imports[node.id]
    if (chain or [attribute or node.id])[-1] not in class_names:
        return None
    try:
        obj = importlib.import_module(module)
        if attribute is not None:
            obj = getattr(obj, attribute, None) or importlib.import_module(f"{module}.{attribute}")
        for a in chain:
            obj = getattr(obj, a)
    except (ImportError, AttributeError):
        return None
    return obj


def _class_tests(node: ast.AST) -> list[ast.AST]:
    """The class expressions ``node`` tests against: isinstance/issubclass, ``type(x) is C``, ``x.__class__ == C``."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance",
                                                                                          "issubclass")
            and len(node.args) == 2):
        second = node.args[1]
        return list(second.elts) if isinstance(second, ast.Tuple) else [second]
    if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq))
                                             for op in node.ops):
        operands = [node.left, *node.comparators]
        is_type = [(isinstance(o, ast.Call) and isinstance(o.func, ast.Name) and o.func.id == "type")
                   or (isinstance(o, ast.Attribute) and o.attr == "__class__") for o in operands]
        if any(is_type):
            return [o for o, t in zip(operands, is_type) if not t]
    return []


def _enclosing(tree: ast.Module) -> tuple[dict[ast.AST, str], dict[ast.AST, set[str]]]:
    """For each node: the qualified name of the class or function it is in ("" at module level), and the
    expressions its innermost function (else the module) looks up in a registry."""
    where: dict[ast.AST, str] = {}
    scopes: dict[ast.AST, ast.AST] = {}

    def visit(node: ast.AST, qualname: str, scope: ast.AST) -> None:
        where[node], scopes[node] = qualname, scope
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = f"{qualname}.{node.name}" if qualname else node.name
            if not isinstance(node, ast.ClassDef):
                scope = node
        for child in ast.iter_child_nodes(node):
            visit(child, qualname, scope)

    visit(tree, "", tree)
    return where, {node: scope for node, scope in scopes.items()}


def _inside(module: str, qualname: str, owners: set[Scope]) -> bool:
    return any(module == m and (not q or qualname == q or qualname.startswith(q + ".")) for m, q in owners)


def violations(sources: dict[str, str], known: Parts | None = None) -> list[str]:
    """``module:line: what`` for every test of a part's name or class outside the part's own definition."""
    known = known or parts()
    class_names = {c.__name__ for c in known.classes}
    found = []
    for module, source in sorted(sources.items()):
        tree = ast.parse(source)
        imports, constants = _imports(tree), _constants(tree)
        where, scope_of = _enclosing(tree)
        looked_up = {scope: _looked_up(scope, known.registry_names) for scope in set(scope_of.values())}
        for node in ast.walk(tree):
            # a class body is its own qualified name: a comparison in a method of MMD is inside MMD
            qualname = where[node] + (f".{node.name}" if isinstance(node, ast.ClassDef) else "")
            for expr, strings in _compared(node, constants):
                for s in strings:
                    if s not in known.owners or _inside(module, qualname, known.owners[s]):
                        continue
                    if s not in ORDINARY or _names_a_part(expr, looked_up[scope_of[node]], known):
                        found.append(f"{module}:{node.lineno}: `{ast.unparse(expr)}` is compared with "
                                     f"{s!r}, a key of {'/'.join(known.registries_of[s])}")
            for target in _class_tests(node):
                cls = _resolve(target, imports, class_names)
                if isinstance(cls, type) and cls in known.classes and not _inside(module, qualname,
                                                                                   known.classes[cls]):
                    found.append(f"{module}:{node.lineno}: `{ast.unparse(node)}` tests for the registered class "
                                 f"{cls.__module__}.{cls.__qualname__}")
    return sorted(set(found), key=lambda v: (v.split(":")[0], int(v.split(":")[1]), v))


def test_no_code_outside_a_part_tests_its_name_or_class():
    found = violations(toolkit_sources())
    assert not found, "ask the part (a class attribute or method), not its name or class:\n" + "\n".join(found)


def planted(*lines: str) -> dict[str, str]:
    """One module of a layer that may not ask which part it has."""
    return {"utils.training.planted": "\n".join(lines) + "\n"}


def test_a_planted_comparison_of_a_part_name_is_reported_in_each_form():
    found = violations(planted(
        "def f(cfg, loss, args, x):",
        "    a = cfg.loss.regulariser == 'mmd'",  # 2: ==, on a config key
        "    b = loss.regulariser != 'tcvae'",  # 3: !=
        "    c = args.mode in ('traverse', 'interpolate')",  # 4: in a tuple, on a flag
        "    d = 'fid' in args.metrics",  # 5: a name in a collection of them
        "    e = x == 'dip_ii'",  # 6: any expression, with a name that is no ordinary word
        "    f = cfg.model.prior == 'normal'",  # 7: an ordinary word, beside a key that names a part
        "    g = cfg.data.name == 'mnist'",  # 8: data.name in full
        "    match cfg.loss.objective:",  # 9: a match case
        "        case 'iwae' | 'ae':",
        "            pass",
        "def g(name, ns):",
        "    if name not in SAMPLERS:",  # an ordinary word, beside a name this function looks up
        "        return",
        "    return name == 'prior' or [n for n in SAMPLERS if n != 'prior']",  # 15
        "DRAWN = ('sample', 'interpolate')",
        "def h(args):",
        "    return args.mode in DRAWN",  # 18: a list of names behind a constant
    ))
    reported = [(int(v.split(":")[1]), v.split("'")[1]) for v in found]
    assert reported == [(2, "mmd"), (3, "tcvae"), (4, "interpolate"), (4, "traverse"), (5, "fid"), (6, "dip_ii"),
                        (7, "normal"), (8, "mnist"), (9, "ae"), (9, "iwae"), (15, "prior"), (15, "prior"),
                        (18, "interpolate"), (18, "sample")]
    assert "`cfg.loss.regulariser` is compared with 'mmd', a key of REGULARISERS" in found[0]


def test_a_planted_class_test_of_a_registered_part_is_reported_in_each_form():
    found = violations(planted(
        "from models import regularisers",
        "from models.likelihoods import OptimalSigma as Optimal",
        "from models.total_correlation import TCVAE",
        "from torch import nn",
        "from models.regulariser_rules import MMDRules",
        "def f(vae, r, m):",
        "    a = isinstance(vae.likelihood, Optimal)",  # 7: through an alias
        "    b = isinstance(r, (int, regularisers.MMD))",  # 8: in a tuple, through the module
        "    c = type(r) is TCVAE",  # 9
        "    d = r.__class__ == regularisers.DIPII",  # 10
        "    e = issubclass(m, nn.ReLU)",  # 11: a registered class of torch's (model.activation)
        "    f = issubclass(m, MMDRules)",  # 12: a part's rules class (its registry's entry)
    ))
    assert [(int(v.split(":")[1]), v.split()[-1]) for v in found] == [
        (7, "models.likelihoods.OptimalSigma"), (8, "models.regularisers.MMD"), (9, "models.total_correlation.TCVAE"),
        (10, "models.regularisers.DIPII"), (11, "torch.nn.modules.activation.ReLU"),
        (12, "models.regulariser_rules.MMDRules")]


def test_the_same_tests_pass_inside_the_part_and_ordinary_words_pass_elsewhere():
    inside = {
        "models.regularisers": "\n".join([
            "class MMD:",
            "    def check(self, loss):",
            "        return loss.regulariser == 'mmd' and isinstance(self, MMD) and type(self) is MMD",
        ]),
        "models.total_correlation": "def f(estimator):\n    return estimator == 'mws'\n",  # a tuple's own module
        "utils.inference.modes": "def mode_traverse(args):\n    return args.mode == 'traverse'\n",
    }
    assert violations(inside) == []
    # a mode is a declaration (a Mode), named freely in its registry's module and nowhere else: not in sample.py
    assert len(violations({"sample": "def main(args):\n    return args.mode == 'traverse'\n"})) == 1
    assert violations(planted(
        "from models.likelihoods import Likelihood",
        "def f(stats, results, args, u, dist, vae):",
        "    return ('elbo' in stats, 'nll' in results, args.from_ == 'prior', u.get('kl_to') == 'prior',",
        "            dist == 'normal', stats['sigma'], args.interp == 'slerp', isinstance(vae.likelihood, Likelihood))",
    )) == []


def test_the_ordinary_words_are_registry_keys():
    """An entry that no registry holds any more is dropped, so the list says what it exempts."""
    assert set(ORDINARY) <= set(parts().owners)


def test_the_docs_name_each_registry_where_it_is_and_each_likelihood_it_holds():
    """The docs' hand-written lists of parts follow the registries: extending.md's table names each registry's
    module (the config's are also in the generated table of models.md; the command lines' only here), and the
    likelihood table of models.md has one row per LIKELIHOODS entry, in its order."""
    from models.likelihoods import LIKELIHOODS
    from utils.config import REGISTRIES

    extending = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| an? [^|]+\|[^|]+\| `([A-Z_]+)` \| `([\w/.]+)` \|", extending, re.MULTILINE)
    assert rows, "the table of docs/extending.md is not where this test reads it"
    homes = {name: f"{module.replace('.', '/')}.py" for module, name in map(home, registries().values())}
    assert [(name, path) for name, path in rows if homes.get(name) != path] == []
    assert {home(r)[1] for k, r in registries().items() if k not in REGISTRIES} <= {name for name, _ in rows}
    models_md = (REPO / "docs" / "models.md").read_text(encoding="utf-8")
    table = models_md[models_md.index("| likelihood | reconstruction term per image |"):]
    assert re.findall(r"^\| `(\w+)` \|", table.split("\n\n")[0], re.MULTILINE) == list(LIKELIHOODS)
