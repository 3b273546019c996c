"""Configuration: built-in defaults (the same as the documented lolachat.toml), then the user's file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from lolachat.errors import LolachatError

DEFAULTS: dict[str, dict] = {
    "model": {"default": "smollm2-135m"},
    "runtime": {"device": "auto", "dtype": "auto", "threads": 0, "quant": "auto"},
    "lola": {"window": 0, "sparse": -1, "mix": "lola", "max_distance": 0},
    "generation": {"max_new_tokens": 512, "temperature": 0.7, "top_k": 40, "top_p": 0.95, "system": ""},
    "sessions": {"keep_snapshots": 8},
}


def config_path() -> Path:
    explicit = os.environ.get("LOLACHAT_CONFIG")
    if explicit:
        return Path(explicit)
    home = Path(os.environ.get("LOLACHAT_HOME", Path.home() / ".lolachat"))
    return home / "lolachat.toml"


def load_config(path: Path | None = None) -> dict[str, dict]:
    """Defaults overlaid with the user's TOML file (if it exists); unknown keys are an error."""
    path = path or config_path()
    config = {section: dict(values) for section, values in DEFAULTS.items()}
    if not path.exists():
        return config
    try:
        user = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LolachatError(f"config file {path} is not valid TOML: {err}") from None
    for section, values in user.items():
        if section not in config or not isinstance(values, dict):
            raise LolachatError(f"config file {path}: unknown section [{section}]")
        for key, value in values.items():
            if key not in config[section]:
                raise LolachatError(f"config file {path}: unknown key {section}.{key}")
            config[section][key] = value
    return config
