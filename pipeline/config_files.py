"""Reading and writing configs: defaults, then a profile, the TOML file and --set (`load_config`); a
result's stored config.json (`from_dict`); overrides of a loaded config (`with_overrides`); one setting
written back into the TOML file (`persist_setting`). Every value is typed and checked on the way in, and
the Config that comes out is immutable.
"""

from __future__ import annotations

import json
import re
import tomllib
import typing
from pathlib import Path

from leakpipe.pipeline.config import (
    ADDED_KEYS,
    CHOICES,
    DEFAULT_PROFILE,
    ITEM_CHOICES,
    PROFILES,
    RETIRED_KEYS,
    SECTIONS,
    Config,
    ConfigError,
    validation_problems,
    valid_keys,
)
from leakpipe.pipeline.store.atomic import atomic_write_text


def _field_type(section: type, name: str):
    return typing.get_type_hints(section)[name]


def _coerce(key: str, raw, typ):
    """Convert `raw` (a string from --set, or a TOML value) to `typ`, or raise ConfigError."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            low = str(raw).strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float):
            if isinstance(raw, bool):
                raise ValueError
            value = typ(raw)
            if typ is int and isinstance(raw, float) and raw != int(raw):
                raise ValueError
            return value
        if typ is str:
            if not isinstance(raw, str):
                raise ValueError
            return raw
        if origin in (list, tuple):
            (inner,) = set(typing.get_args(typ)) - {Ellipsis}
            if isinstance(raw, str):
                text = raw.strip()
                items = json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
            else:
                items = list(raw)
            return [_coerce(key, item, inner) for item in items]
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    else:
        raise ConfigError(f"{key}: unsupported type {typ}")
    raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {raw!r}")


def _unknown(key: str) -> ConfigError:
    """The error for a key that does not exist, naming the nearest valid ones."""
    import difflib  # only for the message

    keys = valid_keys()
    section, _, name = key.rpartition(".")
    same = [k.split(".", 1)[1] for k in keys if k.split(".")[0] == section]
    if same:  # a known section: compare the name with its keys only
        near = [f"{section}.{n}" for n in difflib.get_close_matches(name, same, n=3, cutoff=0.6)]
    else:
        names = [x.split(".", 1)[1] for x in keys]
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.7) or [
            k for k in keys if k.split(".", 1)[1] in difflib.get_close_matches(name, names, 3, 0.75)
        ]
    hint = (
        f"did you mean {' or '.join(near)}?"
        if near
        else f"the keys of [{section}] are {', '.join(same)}"
        if same
        else f"sections: {', '.join(dict.fromkeys(k.split('.')[0] for k in keys))}"
    )
    return ConfigError(f"unknown setting {key!r}: {hint} (`leakpipe config` lists every key)")


def assign(data: dict, key: str, raw) -> None:
    """Set dotted `key` in `data` (a config as nested dicts, see Config.to_dict) to `raw`, converted to
    the key's type and checked against its choices; unknown keys list the valid ones."""
    if key in RETIRED_KEYS:
        raise ConfigError(f"{key} was replaced by {RETIRED_KEYS[key]}")
    if key not in valid_keys():
        raise _unknown(key)
    section, name = key.split(".", 1)
    value = _coerce(key, raw, _field_type(SECTIONS[section], name))
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    bad = [v for v in value if v not in ITEM_CHOICES[key]] if key in ITEM_CHOICES else []
    if bad:
        raise ConfigError(f"{key}: {', '.join(map(repr, bad))} not among {', '.join(ITEM_CHOICES[key])}")
    data[section][name] = value


def build(data: dict, where: str = "") -> Config:
    """The validated, immutable Config of `data` (nested dicts); every invalid value at once."""
    sections: dict[str, typing.Any] = {name: cls(**data[name]) for name, cls in SECTIONS.items()}
    cfg = Config(**sections)
    problems = validation_problems(cfg)
    if problems:
        raise ConfigError(f"invalid settings{where}:\n  " + "\n  ".join(problems))
    return cfg


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r} (for example --set vae.dtype=float16)")
    key, value = item.split("=", 1)
    return key.strip(), value


def _apply(data: dict, tables: dict, path) -> None:
    for section, values in tables.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level {section!r} must be a [section] table")
        for name, value in values.items():
            try:
                assign(data, f"{section}.{name}", value)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None


def load_config(
    path: Path | None = None, overrides: typing.Iterable[str] = (), profile: str = DEFAULT_PROFILE
) -> Config:
    """Defaults, then the profile, then the TOML file (if any), then `key=value` overrides, in that order."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    data = Config().to_dict()
    for item in PROFILES[profile]:
        assign(data, *parse_override(item))
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        _apply(data, _toml(text, path), path)
    for item in overrides:
        assign(data, *parse_override(item))
    return build(data, f" ({path} and --set)" if path is not None else "")


def with_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """A new Config: `cfg` with `key=value` overrides, typed and validated like --set."""
    data = cfg.to_dict()
    for item in overrides:
        assign(data, *parse_override(item))
    return build(data, " (--set)")


def from_dict(stored: dict, where: str = "a stored config") -> Config:
    """A config saved by Config.to_dict (a result's config.json), typed and validated like a TOML file.
    A key it lacks was added after it was written and takes its earlier default (ADDED_KEYS)."""
    data = Config().to_dict()
    for key, value in ADDED_KEYS.items():
        assign(data, key, value)
    if not isinstance(stored, dict):
        raise ConfigError(f"{where}: not a config (expected an object of [section] tables)")
    _apply(
        data,
        {
            s: {k: v for k, v in t.items() if f"{s}.{k}" not in RETIRED_KEYS} if isinstance(t, dict) else t
            for s, t in stored.items()
        },
        where,
    )
    return build(data, f" ({where})")


def to_toml(cfg: Config) -> str:
    """The full config as TOML (for `leakpipe config show` and run records)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            lines.append(f"{name} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def persist_setting(path: Path, key: str, value) -> object:
    """Write `key = value` into the TOML file `path` (created if missing), leaving every other line as
    it is, and return the value it had there (None if unset). The file is checked to load after."""
    assign(Config().to_dict(), key, value)  # the value must be valid before anything is written
    section, name = key.split(".", 1)
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    before = tomllib.loads(text).get(section, {}).get(name) if text else None
    lines, line = text.splitlines(), f"{name} = {json.dumps(value)}"
    start = next((i for i, s in enumerate(lines) if s.strip() == f"[{section}]"), None)
    if start is None:
        lines += ([""] if lines else []) + [f"[{section}]", line]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        hit = next((i for i in range(start + 1, end) if re.match(rf"\s*{re.escape(name)}\s*=", lines[i])), None)
        lines.insert(start + 1, line) if hit is None else lines.__setitem__(hit, line)
    new = "\n".join(lines) + "\n"
    check = Config().to_dict()
    _apply(check, _toml(new, path), path)
    if check[section][name] != value:
        raise ConfigError(
            f"{path}: could not set {key} (the file defines it in a way leakpipe does not "
            f"edit); set it by hand: [{section}] {line}"
        )
    atomic_write_text(path, new)
    return before


def _toml(text: str, path) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
