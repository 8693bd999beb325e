"""What a bundle's configs would run, read before any of it runs.

A MONAI config is code: every ``$`` string is a Python expression and every ``_target_`` names a class or function
to call. A manifest proves the files are those the sender packed, not what they do. ``audit`` reads each config
expression (parsed, never evaluated) and each ``_target_``, and names those that reach beyond what a nuclei
segmentation bundle needs: this package, MONAI, torch, ignite, numpy, ``math``, ``logging``, paths and a few
builtins. Shell commands, file access, imports of other modules, downloads and the ways around such a list
(``__import__``, ``getattr``, ``eval``, attributes starting with ``_``) are named with the file and the key.

It is a list of what was found, not a sandbox: the allowed modules themselves can do much (a call of this package's
``download`` fetches files). An empty audit says the configs use only what this project's own configs use.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["audit", "expression_problems", "target_problem"]

# the modules a config may import and call into, by the name it imports them under
ALLOWED_MODULES = {"nucleiseg_monai", "monai", "torch", "ignite", "numpy", "np", "math", "logging", "dist", "os"}
# parts of allowed modules that fetch or run code from elsewhere, or touch the system beyond paths
BLOCKED = (
    "torch.hub", "torch.package", "torch.ops", "torch.utils.cpp_extension", "torch.classes", "torch.library",
    "monai.bundle", "monai.apps", "nucleiseg_monai.download", "logging.config", "numpy.ctypeslib", "np.ctypeslib",
)
# of ``os``, only what paths and a distributed run's environment (LOCAL_RANK) need
OS_ALLOWED = ("os.path", "os.makedirs", "os.environ", "os.getcwd", "os.sep", "os.cpu_count")
# names that, reached through an allowed module (torch.os.system, monai.utils.optional_import("subprocess")) or
# looked up as a bare MONAI component, run commands, import modules or build objects from strings
DANGEROUS_PARTS = {
    "os", "sys", "subprocess", "builtins", "shutil", "importlib", "socket", "pickle", "ctypes", "io", "pathlib",
    "urllib", "requests", "tempfile", "multiprocessing", "signal", "runpy", "code", "pdb", "marshal", "zipfile",
    "tarfile", "http", "webbrowser", "system", "popen", "spawn", "optional_import", "import_module", "locate",
    "instantiate", "run_cmd", "download_url", "download_and_extract",
}
BUILTINS = {
    "abs", "all", "any", "bool", "dict", "enumerate", "float", "int", "isinstance", "len", "list", "max", "min",
    "print", "range", "round", "set", "sorted", "str", "sum", "tuple", "zip", "None", "True", "False",
}
EXPRESSION, TARGET, MODE = "$", "_target_", "_mode_"
_REF = re.compile(r"@[\w#]+")  # MONAI's references (@id, @a#b) stand for values already built
_REF_NAME = "ref_value"


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _attributes(node: ast.AST) -> list[str]:
    """The attribute names of a chain ``value.a.b``, whatever the value."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return names


def _module_problem(dotted: str) -> str | None:
    root = dotted.split(".")[0]
    if root not in ALLOWED_MODULES:
        return f"{dotted} is outside the modules a bundle uses ({', '.join(sorted(ALLOWED_MODULES))})"
    if any(dotted == b or dotted.startswith(b + ".") for b in BLOCKED):
        return f"{dotted} fetches or runs code from elsewhere"
    if root != "os" and (found := DANGEROUS_PARTS.intersection(dotted.split(".")[1:])):
        return f"{dotted} reaches {', '.join(sorted(found))} through {root}"
    if root == "os" and dotted != "os" and not any(dotted == a or dotted.startswith(a + ".") for a in OS_ALLOWED):
        return f"{dotted} reaches the system beyond paths"
    return None


def _bound_names(tree: ast.AST) -> set[str]:
    """Names the expression binds itself: lambda arguments, comprehension targets, walrus targets."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.comprehension) or isinstance(node, ast.NamedExpr):
            bound |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    return bound


def expression_problems(text: str) -> list[str]:
    """What a config's ``$`` string (without the ``$``) does beyond a bundle's needs; empty when nothing."""
    source = _REF.sub(_REF_NAME, text)
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        return [f"is not Python MONAI could evaluate ({err.msg})"]
    problems, bound = [], _bound_names(tree) | {_REF_NAME}
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # a.b of a.b.c: judged as a.b.c
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [p for m in modules if (p := _module_problem(m))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            problems.append(f"reads the private attribute .{node.attr}, a way around this audit")
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in inner:
            dotted = _dotted(node)
            if dotted and dotted.split(".")[0] in ALLOWED_MODULES:
                problems += [problem] if (problem := _module_problem(dotted)) else []
            elif found := DANGEROUS_PARTS.intersection(_attributes(node)):  # on a value: @x.os, f().system
                problems.append(f"reaches {', '.join(sorted(found))} through {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id not in BUILTINS | ALLOWED_MODULES | bound:
                problems.append(f"calls or reads {node.id}, which is neither an allowed builtin nor module")
        elif isinstance(node, ast.keyword) and node.arg in ("weights_only", "allow_pickle"):
            unsafe = False if node.arg == "weights_only" else True
            if not isinstance(node.value, ast.Constant) or node.value.value is unsafe:
                problems.append(f"loads with {node.arg}={ast.unparse(node.value)}, which can run code in the file")
    return list(dict.fromkeys(problems))


def target_problem(target: str) -> str | None:
    """Why a ``_target_`` reaches beyond a bundle's needs; None when it does not. A bare name is looked up among
    MONAI's own components."""
    if not isinstance(target, str):
        return f"is {target!r}, not a name"
    if "." not in target:
        if not target.isidentifier():
            return f"{target!r} is not a component name"
        return f"{target} runs commands or builds objects from strings" if target in DANGEROUS_PARTS else None
    return _module_problem(target)


def _walk(value, key: str) -> Iterator[tuple[str, str, str | None]]:
    """(key, text, problem) for every expression and target of a config, depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{key}#{k}" if key else str(k)
            if k == TARGET:
                yield where, v, target_problem(v)
            elif k == MODE and v not in ("default", "callable"):
                yield where, v, f"mode {v!r} (MONAI's debug mode stops in a debugger)"
            else:
                yield from _walk(v, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}#{i}")
    elif isinstance(value, str) and value.startswith(EXPRESSION):
        for problem in expression_problems(value[len(EXPRESSION):]):
            yield key, value, problem


def audit(bundle_dir: str | os.PathLike) -> list[str]:
    """One line per config expression or target beyond a bundle's needs, naming the file and the key; every JSON
    file of ``configs/`` is read (MONAI evaluates any of them named on a command line)."""
    configs = Path(bundle_dir) / "configs"
    lines = []
    for path in sorted(configs.glob("*.json")):
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            lines.append(f"configs/{path.name}: cannot be read as JSON ({err})")
            continue
        for key, text, problem in _walk(config, ""):
            if problem:
                shown = text if len(text) <= 80 else text[:77] + "..."
                lines.append(f"configs/{path.name}: {key}: {shown!r}: {problem}")
    return lines
