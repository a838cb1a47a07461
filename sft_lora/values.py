"""One recipe value against the field that receives it: the field's type hint and default (`class_fields`), the
choices its metadata allows, YAML 1.1's surprises undone (`coerce`), its type checked (`type_ok`) and described in an
error (`describe`), and a did-you-mean for a mistyped name (`suggest`)."""

import dataclasses
import difflib
import enum
import functools
import inspect
import math
import re
import types
import typing
from typing import Any


@functools.cache  # type hints are resolved once per class, not per recipe (~1.4 ms for SFTConfig)
def class_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """name → (type hint, default) of the keyword arguments `cls` takes."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an upstream annotation we cannot resolve (after an upgrade): fall back to the defaults' types
        hints = {}
    params = inspect.signature(cls).parameters
    return {n: (hints.get(n, Any), p.default) for n, p in params.items() if p.kind is not p.VAR_KEYWORD}


@functools.cache
def field_choices(cls: type) -> dict[str, Any]:
    """name → the values a dataclass field's metadata allows (`field(metadata={"choices": …})`)."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(cls) if "choices" in f.metadata} \
        if dataclasses.is_dataclass(cls) else {}


def describe(hint: Any) -> str:
    """A type hint as an error line says it: `str | None`, `bool | 'gaussian' | 'pissa'`."""
    if (origin := typing.get_origin(hint)) in (typing.Literal, typing.Union, types.UnionType):
        return " | ".join(repr(part) if origin is typing.Literal else describe(part) for part in typing.get_args(hint))
    if origin in (list, tuple, set) and typing.get_args(hint):  # `list[str]`: its items' type said too
        return f"{origin.__name__}[{', '.join(describe(part) for part in typing.get_args(hint))}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def coerce(value: Any, hint: Any, default: Any) -> Any:
    """Undo two YAML 1.1 surprises: `1e-4` read as a string where the field wants a float (it wants `1.0e-4`; in a
    mapping of keyword arguments too, `lr_scheduler_kwargs: {min_lr: 1e-5}`), `no` read as false where "no" is one
    of the field's choices (`eval_strategy: no`); free text stays as YAML read it."""
    if isinstance(value, dict):  # upstream passes these on untyped (a str min_lr failed at the first step)
        return {k: float(v) if isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v) else v
                for k, v in value.items()}
    if isinstance(value, str) and (_accepts(hint, float) or type(default) is float):
        try:
            return float(value) if math.isfinite(float(value)) else value  # "nan", "inf": not a usable number
        except ValueError:
            return value
    enums = [t for t in typing.get_args(hint) or [hint] if isinstance(t, type) and issubclass(t, enum.Enum)]
    word = {True: "yes", False: "no"}.get(value) if isinstance(value, bool) and not _accepts(hint, bool) else None
    return word if word in [m.value for t in enums for m in t] else value


def _accepts(hint: Any, kind: type) -> bool:
    return hint is kind or typing.get_origin(hint) in (typing.Union, types.UnionType) and kind in typing.get_args(hint)


def type_ok(value: Any, hint: Any, default: Any) -> bool:
    if hint is Any:
        if default is None or default is inspect.Parameter.empty:
            return True
        hint = type(default)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h, inspect.Parameter.empty) for h in typing.get_args(hint))
    if origin is typing.Literal:  # PEFT's 'pissa_niter_[number of iters]' stands for pissa_niter_16 …
        patterns = [v.partition("[")[0] for v in typing.get_args(hint) if isinstance(v, str) and "[" in v]
        return value in typing.get_args(hint) or isinstance(value, str) and value.startswith(tuple(patterns) or "\0")
    if origin in (list, tuple, set) and isinstance(value, (list, tuple) if origin is tuple else origin) and (
            args := typing.get_args(hint)):  # YAML has no tuples: a list stands for one (lora.layer_replication)
        return all(type_ok(item, args[0], inspect.Parameter.empty) for item in value)  # [no] is [False]
    if origin is not None:  # dict[str, Any] …; typing's own forms (Annotated …) are left to upstream
        return isinstance(value, origin) if isinstance(origin, type) else True
    if hint in (bool, str, list, dict, tuple, type(None)):
        return isinstance(value, hint)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in [m.value for m in hint]  # a list value is unhashable
    return True  # richer upstream types (torch.dtype, classes) are left to the upstream constructor
