"""What a bundle's configs would run, read before any of it runs.

A MONAI config is code: every ``$`` string is a Python expression and every ``_target_`` names a class or function
to call. A manifest proves the files are those the sender packed, not what they do. ``audit`` reads each config
expression (parsed, never evaluated), each ``_target_`` and each macro, and names, by file and key, everything
outside an allow-list of what nuclei segmentation bundles use:

- modules: this package's (except packaging, downloads and the command line), MONAI's transforms, data, networks,
  losses, metrics, inferers, engines, handlers, optimizers and pathology apps, torch's ``nn``, ``optim``,
  ``utils.data``, ``distributed`` (process groups), ``cuda`` and tensors, ignite, ``math``, ``json``,
  ``logging.getLogger`` and ``os.path``'s path functions, ``os.makedirs`` and ``os.environ``;
- a few builtins that neither open files nor reach attributes by name;
- on other values (``@references``, results of calls), any public attribute but those naming system modules or
  process, file and download functions.

Anything else is named: a module used as a value (it could be aliased to reach past this list), names that shadow
builtins, private attributes, macros that pull in other files, YAML configs. An empty audit means nothing outside
the list was found; the allowed functions themselves still read and write files where a bundle does (checkpoints,
datalists, outputs), and an allow-list cannot prove intent: it narrows what a config can do unnoticed.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["audit", "expression_problems", "target_problem"]

ALLOWED = (
    "nucleiseg_monai.atomic.write_json_atomic", "nucleiseg_monai.atomic.remove_stale",
    "nucleiseg_monai.bundle.guard", "nucleiseg_monai.bundle.bundle_root", "nucleiseg_monai.bundle.training_stats",
    "nucleiseg_monai.bundle.weights_stats_file", "nucleiseg_monai.bundle.evaluation_dir",
    "nucleiseg_monai.bundle.export_stats", "nucleiseg_monai.bundle.typed",
    "nucleiseg_monai.bundle.typed_settings", "nucleiseg_monai.bundle.settings_changed",
    "nucleiseg_monai.bundle.config_names",
    *(f"nucleiseg_monai.{m}" for m in (
        "cohort", "data", "distillation", "evaluation", "handlers", "hard_examples", "inference", "inferers", "losses",
        "measurements", "metrics", "networks", "outputs", "postprocess", "sources", "stitching", "synthetic",
        "transforms", "tuning")),
    *(f"monai.{m}" for m in (
        "transforms", "data", "networks", "losses", "metrics", "inferers", "engines", "handlers", "optimizers",
        "apps.pathology", "utils.set_determinism", "utils.enums", "config")),
    "torch.nn", "torch.optim", "torch.utils.data", "torch.distributed", "torch.cuda", "torch.device",
    "torch.backends.cudnn", "torch.float32", "torch.float16", "torch.bfloat16", "torch.float", "torch.int64",
    "torch.long", "torch.uint8", "torch.tensor", "torch.as_tensor", "torch.no_grad", "torch.inference_mode",
    "torch.load", "ignite.engine", "ignite.handlers", "ignite.metrics", "math", "json.loads", "json.dumps",
    "logging.getLogger",
    *(f"os.path.{f}" for f in ("join", "exists", "isfile", "isdir", "basename", "dirname", "abspath", "expanduser",
                               "splitext", "normpath", "relpath")),
    "os.makedirs", "os.environ", "os.sep",
)
# within what is allowed: torchrun and remote calls start processes
BLOCKED = ("torch.distributed.run", "torch.distributed.launch", "torch.distributed.launcher",
           "torch.distributed.elastic", "torch.distributed.rpc")
# an allowed path and every module above it may be imported (importing runs nothing a config chose)
IMPORTABLE = {".".join(a.split(".")[:n]) for a in ALLOWED for n in range(1, a.count(".") + 2)} - {"os.path"}
# attribute names that reach the system from any value: modules, processes, files, downloads, name lookups
DANGEROUS = {
    "os", "sys", "subprocess", "builtins", "shutil", "importlib", "socket", "pickle", "ctypes", "io", "pathlib",
    "urllib", "requests", "tempfile", "multiprocessing", "signal", "runpy", "code", "pdb", "marshal", "zipfile",
    "tarfile", "http", "webbrowser", "posix", "nt", "system", "popen", "spawn", "spawnv", "spawnl", "posix_spawn",
    "posix_spawnp", "fork", "forkpty", "execv", "execve", "execl", "execvp", "kill", "remove", "unlink", "rmdir",
    "rmtree", "removedirs", "rename", "replace", "chmod", "chown", "symlink", "link", "truncate", "open", "fdopen",
    "optional_import", "import_module", "locate", "instantiate", "run_cmd", "download_url", "download_and_extract",
    "extractall", "load_url", "collect_env", "eval", "exec", "compile", "globals", "locals", "vars", "getattr",
    "setattr", "delattr", "save", "savetxt", "loadtxt", "fromfile", "tofile", "memmap",
}
SAFE_BUILTINS = {
    "abs", "all", "any", "bool", "callable", "dict", "divmod", "enumerate", "filter", "float", "frozenset",
    "hasattr", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next", "print",
    "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip", "None", "True",
    "False",
}
# MONAI resolves a bare _target_ among its own modules: these are the ones a bundle's components come from
COMPONENT_MODULES = ("monai.transforms", "monai.data", "monai.networks", "monai.losses", "monai.metrics",
                     "monai.inferers", "monai.engines", "monai.handlers", "monai.optimizers", "monai.apps.pathology")
EXPRESSION, MACRO, TARGET, MODE = "$", "%", "_target_", "_mode_"
_REF = re.compile(r"@[\w#:]+")  # MONAI's references (@id, @a#b, @a::b) stand for values already built
_REF_NAME = "at_reference"


def _within(dotted: str, prefixes) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


def _chain(node: ast.AST) -> tuple[ast.AST, list[str]]:
    """The value a chain ``value.a.b`` starts from, and its attribute names in order."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return node, names[::-1]


def _path_problem(dotted: str) -> str | None:
    """Why a dotted module path (``torch.nn.Conv2d``) is outside the allow-list; None when it is inside."""
    if not _within(dotted, ALLOWED) or _within(dotted, BLOCKED):
        return f"{dotted} is outside what bundles use (config_audit.ALLOWED)"
    parts = dotted.split(".")
    if bad := DANGEROUS.intersection(parts[1:]) or [p for p in parts if p.startswith("_")]:
        return f"{dotted} reaches {', '.join(sorted(bad))}"
    return None


class _Reader(ast.NodeVisitor):
    """Walks one expression, collecting problems; module names are allowed only as the start of allowed paths."""

    def __init__(self, aliases: dict[str, str]):
        self.aliases, self.problems, self.bound = aliases, [], set()

    def _say(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name not in IMPORTABLE:
                self._say(f"imports {alias.name}, outside what bundles use")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._say(f"imports from {node.module}: name modules by their paths instead")

    def _bind(self, target: ast.AST) -> None:
        for name in ast.walk(target):
            if isinstance(name, ast.Name) or isinstance(name, ast.arg):
                ident = name.id if isinstance(name, ast.Name) else name.arg
                if ident in dir(builtins) or ident in self.aliases or ident.split(".")[0] in IMPORTABLE:
                    self._say(f"binds the name {ident}, which shadows a builtin or a module")
                self.bound.add(ident)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._bind(node.args)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._bind(node.target)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self._bind(node.target)
        self.visit(node.value)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base, names = _chain(node)
        if isinstance(base, ast.Name) and (base.id in self.aliases or base.id in IMPORTABLE):
            if problem := _path_problem(".".join([self.aliases.get(base.id, base.id), *names])):
                self._say(problem)
            return
        if bad := DANGEROUS.intersection(names) or [n for n in names if n.startswith("_")]:
            self._say(f"reaches {', '.join(sorted(bad))} through {ast.unparse(node).replace(_REF_NAME, '@ref')}")
        self.visit(base)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.aliases or node.id in IMPORTABLE:
            self._say(f"uses the module {node.id} itself as a value, which could reach past the allow-list")
        elif node.id not in SAFE_BUILTINS and node.id != _REF_NAME and node.id not in self.bound:
            self._say(f"calls or reads {node.id}, which is neither an allowed builtin nor a module path")

    def visit_keyword(self, node: ast.keyword) -> None:
        if node.arg == "weights_only" and not (isinstance(node.value, ast.Constant) and node.value.value is True):
            self._say(f"loads with weights_only={ast.unparse(node.value)}, which can run code in the file")
        self.generic_visit(node)


def expression_problems(text: str, aliases: dict[str, str] | None = None) -> list[str]:
    """What a config's ``$`` string (without the ``$``) does outside the allow-list; empty when nothing.
    ``aliases``: names the configs import modules as (``import torch.distributed as dist``)."""
    aliases = {"dist": "torch.distributed"} if aliases is None else aliases
    try:
        tree = ast.parse(_REF.sub(_REF_NAME, text))
    except SyntaxError as err:
        return [f"is not Python MONAI could evaluate ({err.msg})"]
    reader = _Reader(aliases)
    for node in ast.walk(tree):  # names first, so a lambda's arguments count wherever they are read
        if isinstance(node, (ast.Lambda, ast.comprehension, ast.NamedExpr)):
            reader._bind(node.args if isinstance(node, ast.Lambda) else node.target)
    reader.problems.clear()
    reader.visit(tree)
    return reader.problems


def target_problem(target) -> str | None:
    """Why a ``_target_`` is outside the allow-list; None when it is inside. A bare name is looked up as MONAI looks
    it up, and must come from the modules bundle components come from."""
    if not isinstance(target, str):
        return f"is {target!r}, not a name"
    if "." in target:
        return _path_problem(target)
    if not target.isidentifier():
        return f"{target!r} is not a component name"
    found = _locator().get_component_module_name(target)
    modules = [found] if isinstance(found, str) else list(found or [])
    if not modules:
        return f"{target} is no MONAI component"
    if not all(_within(m, COMPONENT_MODULES) for m in modules):
        return f"{target} is MONAI's {', '.join(modules)}, outside the modules bundle components come from"
    return None


@functools.lru_cache(maxsize=1)
def _locator():
    """MONAI's lookup of bare component names, over its component packages imported first: MONAI looks among the
    modules imported when a config runs, and a table built once (it takes a quarter of a second) serves every audit."""
    from monai.bundle.config_item import ComponentLocator

    for module in COMPONENT_MODULES:
        importlib.import_module(module)
    return ComponentLocator()


def _aliases(configs: list[dict]) -> dict[str, str]:
    """``import a.b as c`` of every config: c -> a.b, for the modules that may be imported."""
    found = {"dist": "torch.distributed"}
    for config in configs:
        for value in config.get("imports", []) if isinstance(config, dict) else []:
            if isinstance(value, str) and value.startswith(EXPRESSION):
                try:
                    tree = ast.parse(value[1:])
                except SyntaxError:
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        found.update({a.asname: a.name for a in node.names if a.asname and a.name in IMPORTABLE})
    return found


def _walk(value, key: str, aliases: dict[str, str]) -> Iterator[tuple[str, str, str | None]]:
    """(key, text, problem) for every expression, macro and target of a config, depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{key}#{k}" if key else str(k)
            if k == TARGET:
                yield where, str(v), target_problem(v)
            elif k == MODE and v not in ("default", "callable"):
                yield where, str(v), f"mode {v!r} (MONAI's debug mode stops in a debugger)"
            else:
                yield from _walk(v, where, aliases)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}#{i}", aliases)
    elif isinstance(value, str) and value.startswith(EXPRESSION):
        for problem in expression_problems(value[len(EXPRESSION):], aliases):
            yield key, value, problem
    elif isinstance(value, str) and value.startswith(MACRO) and re.split(r"#|::", value[1:], maxsplit=1)[0]:
        yield key, value, "pulls in part of another file, which is not audited"


def audit(bundle_dir: str | os.PathLike) -> list[str]:
    """One line per config expression, target or macro outside the allow-list, naming the file and the key; every
    JSON file of ``configs/`` is read (MONAI evaluates any of them named on a command line), and YAML ones named."""
    configs = Path(bundle_dir) / "configs"
    lines, loaded = [], []
    for path in sorted(configs.glob("*")):
        if path.suffix.lower() in (".yaml", ".yml"):
            lines.append(f"configs/{path.name}: a YAML config, which is not audited; give configs as JSON")
        elif path.suffix.lower() == ".json":
            try:
                loaded.append((path, json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError) as err:
                lines.append(f"configs/{path.name}: cannot be read as JSON ({err})")
    aliases = _aliases([config for _, config in loaded])
    for path, config in loaded:
        for key, text, problem in _walk(config, "", aliases):
            if problem:
                shown = text if len(text) <= 80 else text[:77] + "..."
                lines.append(f"configs/{path.name}: {key}: {shown!r}: {problem}")
    return lines
