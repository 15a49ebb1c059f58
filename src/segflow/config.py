"""Stage configuration: one frozen pydantic model per stage.

Values come from a YAML file (``--config``) and/or flags; a flag that is given wins over the
file. The config saved beside an artifact is ``public_dict()``: secrets are never in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from segflow.errors import ConfigError
from segflow.storage import StorageOptions, sha256_json


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
        data = self.model_dump(mode="json", exclude={"storage"})
        data["storage"] = self.storage.public_dict()
        return _drop_secrets(data, self)

    def fingerprint(self) -> str:
        """Hash of the fields that determine a stage's outputs (for cache keys)."""
        data = {k: v for k, v in self.public_dict().items() if k not in self.runtime_fields}
        return sha256_json(data)

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
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of option: value, "
            f"got {type(data).__name__}"
        )
    return {k.replace("-", "_"): v for k, v in data.items()}


def format_validation_error(name: str, err: ValidationError) -> str:
    lines = [f"invalid {name}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        got = e.get("input")
        shown = "<hidden>" if "secret" in loc or "key" in loc or "token" in loc else repr(got)
        lines.append(f"  {loc}: {e['msg']} (received {shown})")
    return "\n".join(lines)


def _drop_secrets(data: dict[str, Any], model: BaseModel) -> dict[str, Any]:
    for name in list(data):
        if isinstance(getattr(model, name, None), SecretStr):
            data.pop(name)
    return data


def dumps_public(cfg: StageConfig) -> str:
    return json.dumps(cfg.public_dict(), indent=2, sort_keys=True)
