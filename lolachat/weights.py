"""Load Llama weights from a Hugging Face folder (safetensors) or a GGUF file into one in-memory format.

Whatever the source, the result is float32 CPU tensors under Hugging Face `LlamaForCausalLM` names,
with q/k projection rows in the Hugging Face (rotate_half) layout, plus the `ModelArgs` that describe them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lolachat.errors import BadModelFile, ModelNotFound, UnsupportedArchitecture
from lolachat.model_args import ModelArgs
from lolachat.tokenizer import (
    read_hf_chat_template,
    read_hf_special_tokens,
    read_json,
    template_end_of_turn_ids,
    unique,
)

SUPPORTED_ROPE_TYPES = ("llama3",)  # besides plain RoPE (rope_scaling None)


@dataclass
class LoadedWeights:
    args: ModelArgs
    tensors: dict[str, torch.Tensor]  # HF LlamaForCausalLM names; no lm_head.weight when tied
    source: Path
    weights_sha256: str  # a file's sha256; for a folder, sha256 of its sorted per-file sha256s
    chat_template: str | None


def load_weights(path: str | Path) -> LoadedWeights:
    """Weights of a Hugging Face Llama folder (config.json + *.safetensors) or a llama `.gguf` file."""
    source = resolve_model_path(path)
    if source.is_file():
        return load_gguf(source)
    return load_hf_folder(source)


def resolve_model_path(path: str | Path) -> Path:
    """The model folder or `.gguf` file that `path` names.

    A folder without config.json that holds exactly one `.gguf` file resolves to that file.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise ModelNotFound(f"{source}: no such file or folder")
    if source.is_file():
        if not _has_gguf_magic(source):
            raise BadModelFile(f"{source}: not a GGUF file (a model is a .gguf file or a Hugging Face folder)")
        return source
    if (source / "config.json").is_file():
        return source
    ggufs = sorted(source.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise BadModelFile(f"{source}: holds several .gguf files; name the one to use")
    raise BadModelFile(f"{source}: no config.json and no .gguf file")


def _has_gguf_magic(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"GGUF"


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(files: Iterable[Path]) -> str:
    """One hash for a set of files: sha256 of their sorted sha256 hex digests, one a line."""
    digests = sorted(file_sha256(f) for f in files)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Checks common to both formats


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama with `args` has, by HF name, with its shape."""
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (args.dim,),
            p + "self_attn.q_proj.weight": (q_rows, args.dim),
            p + "self_attn.k_proj.weight": (kv_rows, args.dim),
            p + "self_attn.v_proj.weight": (kv_rows, args.dim),
            p + "self_attn.o_proj.weight": (args.dim, q_rows),
            p + "post_attention_layernorm.weight": (args.dim,),
            p + "mlp.gate_proj.weight": (args.hidden_dim, args.dim),
            p + "mlp.up_proj.weight": (args.hidden_dim, args.dim),
            p + "mlp.down_proj.weight": (args.dim, args.hidden_dim),
        }
    shapes["model.norm.weight"] = (args.dim,)
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, args.dim)
    return shapes


def check_tensors(args: ModelArgs, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Exactly the tensors `args` calls for, with the right shapes and finite values."""
    expected = expected_shapes(args)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UnsupportedArchitecture(f"{source}: tensor {extra[0]} is not part of a plain Llama model")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise BadModelFile(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise BadModelFile(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if not torch.isfinite(tensors[name].sum()):  # one pass, no mask; real weights never overflow a sum
            raise BadModelFile(f"{source}: tensor {name} holds NaN or infinite values (corrupt file?)")


def check_rope_scaling(args: ModelArgs, source: Path) -> None:
    kind = (args.rope_scaling or {}).get("rope_type")
    if args.rope_scaling is not None and kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitecture(f"{source}: RoPE scaling {kind!r} is not supported (only llama3)")


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders


def load_hf_folder(folder: Path) -> LoadedWeights:
    config = read_json(folder / "config.json")
    check_hf_config(config, folder)
    try:
        args = ModelArgs.from_hf_config(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise BadModelFile(f"{folder / 'config.json'}: not a usable Llama config ({err!r})") from err
    check_rope_scaling(args, folder)
    chat_template = read_hf_chat_template(folder)
    args.eos_ids = unique(args.eos_ids + _generation_config_eos(folder) + _hf_end_of_turn_ids(folder, chat_template))

    files = safetensors_files(folder)
    tensors = read_safetensors(files)
    for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
        del tensors[name]  # a buffer some old checkpoints saved; recomputed from the config
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    check_tensors(args, tensors, folder)
    return LoadedWeights(args, tensors, folder, files_sha256(files), chat_template)


def check_hf_config(config: dict, folder: Path) -> None:
    if not config:
        raise BadModelFile(f"{folder / 'config.json'}: empty config")
    model_type = config.get("model_type")
    if model_type != "llama":
        raise UnsupportedArchitecture(f"{folder}: model_type {model_type!r} is not supported (only llama)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise UnsupportedArchitecture(f"{folder}: Llama with {flag}=true is not supported")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitecture(f"{folder}: activation {act!r} is not supported (only silu)")


def _generation_config_eos(folder: Path) -> list[int]:
    eos = read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _hf_end_of_turn_ids(folder: Path, chat_template: str | None) -> list[int]:
    if not chat_template:
        return []
    config = read_json(folder / "tokenizer_config.json")
    return template_end_of_turn_ids(
        chat_template,
        read_hf_special_tokens(folder),
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
    )


def _token_text(token) -> str | None:
    # tokenizer_config.json writes a token either as a string or as an AddedToken dict.
    return token.get("content") if isinstance(token, dict) else token


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: those a `model.safetensors.index.json` names, else all *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise BadModelFile(f"{absent[0]}: listed in {index.name} but missing")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (only pickle weights, which lolachat does not load)" if pickles else ""
        raise BadModelFile(f"{folder}: no .safetensors weights{hint}")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in list(f.keys()):  # safe_open is not iterable
                    if name in tensors:
                        raise BadModelFile(f"{file}: tensor {name} also appears in another file")
                    tensors[name] = f.get_tensor(name).to(torch.float32)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise BadModelFile(f"{file}: unreadable safetensors file ({_first_line(err)})") from err
    return tensors


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------------
# GGUF files

_GGUF_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp stores Llama 3 RoPE scaling as per-frequency divisors
_GGUF_CONTROL_TOKEN_TYPES = (3, 4)  # gguf TokenType CONTROL and USER_DEFINED


def load_gguf(file: Path) -> LoadedWeights:
    reader = open_gguf(file)
    meta = GgufMetadata(reader, file)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedArchitecture(f"{file}: architecture {arch!r} is not supported (only llama)")
    if meta.get("llama.expert_count", 0):
        raise UnsupportedArchitecture(f"{file}: mixture-of-experts Llama models are not supported")

    raw = {t.name: t for t in reader.tensors}
    args = gguf_model_args(meta, raw, file)
    check_rope_scaling(args, file)
    tensors = {gguf_to_hf_name(name, file): dequantize(t, file) for name, t in raw.items() if name != _ROPE_FREQS}
    unpermute_qk(tensors, args)
    check_tensors(args, tensors, file)
    return LoadedWeights(args, tensors, file, file_sha256(file), meta.get("tokenizer.chat_template"))


def open_gguf(file: Path):
    import gguf

    class PlainArrayReader(gguf.GGUFReader):
        # GGUFReader slices its np.memmap once per metadata value (~100k times for a vocabulary); slicing
        # a memmap subclass is several times slower than a plain ndarray view of the same mapping.
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray)

    try:
        return PlainArrayReader(file)
    except Exception as err:  # GGUFReader signals truncation/corruption with ValueError, IndexError, ...
        raise BadModelFile(f"{file}: corrupt or truncated GGUF file ({_first_line(err)})") from err


class GgufMetadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader, file: Path):
        self.fields = reader.fields
        self.file = file

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            values = [self._part_value(field, field.parts[i]) for i in field.data]
        except (IndexError, UnicodeDecodeError, ValueError) as err:
            raise BadModelFile(f"{self.file}: unreadable metadata {key} ({err})") from err
        is_array = len(field.types) > 1  # [ARRAY, element type]
        return values if is_array else values[0]

    @staticmethod
    def _part_value(field, part):
        import gguf

        if field.types[-1] == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = part.tolist()[0]
        if part.dtype == np.float32:  # shortest decimal that round-trips: 1e-05, not 9.999999747378752e-06
            value = float(str(part[0]))
        return value

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise BadModelFile(f"{self.file}: metadata {key} is missing")
        return value

    def token_ids(self, token_types: Iterable[int]) -> dict[str, int]:
        """Tokens of the vocabulary whose type is one of `token_types`, text -> id."""
        types_field = self.fields.get("tokenizer.ggml.token_type")
        tokens_field = self.fields.get("tokenizer.ggml.tokens")
        if types_field is None or tokens_field is None:
            return {}
        types = np.array([types_field.parts[i][0] for i in types_field.data])
        picked = np.flatnonzero(np.isin(types, list(token_types)))
        return {bytes(tokens_field.parts[tokens_field.data[i]]).decode("utf-8", "replace"): int(i) for i in picked}


def gguf_model_args(meta: GgufMetadata, raw: dict, file: Path) -> ModelArgs:
    if "token_embd.weight" not in raw:
        raise BadModelFile(f"{file}: tensor token_embd.weight is missing")
    dim = int(meta.require("llama.embedding_length"))
    n_heads = int(meta.require("llama.attention.head_count"))
    n_kv_heads = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedArchitecture(f"{file}: partial rotary embedding ({rope_dims} of {head_dim} dims)")
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise UnsupportedArchitecture(f"{file}: value head size differs from key head size")
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    try:
        return ModelArgs(
            vocab_size=int(raw["token_embd.weight"].shape[-1]),  # GGUF lists dims innermost first
            dim=dim,
            n_layers=int(meta.require("llama.block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            hidden_dim=int(meta.require("llama.feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=gguf_rope_scaling(meta, raw, theta, head_dim, file),
            max_position=int(meta.get("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in raw,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=gguf_eos_ids(meta),
        )
    except (ValueError, ZeroDivisionError) as err:
        raise BadModelFile(f"{file}: inconsistent model metadata ({err})") from err


def gguf_eos_ids(meta: GgufMetadata) -> list[int]:
    ids = [meta.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    ids = [int(i) for i in ids if i is not None]
    specials = meta.token_ids(_GGUF_CONTROL_TOKEN_TYPES)
    by_id = {v: k for k, v in specials.items()}
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    template_ids = template_end_of_turn_ids(
        meta.get("tokenizer.chat_template"), specials, bos_token=by_id.get(bos), eos_token=by_id.get(eos)
    )
    return unique(ids + template_ids)


def gguf_rope_scaling(meta: GgufMetadata, raw: dict, theta: float, head_dim: int, file: Path) -> dict | None:
    """RoPE scaling as a Hugging Face `rope_scaling` dict.

    llama.cpp writes linear/YaRN scaling as metadata, but Llama 3 scaling only as the `rope_freqs`
    tensor of per-frequency divisors, from which we recover the llama3 parameters.
    """
    if _ROPE_FREQS in raw:
        factors = dequantize(raw[_ROPE_FREQS], file).numpy().reshape(-1)
        return llama3_scaling_from_factors(factors, theta, head_dim, file)
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor") or meta.get("llama.rope.scale_linear")
    if kind in (None, "none") and not factor:
        return None
    scaling = {"rope_type": kind or "linear", "factor": float(factor or 1.0)}
    original = meta.get("llama.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling: 1 for short wavelengths, `factor` for long ones."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int, file: Path) -> dict | None:
    factors = factors.astype(np.float64)
    if factors.shape != (head_dim // 2,):
        raise BadModelFile(f"{file}: {_ROPE_FREQS} has {factors.size} values, expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    # Between the two bands, 1/divisor = (1 - s)/factor + s with s = (old_context * inv_freq / 2π - low) / (high - low),
    # linear in inv_freq. Only old_context/low and old_context/high matter, so fix low = 1 and fit the rest.
    band = (factors > 1.0 + 1e-4) & (factors < factor * (1.0 - 1e-4))
    if band.sum() >= 2 and factor > 1.0:
        s = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv_freq[band], s, 1)
        if intercept < 0:
            high = 1.0 - 1.0 / intercept
            old_context = slope * 2 * math.pi * (high - 1.0)
            scaling = {
                "rope_type": "llama3",
                "factor": round(factor, 4),
                "low_freq_factor": 1.0,
                "high_freq_factor": round(high, 4),
                "original_max_position_embeddings": round(old_context),
            }
            if np.allclose(llama3_rope_factors(scaling, theta, head_dim), factors, rtol=1e-4):
                return scaling
    raise UnsupportedArchitecture(f"{file}: {_ROPE_FREQS} does not match Llama 3 RoPE scaling")


def gguf_to_hf_name(name: str, file: Path) -> str:
    if name in _GGUF_TOP_LEVEL:
        return _GGUF_TOP_LEVEL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_PER_LAYER:
        return f"model.layers.{int(parts[1])}.{_GGUF_PER_LAYER[parts[2]]}"
    raise UnsupportedArchitecture(f"{file}: tensor {name} is not part of a plain Llama model")


def dequantize(tensor, file: Path) -> torch.Tensor:
    """A GGUF tensor as a float32 torch tensor, shaped outermost dim first."""
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise BadModelFile(
            f"{file}: tensor {tensor.name} uses {tensor.tensor_type.name}, which lolachat cannot read"
        ) from err
    except ValueError as err:
        raise BadModelFile(f"{file}: tensor {tensor.name} is corrupt ({err})") from err
    if values.size != math.prod(shape):
        raise BadModelFile(f"{file}: tensor {tensor.name} has {values.size} values, expected shape {shape}")
    values = values.reshape(shape)
    if not values.flags.writeable:  # F32 tensors come back as views of the read-only file mapping
        values = values.astype(np.float32, copy=True)
    return torch.from_numpy(values.astype(np.float32, copy=False))


def unpermute_qk(tensors: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """Put q/k rows back into the Hugging Face layout.

    llama.cpp's converter reorders each head's rows from [first halves..., second halves...] (rotate_half)
    to interleaved pairs (0, d/2, 1, d/2+1, ...) for its RoPE kernel; this reverses that, in place.
    """
    for i in range(args.n_layers):
        for proj, n_heads in (("q_proj", args.n_heads), ("k_proj", args.n_kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            if name in tensors:
                tensors[name] = gguf_rows_to_hf(tensors[name], n_heads)


def gguf_rows_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    head_dim = rows // n_heads
    if rows % n_heads or head_dim % 2:
        return weight  # wrong shape; check_tensors reports it
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()

