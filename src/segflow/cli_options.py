"""Typer options generated from a stage config model: one source per option.

An option's help is its field's ``description`` and its shown default the field's default, so
the flag, its help and the config key cannot drift apart. Every generated option defaults to
``None``: a flag that is not given leaves the value to ``--config`` or the model's default.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])


def _flag_type(annotation: Any) -> Any:
    """The type click parses: the field's type without ``None``; choices (``Literal``) and mixed
    unions stay ``str`` on the command line and the model validates them, with its message."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else str
    if origin is Literal:
        return str
    return annotation


def _shown_default(default: Any) -> str | bool:
    if default is None or isinstance(default, bool) or not _is_plain(default):
        return False
    if isinstance(default, tuple):
        return " ".join(str(x) for x in default)
    return str(default)


def _is_plain(value: Any) -> bool:
    return isinstance(value, str | int | float | tuple)


def option_parameter(
    model: type[BaseModel], name: str, *, decl: str | None = None, flag_type: Any = None
) -> inspect.Parameter:
    """The keyword parameter of one generated ``--option`` for field ``name`` of ``model``."""
    field = model.model_fields[name]
    if not field.description:
        raise TypeError(f"{model.__name__}.{name} needs a description: it is the flag's help")
    kind = flag_type if flag_type is not None else _flag_type(field.annotation)
    decls = [decl] if decl else []
    if kind is bool and not decls:
        decls = [f"--{name.replace('_', '-')}"]  # an on-switch; off is the default
    info = typer.Option(
        *decls,
        help=field.description,
        show_default=False if field.is_required() else _shown_default(field.default),
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, info]
    )


def config_options(
    model: type[BaseModel],
    names: str | Iterable[str],
    *,
    decls: Mapping[str, str] | None = None,
    flag_types: Mapping[str, Any] | None = None,
) -> Callable[[F], F]:
    """Decorator: the command takes one ``--option`` per field in ``names`` (a list, or one
    string of space-separated names), placed before its own
    parameters) and receives them in its ``**opts``, ready for ``model.load(config, **opts)``.

    ``decls`` overrides a flag's spelling (``--require-masks/--allow-unlabeled``); ``flag_types``
    its command-line type where it differs from the field's (``--fold-ids 0,3`` for a list).
    """
    names = tuple(names.split() if isinstance(names, str) else names)
    decls = dict(decls or {})
    flag_types = dict(flag_types or {})

    def install(func: F) -> F:
        generated = [
            option_parameter(model, n, decl=decls.get(n), flag_type=flag_types.get(n))
            for n in names
        ]
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(func, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        # typer reads the signature; click calls the command with keywords only
        func.__signature__ = inspect.Signature([*generated, *own])  # type: ignore[attr-defined]
        func.config_model = model  # type: ignore[attr-defined]
        func.config_fields = names  # type: ignore[attr-defined]
        return func

    return install
