"""Command-line settings for a bundle config (``--epochs 20 --resume false``), parsed and checked before anything runs.

``python -m monai.bundle run`` accepts any key: a typo (``--epoch 2``) adds an unused setting and the run trains its
default schedule, ``--epochs abc`` fails an hour later deep in ignite, and ``--resume false`` is the truthy string
'false'. Here a setting must name a key the config has (the nearest one is suggested), a value given for a plain
config value (not a ``$`` expression) must have that value's type, and a patch size must fit the network's
poolings. Each refusal is one line naming the setting and what it expects.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import pydoc
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from .handlers import parse_bool

MISSING = object()
SEPARATORS = ("::", "#")  # MONAI accepts both between the levels of an id
CODE_PREFIXES = ("$", "@", "%")  # an expression, a reference or a macro: MONAI's business, not checked here
NULL_WORDS = ("null", "none")  # None as JSON and YAML spell it, and Python's in any case


class SettingError(ValueError):
    """A setting given on the command line that the config cannot take; the message names it and the fix."""


def parse_value(text: str) -> Any:
    """A Python literal where the text is one (``2``, ``[256,256]``, ``False``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pairs(args: list[str]) -> dict[str, str]:
    """``['--epochs', '2', '--device=cpu']`` -> ``{'epochs': '2', 'device': 'cpu'}``, values still text."""
    pairs, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise SettingError(f"unexpected argument {arg!r}: settings are given as --KEY VALUE (e.g. --epochs 20)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 == len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                raise SettingError(f"{arg} needs a value, e.g. {arg} 20")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs[key] = value
    return pairs


def read_config(file: str | Path) -> dict:
    """One config file as it is written (an overlay's ids unresolved), with a JSON or YAML error naming the file."""
    try:
        return ConfigParser.load_config_file(file)
    except ValueError as err:  # json.JSONDecodeError names the line, not the file
        raise SettingError(f"{file} is not a valid config: {err}; fix the file") from err


def load_config(files: list[str | Path]) -> dict:
    """The config MONAI builds from ``files``: a later file sets ids of an earlier one (``"validate#records"``
    replaces that entry only)."""
    for file in files:
        read_config(file)
    return ConfigParser.load_config_files([str(file) for file in files])


def _levels(key: str) -> list[str]:
    for separator in SEPARATORS[1:]:
        key = key.replace(separator, SEPARATORS[0])
    return key.split(SEPARATORS[0])


def _unknown(key: str, levels: list[str], depth: int, known, node: dict | None = None) -> SettingError:
    if key == "set" and "set" not in known:  # predict's and tune's way, typed where settings are --KEY VALUE
        return SettingError("unknown setting 'set': here settings are given as --KEY VALUE (e.g. --bundle_root DIR, "
                            "--postprocess_params#min_size 40); --set ID=VALUE is predict's and tune's")
    known = [str(k) for k in known]
    names = {k: k for k in known}
    if depth > 0 and node is not None:  # a part's setting typed without its part: predictor#regionsize
        for part, value in node.items():
            if isinstance(value, dict):
                for name in [*value, *(_keywords(value.get("_target_")) or ())]:
                    names.setdefault(str(name), f"{part}{SEPARATORS[1]}{name}")
    close = difflib.get_close_matches(levels[depth], list(names), n=1)
    if close:
        hint = f"did you mean {SEPARATORS[1].join([*levels[:depth], names[close[0]]])!r}?"
    else:
        hint = f"the config has {', '.join(sorted(known))}"
    return SettingError(f"unknown setting {key!r}; {hint}")


def _parameters(target: Any) -> dict[str, inspect.Parameter] | None:
    """The parameters of a component's ``_target_``; None where it is no dotted path that imports here."""
    if not isinstance(target, str) or "." not in target or _is_code(target):
        return None
    found = pydoc.locate(target)
    try:
        return None if found is None else dict(inspect.signature(found).parameters)
    except (TypeError, ValueError):
        return None


def _keywords(target: Any) -> set[str] | None:
    """The keywords a component's ``_target_`` takes; None where that is not known here (see ``_parameters``, or
    a ``**kwargs``)."""
    parameters = _parameters(target)
    if parameters is None or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _component_default(config: dict, key: str) -> Any:
    """The default of ``key``'s parameter in the signature of the component holding it (``RegionPlanner``'s
    ``region_size: int = 2048``), to type a value the config computes; MISSING where there is none."""
    *path, name = _levels(key)
    node = default_of(config, SEPARATORS[1].join(path)) if path else None  # exists: ``key`` was found in it
    parameter = (_parameters(node.get("_target_")) or {}).get(name) if isinstance(node, dict) else None
    return MISSING if parameter is None or parameter.default is parameter.empty else parameter.default


def _taking_parameters(config: dict, key: str) -> list[inspect.Parameter]:
    """The parameters ``key``'s value reaches: its own in the component holding it, and those of components that
    are given it whole (train.json's ``"window": "@window"`` in ``window_inferer``, annotated ``int | None``)."""
    *path, name = _levels(key)
    found = []
    holder = default_of(config, SEPARATORS[1].join(path)) if path else None
    if isinstance(holder, dict) and name in (_parameters(holder.get("_target_")) or {}):
        found.append(_parameters(holder.get("_target_"))[name])
    reference = "@" + SEPARATORS[1].join(_levels(key))
    todo = [config]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo += node
        elif isinstance(node, dict):
            todo += node.values()
            names = [k for k, v in node.items() if v == reference]
            parameters = _parameters(node.get("_target_")) if names else None
            found += [parameters[k] for k in names if parameters and k in parameters]
    return found


# stand-in defaults that type a setting whose config value is null by the annotation of what takes it
_ANNOTATED = {"int": 0, "float": 0.0, "bool": False}


def _typed_by_parameters(parameters: list[inspect.Parameter]) -> tuple[Any, bool]:
    """A stand-in default of the one plain type ``parameters`` are annotated with (0 for ``int | None``; MISSING
    where there is none or they disagree), and whether they take None (annotated so, or None by default)."""
    names, nullable = set(), False
    for parameter in parameters:
        words = {w.strip() for w in str(parameter.annotation).replace("Optional[", "").rstrip("]").split("|")}
        nullable |= "None" in words or parameter.default is None
        names |= words - {"None"}
    plain = {_ANNOTATED.get(n, MISSING) for n in names}
    return (plain.pop() if len(plain) == 1 else MISSING), nullable


def default_of(config: dict, key: str) -> Any:
    """The config's value at the id ``key`` (``network_def#features``); MISSING for a new argument of a dict below
    the top level; SettingError for an unknown top-level key or a path that does not exist."""
    levels, node = _levels(key), config
    for depth, name in enumerate(levels):
        last = depth == len(levels) - 1
        if isinstance(node, dict):
            if name in node:
                node = node[name]
                continue
            if last and depth > 0:  # a new keyword for a component, as MONAI allows, where its target takes it
                accepted = _keywords(node.get("_target_"))
                if accepted is not None and name not in accepted:
                    raise _unknown(key, levels, depth, accepted, node)
                return MISSING
            raise _unknown(key, levels, depth, node.keys(), node)
        if isinstance(node, list) and name.isdigit() and int(name) < len(node):
            node = node[int(name)]
            continue
        parent = SEPARATORS[1].join(levels[:depth])
        raise SettingError(f"unknown setting {key!r}: {parent!r} holds no setting {name!r}")
    return node


def _is_code(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(CODE_PREFIXES)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# how a setting is typed on each command line, for the messages: train and evaluate take --KEY VALUE, predict and
# tune --set KEY=VALUE
SPELLINGS = {"flag": ("--{key}", "--{key} {value}"), "set": ("--set {key}", "--set {key}={value}")}


def coerce(key: str, text: str, default: Any, spelling: str = "flag", nullable: bool = False) -> Any:
    """The value of ``--key text`` in the type of the config's ``default``, or SettingError. null / none is None
    where the setting takes it (``nullable``, or a default of None); elsewhere it is refused by name."""
    option, setting = SPELLINGS[spelling]
    value = parse_value(text)
    nullable = nullable or default is None
    unknown = default is MISSING or _is_code(default)  # nothing tells what it takes
    if isinstance(value, str) and value.strip().lower() in NULL_WORDS and \
            (nullable or not (unknown or isinstance(default, str))):
        value = None  # a setting that may be text and takes no None keeps the word: it may be a name
    if value is None and (nullable or unknown):
        return None
    if default is MISSING or default is None or _is_code(default) or _is_code(value):
        return value
    if isinstance(default, bool):
        try:
            return parse_bool(value, key, setting)
        except ValueError as err:
            raise SettingError(str(err)) from None
    if value is None:
        raise SettingError(f"{option.format(key=key)} cannot be null: it expects {_kind(default)}, got {text!r}")
    if isinstance(default, str):
        return value if isinstance(value, str) else text
    expected = None
    if _is_int(default) and not _is_int(value):
        expected = "an integer"
    elif isinstance(default, float) and not _is_number(value):
        expected = "a number"
    elif isinstance(default, dict) and not isinstance(value, dict):
        expected = 'a dict, e.g. "{\'key\': 1}"'
    elif isinstance(default, list):
        value = list(value) if isinstance(value, tuple) else value
        if not isinstance(value, list):
            expected = f"a list such as {default!r}"
        elif default and all(_is_int(v) for v in default) and not all(_is_int(v) for v in value):
            expected = f"a list of integers such as {default!r}"
        elif default and all(_is_number(v) for v in default) and not all(_is_number(v) for v in value):
            expected = f"a list of numbers such as {default!r}"
    if expected:
        raise SettingError(f"{option.format(key=key)} expects {expected}, got {text!r}")
    return value


def _kind(default: Any) -> str:
    """What a setting of this default takes, in words."""
    if _is_int(default):
        return "an integer"
    if _is_number(default):
        return "a number"
    if isinstance(default, dict):
        return "a dict"
    if isinstance(default, list):
        return f"a list such as {default!r}"
    return "a text"


def _effective(config: dict, settings: dict, key: str) -> Any:
    """The value ``key`` will have once ``settings`` are applied (a setting of ``key`` or of a dict above it)."""
    levels = _levels(key)
    for depth in range(len(levels), 0, -1):
        prefix = SEPARATORS[1].join(levels[:depth])
        if prefix in settings:
            value = settings[prefix]
            for name in levels[depth:]:
                if not isinstance(value, dict) or name not in value:
                    return MISSING
                value = value[name]
            return value
    try:
        return default_of(config, key)
    except SettingError:
        return MISSING


def check_patch_size(config: dict, settings: dict) -> None:
    """Each side of ``patch_size`` a positive multiple of 2**poolings of ``network_def``: every pooling halves it,
    and the decoder must meet the skips at the same size."""
    patch = _effective(config, settings, "patch_size")
    features = _effective(config, settings, "network_def#features")
    if not isinstance(patch, list) or not all(_is_int(side) for side in patch):
        return  # absent, an expression, or already refused by its type
    # the bundles' deepest network pools 4 times: the multiple to hold when the depth is an expression
    poolings = len(features) - 1 if isinstance(features, list) and len(features) > 1 else 4
    multiple = 2**poolings
    bad = [side for side in patch if side <= 0 or side % multiple]
    if bad:
        from .outputs import ceil_div  # only for the refusal: outputs pulls in the image libraries

        lower = [max(multiple, side // multiple * multiple) for side in patch]
        upper = [max(multiple, ceil_div(side, multiple) * multiple) for side in patch]
        raise SettingError(
            f"--patch_size {patch}: each side must be a positive multiple of {multiple} (the network pools "
            f"{poolings} times), e.g. --patch_size \"{lower}\" or \"{upper}\""
        )


def check(pairs: dict[str, str], config: dict, spelling: str = "flag") -> dict[str, Any]:
    """The command-line ``pairs`` as config overrides with parsed, checked values; SettingError for the first
    one the config cannot take, naming it as typed (``spelling``: ``SPELLINGS``)."""
    settings = {}
    for key, text in pairs.items():
        default = default_of(config, key)
        if default is MISSING or _is_code(default):  # computed by the config: typed by its component, if known
            default = _component_default(config, key)
        stand_in, nullable = _typed_by_parameters(_taking_parameters(config, key))
        if default is None:  # null in the config: typed by what takes it, where that is annotated, and nullable
            default, nullable = (None if stand_in is MISSING else stand_in), True
        settings[SEPARATORS[1].join(_levels(key))] = coerce(key, text, default, spelling, nullable)
    check_patch_size(config, settings)
    return settings
