"""YAML + dotted command-line overrides -> a validated :class:`trainers.config.RunConfig`.

Every error names the file, the field, the value and what is allowed, and happens on the driver
before Ray starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainers.config import ConfigError, RunConfig

__all__ = ["ConfigError", "apply_overrides", "dump_config", "load_config", "load_raw", "parse_override",
           "validate_config"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.max_steps=50"`` -> (["trainer", "max_steps"], 50); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value (e.g. trainer.max_steps=50)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({e})") from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; users mean a number
        try:
            value = float(value) if _FLOAT.fullmatch(value) else value
        except ValueError:
            pass
    return parts, value


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating intermediate mappings); an integer segment indexes a list
    (``tasks.1.steps=40``)."""
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = raw
        for i, p in enumerate(parts):
            where = ".".join(parts[: i + 1])
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {text!r}: {where} is not an index of a list of {len(node)} items")
                if last:
                    node[int(p)] = value
                else:
                    node = node[int(p)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:i])} is a {type(node).__name__}, not a section")
            if last:
                node[p] = value
            else:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
    return raw


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the (nested) model that owns ``loc[:-1]``, for 'unknown key' messages."""
    cur: Any = model
    for part in loc[:-1]:
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        cur = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    fields = getattr(cur, "model_fields", None)
    return sorted(fields) if fields else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not isinstance(x, int) or True)
        field = ".".join(str(x) for x in loc) or "(top level)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(RunConfig, loc)
            hint = f"; allowed fields here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  - unknown field {field!r} (value {value!r}){hint}")
        elif e["type"] == "missing":
            lines.append(f"  - missing required field {field!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            ctx = e.get("ctx") or {}
            allowed = ctx.get("expected")
            extra = f" (allowed: {allowed})" if allowed and allowed not in msg else ""
            shown = value if not isinstance(value, dict) else "{...}"
            lines.append(f"  - {field} = {shown!r}: {msg}{extra}")
    return "\n".join(lines)


def load_raw(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (configs are YAML files, e.g. configs/tiny-lm.yaml)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Parse ``path``, apply dotted ``overrides`` and validate; raises :class:`ConfigError`."""
    raw = apply_overrides(load_raw(path), list(overrides or []))
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what `rpt config show` prints and what runs log as an artifact)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
