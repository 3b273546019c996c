"""Training text for `lolachat distill`: natural-language documentation available offline.

Sources (each is named in the adapter's metadata):
- `pydoc`: Python's own reference topics (`pydoc_data.topics`), always present with Python;
- `vim`: Vim's help files (`/usr/share/vim/vim*/doc/*.txt`);
- `info`: GNU info manuals (`/usr/share/info/*.info*.gz`);
- `doc`: README / guide text installed by packages under `/usr/share/doc` (no changelogs, no licences);
- `man`: manual pages rendered by `man` (slow; not in the default set);
- a file or folder of `.txt` / `.md` files given on the command line.

Held-out documents: ~3% of the documents, chosen by a hash of their source kind and name, never enter training; they are
written to a text file for evaluation (`lolachat eval ppl --file`). A prepared corpus is one `.npz` file
(token ids + JSON metadata), so a GPU machine without these files can train on the same text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lolachat.errors import BadInput

DEFAULT_SOURCES = ("pydoc", "vim", "info", "doc")
ALL_SOURCES = (*DEFAULT_SOURCES, "man")
HELDOUT_PERCENT = 3
MIN_CHARS = 400
MAX_FILE_BYTES = 4 << 20
_SKIP_DOC = re.compile(r"changelog|copyright|licen[cs]e|news|authors|thanks|\.(c|h|py|pl|sh|js|html?|png|gif|css)"
                       r"(\.gz)?$", re.IGNORECASE)
_KEEP_DOC = re.compile(r"(readme|\.txt|\.md|\.rst|faq|todo|guide|howto|\.text)(\.gz)?$", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class Document:
    source: str
    name: str
    text: str

    @property
    def heldout(self) -> bool:
        kind = self.source.split(":", 1)[0]  # "file:/some/where" hashes as "file": location-independent
        digest = hashlib.sha1(f"{kind}:{self.name}".encode()).digest()
        return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw[:4096]:
        return None
    return raw.decode("utf-8", errors="replace")


def clean(text: str) -> str:
    """Control characters out, trailing spaces off, runs of blank lines collapsed."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def looks_like_prose(text: str) -> bool:
    if len(text) < MIN_CHARS:
        return False
    sample = text[:20000]
    letters = sum(ch.isalpha() or ch == " " for ch in sample)
    return letters / len(sample) > 0.7


def _pydoc() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield Document("pydoc", name, topics[name])


def _files(pattern_root: str, glob: str) -> list[Path]:
    return sorted(p for p in Path(pattern_root).glob(glob) if p.is_file())


def _vim() -> Iterator[Document]:
    for path in _files("/usr/share/vim", "vim*/doc/*.txt"):
        text = _read_text(path)
        if text:
            yield Document("vim", path.name, text)


def _info() -> Iterator[Document]:
    for path in _files("/usr/share/info", "*.info*.gz"):
        text = _read_text(path)
        if text:
            yield Document("info", path.name, text)


def _doc() -> Iterator[Document]:
    root = Path("/usr/share/doc")
    if not root.is_dir():
        return
    for dirpath, _, filenames in sorted(os.walk(root)):
        for filename in sorted(filenames):
            if _SKIP_DOC.search(filename) or not _KEEP_DOC.search(filename):
                continue
            path = Path(dirpath) / filename
            text = _read_text(path)
            if text:
                yield Document("doc", str(path.relative_to(root)), text)


def _man(limit: int = 400) -> Iterator[Document]:
    pages = _files("/usr/share/man", "man1/*.1.gz")[:limit]
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0")
    for page in pages:
        try:
            out = subprocess.run(["man", "-l", str(page)], capture_output=True, env=env, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return
        text = re.sub(r".\x08", "", out.stdout.decode("utf-8", errors="replace"))
        yield Document("man", page.name, text)


def _user_path(path: Path) -> Iterator[Document]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".rst"))
    for file in files:
        text = _read_text(file)
        if text:
            yield Document(f"file:{path}", str(file.relative_to(path)) if path.is_dir() else file.name, text)


_SOURCES: dict[str, Callable[[], Iterator[Document]]] = {
    "pydoc": _pydoc, "vim": _vim, "info": _info, "doc": _doc, "man": _man,
}


def collect(sources: list[str]) -> list[Document]:
    """Documents of the named sources (or paths), cleaned, prose-like, de-duplicated by content."""
    docs: list[Document] = []
    seen: set[bytes] = set()
    for source in sources:
        if source in _SOURCES:
            found = _SOURCES[source]()
        elif Path(source).expanduser().exists():
            found = _user_path(Path(source).expanduser())
        else:
            raise BadInput(f"unknown training-text source {source!r} (expected {', '.join(ALL_SOURCES)} or a path)")
        for doc in found:
            doc.text = clean(doc.text)
            digest = hashlib.sha1(doc.text.encode()).digest()
            if digest in seen or not looks_like_prose(doc.text):
                continue
            seen.add(digest)
            docs.append(doc)
    return docs


def tokenizer_fingerprint(tokenizer) -> str:
    probe = "Hello world! The grass is green. 1234567 — naïve café, x = f(y) + 2."
    ids = tokenizer.encode(probe, add_special_tokens=False)
    return hashlib.sha1(json.dumps([len(tokenizer), ids]).encode()).hexdigest()[:16]


@dataclass
class Corpus:
    tokens: np.ndarray  # 1-D token ids, documents separated by the end-of-text token
    meta: dict

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def separator_id(tokenizer) -> int:
    for token in (tokenizer.eos_token_id, tokenizer.pad_token_id, 0):
        if token is not None:
            return int(token)
    return 0


def tokenize(docs: list[Document], tokenizer, max_tokens: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> Corpus:
    sep = separator_id(tokenizer)
    parts: list[np.ndarray] = []
    counts: dict[str, dict[str, int]] = {}
    total = 0
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    for i, doc in enumerate(docs):
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        ids.append(sep)
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
        if not ids:
            break
        parts.append(np.asarray(ids, dtype=dtype))
        entry = counts.setdefault(doc.source, {"documents": 0, "tokens": 0})
        entry["documents"] += 1
        entry["tokens"] += len(ids)
        total += len(ids)
        if progress:
            progress(i + 1, len(docs))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    meta = {"sources": counts, "tokens": total, "separator": sep, "tokenizer": tokenizer_fingerprint(tokenizer),
            "heldout": f"documents whose sha1(source:name) % 100 < {HELDOUT_PERCENT} are held out"}
    return Corpus(tokens, meta)


def prepare(sources: list[str], tokenizer, max_tokens: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> tuple[Corpus, str]:
    """The training corpus of `sources` and the held-out text (never trained on)."""
    docs = collect(sources)
    train = [d for d in docs if not d.heldout]
    heldout = [d for d in docs if d.heldout]
    if not train:
        raise BadInput(f"no training text found in {', '.join(sources)}")
    corpus = tokenize(train, tokenizer, max_tokens, progress)
    corpus.meta["heldout_documents"] = len(heldout)
    heldout_text = "\n\n".join(d.text for d in heldout)
    return corpus, heldout_text


def save_corpus(corpus: Corpus, path: str | Path) -> None:
    from lolachat.persist import atomic_write

    with atomic_write(Path(path)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, tokens=corpus.tokens, meta=np.array(json.dumps(corpus.meta)))


def load_corpus(path: str | Path, tokenizer=None, strict: bool = True,
                warn: Callable[[str], None] | None = None) -> Corpus:
    """A prepared corpus; with a tokenizer, check it was made by the same one (`strict=False`: only warn,
    for the same model read by another `transformers` version)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            tokens = data["tokens"]
            meta = json.loads(str(data["meta"]))
    except FileNotFoundError:
        raise BadInput(f"training data not found: {path}") from None
    except (OSError, KeyError, ValueError) as err:
        raise BadInput(f"{path} is not a prepared corpus (.npz from `lolachat distill --prepare-data`): {err}") \
            from None
    if tokenizer is not None:
        if int(tokens.max(initial=0)) >= len(tokenizer):
            raise BadInput(f"{path} holds token ids beyond this model's vocabulary; prepare it for this model")
        if meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            message = f"{path} was tokenized with another tokenizer; prepare it again for this model"
            if strict:
                raise BadInput(message)
            if warn:
                warn(f"warning: {message} (going on: the ids fit the vocabulary)")
    return Corpus(tokens, meta)


def training_corpus(data: str | None, tokenizer, max_tokens: int | None = None,
                    progress: Callable[[int, int], None] | None = None, strict: bool = True,
                    warn: Callable[[str], None] | None = None) -> Corpus:
    """A prepared `.npz` corpus, or text collected now from sources / paths (comma-separated names)."""
    if data and data.endswith(".npz"):
        return load_corpus(data, tokenizer, strict=strict, warn=warn)
    sources = [s.strip() for s in data.split(",")] if data else list(DEFAULT_SOURCES)
    corpus, _ = prepare(sources, tokenizer, max_tokens, progress)
    return corpus
