"""A Hugging Face Hub imitation for tests: a real HTTP server on 127.0.0.1 (random port).

It implements what ``huggingface_hub`` (and so lolachat) calls:
- ``GET /api/models/{org}/{name}[/revision/{rev}][?blobs=true]``: model info with ``sha`` and ``siblings``
  (``rfilename``, ``size``, ``blobId``, ``lfs.{sha256,size,pointerSize}``);
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``: small files answered directly with ``ETag`` (git blob id)
  and ``X-Repo-Commit``; LFS files answered ``302`` to a CDN-like ``/_cdn/{sha256}`` with ``X-Linked-Etag``,
  ``X-Linked-Size``, ``X-Repo-Commit``; ``Range`` requests answered ``206`` with ``Content-Range``;
- errors as the Hub sends them: ``404`` + ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``,
  ``401`` for private repos without a token, ``401/403`` + ``GatedRepo`` for gated repos.

Faults for tests: ``cut_after`` (drop the connection after N body bytes), ``corrupt`` (serve other bytes than
the metadata promises), ``no_range``. ``requests`` logs (method, path, Range header, Authorization).
Also builds tiny repos: a safetensors Llama, a GGUF repo with several quants, LoLCATs ``model.pt`` pairs,
and a tiny wheel for the PyPI source.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".pt", ".bin", ".onnx")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    gated: bool = False
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or len(self.files[name]) > 10_000


@dataclass
class Fault:
    cut_after: int | None = None  # bytes of body to send before dropping the connection
    times: int = 1  # how many GETs this applies to
    corrupt: bool = False


class HubImitation:
    def __init__(self, token: str = "hf_test_token"):
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.faults: dict[tuple[str, str], Fault] = {}
        self.no_range = False
        self.requests: list[tuple[str, str, str | None, str | None]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ repos
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False,
                 private: bool = False) -> Repo:
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            h.update(name.encode() + hashlib.sha256(files[name]).digest())
        repo = Repo(files=dict(files), commit=h.hexdigest(), gated=gated, private=private)
        repo.refs["main"] = repo.commit
        self.repos[repo_id] = repo
        return repo

    def cut_after(self, repo_id: str, name: str, nbytes: int, times: int = 1) -> None:
        self.faults[(repo_id, name)] = Fault(cut_after=nbytes, times=times)

    def corrupt(self, repo_id: str, name: str) -> None:
        self.faults[(repo_id, name)] = Fault(corrupt=True, times=10**9)

    def lfs_sha(self, repo_id: str, name: str) -> str:
        return hashlib.sha256(self.repos[repo_id].files[name]).hexdigest()

    # ------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubImitation:
        hub = self

        class Handler(_Handler):
            imitation = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubImitation:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def gets(self, suffix: str) -> list[tuple[str, str, str | None, str | None]]:
        """Logged GET requests whose path ends with ``suffix``."""
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(suffix)]


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/_cdn/(?P<repo>[^/]+/[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    imitation: HubImitation
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _auth_ok(self, repo: Repo) -> str | None:
        """None if allowed, else the error already sent."""
        if not (repo.gated or repo.private):
            return None
        auth = self.headers.get("Authorization")
        good = auth == f"Bearer {self.imitation.token}"
        if good:
            return None
        if repo.private:
            self._error(401, "RepoNotFound", "Invalid username or password.")
        elif auth is None:
            self._error(401, "GatedRepo", "Access to this model is restricted: you must be authenticated.")
        else:
            self._error(403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list.")
        return "denied"

    def _lookup(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
        repo = self.imitation.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if self._auth_ok(repo) is not None:
            return None
        commit = repo.refs.get(rev) or (rev if rev == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return repo, commit

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.imitation.requests.append((self.command, path, self.headers.get("Range"),
                                        self.headers.get("Authorization")))
        if m := _API.match(path):
            return self._model_info(m.group("repo"), m.group("rev") or "main", "blobs=" in parts.query)
        if m := _RESOLVE.match(path):
            return self._resolve(m.group("repo"), m.group("rev"), m.group("path"))
        if m := _CDN.match(path):
            repo = self.imitation.repos.get(m.group("repo"))
            if repo is None or m.group("path") not in repo.files:
                return self._error(404, None, "not found")
            return self._serve(m.group("repo"), m.group("path"), repo.files[m.group("path")], {})
        self._error(404, None, "no such endpoint")

    def _model_info(self, repo_id: str, rev: str, blobs: bool) -> None:
        found = self._lookup(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        siblings = []
        for name in sorted(repo.files):
            data = repo.files[name]
            s: dict = {"rfilename": name}
            if blobs:
                s["size"] = len(data)
                s["blobId"] = git_blob_id(data)
                if repo.is_lfs(name):
                    s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        body = {"_id": "x" * 24, "id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [], "siblings": siblings}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        found = self._lookup(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        if name not in repo.files:
            return self._error(404, "EntryNotFound", f"{name} does not exist on \"{rev}\"", commit=commit)
        data = repo.files[name]
        if repo.is_lfs(name):
            sha = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                       "ETag": f'"{git_blob_id(data)}"', "Location": f"{self.imitation.url}/_cdn/{repo_id}/{name}"}
            return self._send(302, b"", headers)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'}
        self._serve(repo_id, name, data, headers)

    def _serve(self, repo_id: str, name: str, data: bytes, headers: dict[str, str]) -> None:
        fault = self.imitation.faults.get((repo_id, name))
        if fault is not None and self.command == "GET" and fault.times > 0:
            fault.times -= 1
        else:
            fault = None
        if fault is not None and fault.corrupt:
            data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
        start = 0
        rng = self.headers.get("Range")
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        status = 200
        if rng and not self.imitation.no_range:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    headers["Content-Range"] = f"bytes */{len(data)}"
                    return self._send(416, b"", headers)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data = data[start:end + 1]
                status = 206
        if fault is not None and fault.cut_after is not None and self.command == "GET":
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:fault.cut_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(status, data, headers)


# ---------------------------------------------------------------------------------------- tiny repos


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


def tiny_llama_config(**over) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
           "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    cfg.update(over)
    return cfg


def tiny_llama_weights(cfg: dict, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype("float32")

    t = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": np.ones(d, "float32")}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
              p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
              p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
              p + "mlp.down_proj.weight": w(d, f),
              p + "input_layernorm.weight": np.ones(d, "float32"),
              p + "post_attention_layernorm.weight": np.ones(d, "float32")}
    return t


def tiny_llama_repo(seed: int = 0) -> dict[str, bytes]:
    """A safetensors Llama repo, plus files the store must NOT download."""
    cfg = tiny_llama_config()
    return {
        "config.json": json.dumps(cfg).encode(),
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}',
        "tokenizer_config.json": b'{"model_max_length": 256}',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}',
        "model.safetensors": _safetensors_bytes(tiny_llama_weights(cfg, seed)),
        "pytorch_model.bin": b"\x80\x02pickle that must never be fetched" * 100,
        "onnx/model.onnx": b"onnx" * 100,
        "README.md": b"# tiny llama\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
    }


def fake_gguf(tag: str, size: int = 30_000) -> bytes:
    body = hashlib.sha256(tag.encode()).digest() * (size // 32 + 1)
    return b"GGUF" + body[: size - 4]


def tiny_gguf_repo() -> dict[str, bytes]:
    return {
        "tiny-Q4_K_M.gguf": fake_gguf("q4km"),
        "tiny-Q8_0.gguf": fake_gguf("q8"),
        "tiny-F16.gguf": fake_gguf("f16"),
        "tiny-Q2_K-00001-of-00002.gguf": fake_gguf("q2a"),
        "tiny-Q2_K-00002-of-00002.gguf": fake_gguf("q2b"),
        "mmproj-tiny-F16.gguf": fake_gguf("mmproj"),
        "README.md": b"# gguf\n",
    }


def lolcats_checkpoints(n_layers: int = 2, n_heads: int = 4, n_kv: int = 2, head_dim: int = 4,
                        feat_half: int = 4, rank: int = 2, wrap: bool = True) -> tuple[bytes, bytes]:
    """(distill model.pt, ft-lora model.pt) in the LoLCATs key spellings (research/lola.md §3.4)."""
    import torch

    g = torch.Generator().manual_seed(0)
    d = n_heads * head_dim
    distill, lora = {}, {}
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn."
        distill[p + "feature_map_q.mlp.layer"] = torch.randn(n_heads, head_dim, feat_half, generator=g)
        distill[p + "feature_map_k.mlp.layer"] = torch.randn(n_heads, head_dim, feat_half, generator=g)
        distill[p + "window_factors"] = torch.randn(1, n_heads, 1, 1, generator=g)
        q = f"base_model.model.model.layers.{i}.self_attn."
        for proj, out in (("q", d), ("k", n_kv * head_dim), ("v", n_kv * head_dim), ("o", d)):
            lora[q + f"{proj}_proj.lora_A.default.weight"] = torch.randn(rank, d, generator=g)
            lora[q + f"{proj}_proj.lora_B.default.weight"] = torch.randn(out, rank, generator=g)

    def dump(sd: dict) -> bytes:
        buf = io.BytesIO()
        torch.save({"model_state_dict": sd} if wrap else sd, buf)
        return buf.getvalue()

    return dump(distill), dump(lora)


def build_wheel(dirpath: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel ``{dist}-{version}-py3-none-any.whl`` holding ``files``."""
    norm = dist.replace("-", "_")
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / f"{norm}-{version}-py3-none-any.whl"
    info = f"{norm}-{version}.dist-info"
    meta = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
            f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**files, **meta}.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "")
    return path


# ------------------------------------------------------------------------------- fixture helpers


def serve_hub(monkeypatch) -> Iterator[HubImitation]:
    """For a fixture: a running Hub imitation with HF_ENDPOINT pointed at it (no token, online).

    Use as ``@pytest.fixture``-decorated ``def hub(monkeypatch): yield from serve_hub(monkeypatch)``."""
    with HubImitation() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("LOLACHAT_HUB_TIMEOUT", "5")
        monkeypatch.setenv("LOLACHAT_DOWNLOAD_RETRIES", "2")
        yield hub


def isolated_home(tmp_path, monkeypatch) -> Path:
    """For a fixture: an empty lolachat home (LOLACHAT_HOME) for one test, no extra catalog or pip args."""
    home = tmp_path / "lolachat-home"
    monkeypatch.setenv("LOLACHAT_HOME", str(home))
    monkeypatch.delenv("LOLACHAT_CATALOG", raising=False)
    monkeypatch.delenv("LOLACHAT_PIP_ARGS", raising=False)
    return home
