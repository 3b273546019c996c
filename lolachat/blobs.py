"""Writing verified files into the store: stream to ``<dest>.part``, hash while writing, check the
digest, fsync, then rename atomically. A file is either complete and verified, or absent."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from lolachat.errors import ChecksumMismatch, DiskFull

ProgressCallback = Callable[[str, int, int | None], None]
CHUNK = 1 << 20


def _disk_error(e: OSError, where: Path) -> Exception:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the device holding {where.parent} ({e.strerror}); free some space "
                        "(e.g. `lolachat rm` unused models) or set LOLACHAT_HOME to a larger disk")
    return e


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content (what the Hub reports as ``blobId`` for non-LFS files)."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_space(target_dir: Path, needed: int | None) -> None:
    if not needed:
        return
    target_dir.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(target_dir)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise DiskFull(f"not enough disk space in {target_dir}: need {needed / 1e6:.0f} MB, "
                       f"{free / 1e6:.0f} MB free; free some space or set LOLACHAT_HOME to a larger disk")


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish(part: Path, dest: Path, actual: str, expected: str | None, label: str) -> Path:
    """Check ``actual`` against ``expected`` and move ``part`` to ``dest`` (deleting it on mismatch)."""
    if expected is not None and actual.lower() != expected.lower():
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"checksum mismatch for {label}: expected {expected}, got {actual}; "
                               "the corrupt download was deleted, run the command again")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _stream_to(part: Path, chunks: Iterable[bytes], *, label: str, total: int | None,
               progress: ProgressCallback | None) -> str:
    """Write ``chunks`` to ``part`` (fsynced) and return their sha256; ``part`` is removed on any failure."""
    h = hashlib.sha256()
    done = 0
    try:
        with open(part, "wb") as f:
            if progress:
                progress(label, 0, total)
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress:
                    progress(label, done, total)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        part.unlink(missing_ok=True)
        raise _disk_error(e, part) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return h.hexdigest()


def write_stream(chunks: Iterable[bytes], dest: Path, *, sha256: str | None, label: str,
                 total: int | None = None, progress: ProgressCallback | None = None) -> Path:
    """Write ``chunks`` to ``dest`` atomically, verifying the sha256 (if given)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_space(dest.parent, total)
    part = dest.with_name(dest.name + f".{os.getpid()}.part")
    digest = _stream_to(part, chunks, label=label, total=total, progress=progress)
    return finish(part, dest, digest, sha256, label)


def copy_file(src: Path, dest: Path, *, label: str, sha256: str | None = None,
              progress: ProgressCallback | None = None) -> Path:
    def chunks():
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    return write_stream(chunks(), dest, sha256=sha256, label=label, total=src.stat().st_size, progress=progress)


def store_content_addressed(chunks: Iterable[bytes], blobs_dir: Path, *, label: str, total: int | None = None,
                            progress: ProgressCallback | None = None) -> Path:
    """Write a stream whose hash is not known beforehand to ``blobs_dir/sha256-<hex>``."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    check_space(blobs_dir, total)
    part = blobs_dir / f"incoming-{os.getpid()}-{os.urandom(4).hex()}.part"
    digest = _stream_to(part, chunks, label=label, total=total, progress=progress)
    return finish(part, blobs_dir / f"sha256-{digest}", digest, None, label)


def link_to_blob(link: Path, blob: Path) -> Path:
    """Make `link` name `blob`: a relative symlink, else a hard link, else a copy (filesystems differ)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:
        try:
            os.link(blob, link)
        except OSError:
            shutil.copyfile(blob, link)
    return link
