"""Stage configuration: one frozen pydantic model per stage.

Values come from a YAML file (``--config``) and/or flags; a flag that is given wins over the
file. The config saved beside an artifact is ``public_dict()``: secrets are never in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from segflow.errors import ConfigError
from segflow.storage import HIDDEN, StorageOptions, is_secret_name, redact, redact_url


class StageConfig(BaseModel):
    """Base for stage configs: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    storage: StorageOptions = StorageOptions()

    #: fields that change how a stage runs but not what it produces (left out of the key)
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {"storage", "workers", "dask_address", "strict"}
    )

    def public_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every secret removed: safe to log, print and save."""
        data = redact(self.model_dump(mode="json", exclude={"storage"}))
        data["storage"] = self.storage.public_dict()
        return _drop_secrets(data, self)

    def __repr_args__(self):
        # addresses may carry userinfo too (ray://user:pass@host); storage redacts its own
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) else value

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Self:
        """Build from an optional YAML file plus overrides; ``None`` overrides are ignored."""
        data: dict[str, Any] = {}
        if config_file is not None:
            data = read_yaml(config_file)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(cls.__name__, e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        # only the position and the problem: PyYAML's own text quotes the offending line,
        # which may hold a credential
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of option: value, "
            f"got {type(data).__name__}"
        )
    return {k.replace("-", "_"): v for k, v in data.items()}


def format_validation_error(name: str, err: ValidationError) -> str:
    """One line per error: where, what is wrong, and what was received, never a credential."""
    lines = [f"invalid {name}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {redact_url(e['msg'])}{_received(e)}")
    return "\n".join(lines)


def _received(e: Any) -> str:
    """The `` (received ...)`` part of one error, or nothing where showing the input could
    reveal a credential or says nothing: a missing field or a model-level check gets the whole
    mapping as its input; an unknown key may be a misspelt secret."""
    got = e.get("input")
    if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict):
        return ""
    if any(is_secret_name(part) for part in e["loc"]) or "storage" in e["loc"]:
        return f" (received {HIDDEN})"
    return f" (received {redact(got)!r})"


def _drop_secrets(data: dict[str, Any], model: BaseModel) -> dict[str, Any]:
    for name in list(data):
        if isinstance(getattr(model, name, None), SecretStr):
            data.pop(name)
    return data
