"""Set `[model] default` in the user's configuration file, keeping the rest of the file as it is."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from lolachat.config import config_path, load_config
from lolachat.errors import LolachatError
from lolachat.persist import atomic_write

_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*(#.*)?$")
_DEFAULT = re.compile(r"^\s*default\s*=")


def set_default_model(name: str, path: Path | None = None) -> Path:
    """Write `default = "name"` into the [model] section (created if missing); atomic. Returns the file."""
    path = path or config_path()
    load_config(path)  # refuse to edit a file that is not valid
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    entry = f"default = {json.dumps(name)}"
    section = None
    start = None
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m:
            if section == "model" and start is not None:
                lines.insert(i, entry)
                break
            section = m.group(1).strip()
            if section == "model":
                start = i
            continue
        if section == "model" and _DEFAULT.match(line):
            lines[i] = entry
            break
    else:
        if start is None:
            lines += (["", "[model]"] if lines else ["[model]"]) + [entry]
        else:
            lines.append(entry)
    text = "\n".join(lines) + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise LolachatError(f"could not update {path}: {err}") from None
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
