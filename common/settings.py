"""Settings: a frozen dataclass whose fields carry their own help and rules, and everything derived from them.

A field declared with `setting(default, help, ...)` is written once; from it come the validation in
`__post_init__` (`validate`, a `ValueError` that names the field), the command-line options of every
command that takes the dataclass (`click_options`, each also read from `PS_<NAME>`), building the object
from click's keyword arguments (`pop_settings`), the flags that reproduce an object (`to_flags`), reading
one back from a saved dict (`from_dict`) and the environment names containers set (`env_names`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any

import click

ENV_PREFIX = "PS"
_META = "setting"

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Rule:
    """What one setting may be: a range for numbers, a set of choices, or a parser from text."""

    help: str
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: Callable[[], Iterable[str]] | None = None  # called late: registries fill after import
    parse: Callable[[str], Any] | None = None  # text (flag or environment) to value; ValueError on bad text
    metavar: str | None = None
    short: str | None = None  # e.g. "-k"
    negatable: bool = False  # booleans: --x/--no-x instead of a bare --x
    off: str | None = None  # booleans: the name of the flag that turns it off (default --no-x)

    def describe(self) -> str:
        """The rule in words, for error messages: "must be in [0, 1)", "must be >= 1", ..."""
        if self.min is not None and self.max is not None:
            return (f"must be in {'(' if self.min_open else '['}{_num(self.min)}, {_num(self.max)}"
                    f"{')' if self.max_open else ']'}")
        if self.min is not None:
            return f"must be {'>' if self.min_open else '>='} {_num(self.min)}"
        if self.max is not None:
            return f"must be {'<' if self.max_open else '<='} {_num(self.max)}"
        return ""

    def allows(self, value: Any) -> bool:
        if self.min is not None and not (value > self.min if self.min_open else value >= self.min):
            return False
        if self.max is not None and not (value < self.max if self.max_open else value <= self.max):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def setting(default: Any, help: str, **rule: Any) -> Any:
    """A dataclass field with its help and rule (see `Rule`)."""
    return field(default=default, metadata={_META: Rule(help, **rule)})


def rule_of(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get(_META)


def settings_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if rule_of(f) is not None]


def _base_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """The field's value type without `| None`, and whether None is allowed."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), type(None) in args
    return hint, False


def validate(obj: Any) -> None:
    """Check every setting of `obj` against its rule: `ValueError("name must be ..., got ...")`."""
    cls = type(obj)
    for f in settings_fields(cls):
        rule = rule_of(f)
        value = getattr(obj, f.name)
        kind, optional = _base_type(cls, f)
        if value is None:
            if optional:
                continue
            raise ValueError(f"{f.name} must be given")
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            continue
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and
                                                                                 not isinstance(value, int)):
                raise ValueError(f"{f.name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
            if not rule.allows(value):
                raise ValueError(f"{f.name} {rule.describe()}, got {value!r}")
        if rule.choices is not None:
            choices = sorted(rule.choices())
            if value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")


# ----- the command line ----------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _off_flag(name: str, rule: Rule) -> str:
    return rule.off or f"--no-{name.replace('_', '-')}"


def _click_type(cls: type, f: dataclasses.Field) -> Any:
    rule = rule_of(f)
    kind, _ = _base_type(cls, f)
    if rule.choices is not None:
        return click.Choice(sorted(rule.choices()))
    if rule.parse is not None:
        return _Parsed(rule.parse, rule.metavar or "TEXT")
    if kind in (int, float) and (rule.min is not None or rule.max is not None):
        range_type = click.IntRange if kind is int else click.FloatRange
        return range_type(min=rule.min, max=rule.max, min_open=rule.min_open, max_open=rule.max_open)
    return {int: int, float: float}.get(kind, str)


class _Parsed(click.ParamType):
    """A setting read by its own parser (a ValueError becomes click's usage error)."""

    def __init__(self, parse: Callable[[str], Any], metavar: str) -> None:
        self.parse = parse
        self.name = metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if value == "":
            return None
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class _SettingOption(click.Option):
    """A setting's option: an invalid value read from the environment is reported under the variable's name
    as well as the flag's (`Invalid value for '--lr' (from PS_LR)`), since the user never typed the flag."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = super().get_error_hint(ctx)
        if ctx is None or ctx.get_parameter_source(self.name) is not click.core.ParameterSource.ENVIRONMENT:
            return hint
        envvar = self.envvar or (f"{ctx.auto_envvar_prefix}_{self.name.upper()}" if ctx.auto_envvar_prefix else None)
        return f"{hint} (from {envvar})" if isinstance(envvar, str) else hint


def click_options(cls: type) -> Decorator:
    """A decorator adding one click option per setting of `cls`, in field order (`--name`, from `PS_NAME`)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(settings_fields(cls)):
            rule = rule_of(f)
            kind, _ = _base_type(cls, f)
            names = ([rule.short] if rule.short else []) + [_flag(f.name)]
            default = None if f.default is MISSING else f.default
            if kind is bool:
                two_way = rule.negatable or rule.off
                decls = [f"{_flag(f.name)}/{_off_flag(f.name, rule)}"] if two_way else names
                option = click.option(*decls, f.name, cls=_SettingOption, is_flag=True if not two_way else None,
                                      default=bool(default), show_default=True, help=rule.help)
            else:
                option = click.option(*names, f.name, cls=_SettingOption, type=_click_type(cls, f), default=default,
                                      show_default=default is not None, help=rule.help,
                                      metavar=rule.metavar)
            command = option(command)
        return command

    return decorate


def pop_settings(cls: type, kwargs: dict[str, Any]) -> Any:
    """Build `cls` from click's keyword arguments (removing its settings from them); a rule broken across
    fields (a `ValueError` from `__post_init__`) becomes a usage error."""
    values = {f.name: kwargs.pop(f.name) for f in settings_fields(cls) if f.name in kwargs}
    try:
        return cls(**values)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def to_flags(obj: Any) -> list[str]:
    """The command-line flags that reproduce `obj`'s settings (those that differ from the default)."""
    flags: list[str] = []
    for f in settings_fields(type(obj)):
        value = getattr(obj, f.name)
        if value == f.default:
            continue
        rule = rule_of(f)
        kind, _ = _base_type(type(obj), f)
        if kind is bool:
            flags.append(_flag(f.name) if value else _off_flag(f.name, rule))
        elif value is None:
            continue
        elif isinstance(value, tuple):
            flags += [_flag(f.name), ",".join(repr(v) for v in value)]
        elif rule.parse is not None and isinstance(value, str):
            flags += [_flag(f.name), value]
        else:
            flags += [_flag(f.name), repr(value) if isinstance(value, float) else str(value)]
    return flags


def to_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def from_dict(cls: type, data: dict[str, Any], renamed: dict[str, Callable[[Any], tuple[str, Any]]] | None = None) -> Any:
    """`cls` from a saved dict (a checkpoint, a metrics record): lists become tuples where the field is a
    tuple, keys the class does not know are an error, `renamed` maps old keys to (new key, value)."""
    data = dict(data)
    for old, convert in (renamed or {}).items():
        if old in data:
            new, value = convert(data.pop(old))
            data.setdefault(new, value)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    for key, value in data.items():
        kind, _ = _base_type(cls, names[key])
        if isinstance(value, list) and typing.get_origin(kind) is tuple:
            data[key] = tuple(value)
    return cls(**data)


def env_name(name: str) -> str:
    return f"{ENV_PREFIX}_{name.upper()}"


def env_names(cls: type) -> list[str]:
    """The environment variables that set `cls`'s settings, in field order."""
    return [env_name(f.name) for f in settings_fields(cls)]


def helps(cls: type) -> dict[str, str]:
    return {f.name: rule_of(f).help for f in settings_fields(cls)}


def floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers ("80,120") as a tuple; a parser for `Rule.parse`."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers like '80,120', got {text!r}") from None


__all__: Sequence[str] = ["Rule", "click_options", "env_name", "env_names", "floats", "from_dict", "helps",
                          "pop_settings", "rule_of", "setting", "settings_fields", "to_dict", "to_flags", "validate"]
