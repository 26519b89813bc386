"""Command-line flags made from option dataclasses, and dotted changes to a tree of them.

Each field of an option dataclass becomes one flag, so a default is written once, in the
dataclass:

* the flag is ``--`` + the field name with ``-`` for ``_`` (or ``metadata["flag"]``);
* its help is the docstring written under the field, plus the default;
* its default is the field's value in the instance given (a preset), or the environment
  variable ``metadata["env"]`` when that is set;
* its type comes from the annotation: ``int``, ``float``, ``str`` and ``X | None`` take one
  value, ``bool`` is a switch, ``tuple[float, ...]`` takes one or more values, ``list[str]`` is
  repeatable and ``dict[str, float]`` is repeatable as ``NAME=AMOUNT``;
* a field holding another option dataclass becomes a group of flags;
* ``metadata["cli"] = False`` leaves a field off the command line.

Validation stays in the dataclasses (``__post_init__`` raising :class:`OptionError`); a bad
value on the command line fails with argparse's usage message naming the flag::

    parser = argparse.ArgumentParser()
    flags = OptionFlags(parser, SweepOptions())
    opts = flags.options(parser.parse_args())
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

T = TypeVar("T")

FLAG = "flag"
"""Field metadata key: the flag's name without ``--`` when it is not the field's name."""
METAVAR = "metavar"
ENV = "env"
"""Field metadata key: an environment variable that overrides the default on the command line."""
CLI = "cli"
"""Field metadata key: ``False`` leaves the field off the command line."""


class OptionError(ValueError):
    """An option value that cannot be used; ``fields`` names the field(s) at fault."""

    def __init__(self, fields: str | tuple[str, ...], message: str) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.message = message
        super().__init__(f"{'/'.join(self.fields)}: {message}")

    def within(self, prefix: str) -> OptionError:
        """The same error with its fields named from the enclosing option dataclass."""
        return OptionError(tuple(f"{prefix}.{f}" for f in self.fields), self.message)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``, as one line each."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app, interactive): flags without help
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def with_changes(obj: T, changes: Mapping[str, Any]) -> T:
    """A copy of the option tree ``obj`` with ``{"name": "x", "search.trials": 2}``-style
    changes, validated again by every changed dataclass; an unknown key fails naming it."""
    valid = [f.name for f in dataclasses.fields(obj)]  # type: ignore[arg-type]
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if head not in valid:
            raise OptionError(key, f"unknown option; valid ones are {valid}")
        if not rest:
            own[head] = value
        elif dataclasses.is_dataclass(getattr(obj, head)):
            nested.setdefault(head, {})[rest] = value
        else:
            raise OptionError(key, f"{head} has no sub-options")
    for head, sub in nested.items():
        try:
            own[head] = with_changes(own.get(head, getattr(obj, head)), sub)
        except OptionError as err:
            raise err.within(head) from None
    return dataclasses.replace(obj, **own)  # type: ignore[type-var]


class OptionFlags:
    """The flags of an option dataclass tree on an ``argparse`` parser (see the module doc)."""

    def __init__(self, parser: argparse.ArgumentParser, defaults: Any) -> None:
        self.parser = parser
        self.defaults = defaults
        self.flags: dict[str, str] = {}
        """Dotted field path -> its flag, e.g. ``{"search.steps": "--steps"}``."""
        self._finish: dict[str, Callable[[Any], Any]] = {}
        self._add_fields(parser, defaults, "")

    def options(self, namespace: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> Any:
        """The options the parsed command line gives (``extra``: values of fields without a
        flag, by dotted path); a value the dataclasses refuse exits naming its flag."""
        given = vars(namespace)
        changes = {
            path: given[path] if given[path] is None else self._finish.get(path, _same)(given[path])
            for path in self.flags
            if path in given
        }
        try:
            return with_changes(self.defaults, {**changes, **(extra or {})})
        except OptionError as err:
            flags = "/".join(self.flags.get(f, f) for f in err.fields)
            self.parser.error(f"argument {flags}: {err.message}")

    def _add_fields(self, group: Any, obj: Any, prefix: str) -> None:
        docs = field_docs(type(obj))
        hints = typing.get_type_hints(type(obj))
        subs = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not f.metadata.get(CLI, True):
                continue
            if dataclasses.is_dataclass(value):
                subs.append((f.name, value))
                continue
            self._add_flag(group, f, hints[f.name], prefix + f.name, value, docs.get(f.name, ""))
        for name, value in subs:  # groups after the plain flags, in field order
            doc = (type(value).__doc__ or "").strip().splitlines()
            sub = self.parser.add_argument_group(name.replace("_", " "), doc[0] if doc else None)
            self._add_fields(sub, value, f"{prefix}{name}.")

    def _add_flag(
        self, group: Any, f: dataclasses.Field, tp: Any, path: str, value: Any, doc: str
    ) -> None:
        flag = "--" + f.metadata.get(FLAG, f.name.replace("_", "-"))
        if flag in self.flags.values():
            raise ValueError(f"two option fields make the flag {flag}; set metadata {FLAG!r}")
        self.flags[path] = flag
        env = f.metadata.get(ENV)
        metavar = f.metadata.get(METAVAR, flag[2:].upper().replace("-", "_"))
        kw = _argument(_strip_none(tp), value, metavar)
        finish = kw.pop("finish", None)
        if finish is not None:
            self._finish[path] = finish
        if env and os.environ.get(env) is not None:
            kw["default"] = os.environ[env]
        kw["help"] = _help(doc, value, env)
        group.add_argument(flag, dest=path, **kw)


def _same(x: Any) -> Any:
    return x


def _strip_none(tp: Any) -> Any:
    """``X`` of ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argument(tp: Any, value: Any, metavar: str) -> dict[str, Any]:
    """``add_argument`` keywords for type ``tp`` with default ``value`` (plus ``finish``: what
    turns the parsed value into the field's type, where that differs)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    kw: dict[str, Any] = {"default": value, "metavar": metavar}
    if tp is bool and value is None:  # unset until a flag says: --x / --no-x
        kw = {"default": None, "action": argparse.BooleanOptionalAction}
    elif tp is bool:
        kw = {"default": value, "action": "store_true"}
    elif tp in (int, float, str):
        kw["type"] = tp
    elif origin is Literal:
        kw.update(type=type(args[0]), choices=args)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        kw.update(type=args[0], nargs="+", finish=tuple)
    elif origin is list:
        kw.update(type=args[0], action="append", default=list(value))
    elif origin is dict and args[0] is str:
        kw.update(type=_pair(args[1]), action="append", default=list(value.items()), finish=dict)
    else:
        raise TypeError(f"no command-line flag for a field of type {tp}")
    return kw


def _pair(value_type: Callable[[str], Any]) -> Callable[[str], tuple[str, Any]]:
    """Parser of ``NAME=VALUE`` into ``(name, value_type(value))``."""

    def parse(text: str) -> tuple[str, Any]:
        name, sep, raw = text.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
        try:
            return name.strip(), value_type(raw)
        except ValueError:
            kind = getattr(value_type, "__name__", str(value_type))
            raise argparse.ArgumentTypeError(f"{raw!r} in {text!r} is not a {kind}") from None

    return parse


def _help(doc: str, value: Any, env: str | None) -> str:
    """The field's docstring plus its default (nothing for none, off or empty)."""
    if isinstance(value, (tuple, list)):
        shown = " ".join(map(str, value))
    elif isinstance(value, dict):
        shown = " ".join(f"{k}={v}" for k, v in value.items())
    else:
        shown = "" if value is None or value is False else str(value)
    if env:
        shown = f"${env}, else {shown or 'none'}"
    default = f" (default: {shown})" if shown else ""
    return (doc + default).replace("%", "%%").strip()
