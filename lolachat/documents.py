"""Reading a user's text file for document Q&A: refuse binaries, survive bad encodings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lolachat.errors import BadInput

SNIFF_BYTES = 8192
# Control bytes other than tab, newline, carriage return, form feed and escape: rare in text.
_CONTROL = set(range(32)) - {9, 10, 12, 13, 27}


@dataclass
class Document:
    text: str
    path: Path
    replaced_bytes: int  # bytes that were not valid UTF-8 and became U+FFFD


def read_document(path: str | Path) -> Document:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"file not found: {path}") from None
    except IsADirectoryError:
        raise BadInput(f"{path} is a directory, not a text file") from None
    except PermissionError:
        raise BadInput(f"permission denied reading {path}") from None
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror}") from None
    if looks_binary(data):
        raise BadInput(f"{path} looks like a binary file, not text; convert it to text first")
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if not text.strip():
        raise BadInput(f"{path} is empty")
    return Document(text.removeprefix("\ufeff"), path, replaced)


def looks_binary(data: bytes) -> bool:
    """NUL bytes, or more than 10% control bytes in the first few KB, mean binary."""
    head = data[:SNIFF_BYTES]
    if not head:
        return False
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b in _CONTROL)
    return controls / len(head) > 0.10
