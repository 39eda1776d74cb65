"""Reading a YAML config file into a frozen pydantic model, with errors a user can act on.

Every config of the project (scenarios, simulator parameters, training, serving, cluster) goes
through ``load_model``: a file that cannot be read, is not YAML, is not a mapping, or breaks a
rule gives one ``ConfigError`` (or the subclass asked for) with a line per problem of the form
``FILE: key.path: what is wrong``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from envs.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_mapping(
    path: str | Path, *, what: str, error: type[ConfigError] = ConfigError, allow_empty: bool = True
) -> dict[str, Any]:
    """The YAML mapping in ``path`` (an empty file is ``{}`` when ``allow_empty``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    if raw is None and allow_empty:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{path}: {what} must be a mapping of keys to values")
    return raw


def validated(model: type[M], raw: Any, *, where: str, error: type[ConfigError] = ConfigError) -> M:
    """``model`` validated from ``raw``; one line per problem, prefixed with ``where``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{where}: {loc}: {err['msg'].removeprefix('Value error, ')}")
        raise error("\n".join(lines)) from None


def load_model(
    path: str | Path,
    model: type[M],
    *,
    what: str,
    error: type[ConfigError] = ConfigError,
    allow_empty: bool = True,
    overrides: dict[str, Any] | None = None,
) -> M:
    """Read ``path`` and validate it as ``model``; ``overrides`` replace top-level keys."""
    raw = read_mapping(path, what=what, error=error, allow_empty=allow_empty)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validated(model, raw, where=str(path), error=error)
