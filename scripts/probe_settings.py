"""What the probe scripts (ppl_probe.py, needle_probe.py) share: their `--set NAME:key=value,...` settings and
their lengths ("2K", "16384")."""

from __future__ import annotations

from collections.abc import Callable


def parse_setting(text: str, cfg_keys: dict[str, Callable], knobs: dict[str, Callable]) -> tuple[str, dict, dict]:
    """"name:key=value,..." -> (name, LolaConfig overrides, probe knobs), each value cast by its key's type."""
    name, _, rest = text.partition(":")
    cfg, knob_values = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in cfg_keys:
            cfg[key] = cfg_keys[key](value)
        elif key in knobs:
            knob_values[key] = knobs[key](value)
        else:
            raise SystemExit(f"unknown key {key!r} in setting {text!r}")
    return name, cfg, knob_values


def parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)
