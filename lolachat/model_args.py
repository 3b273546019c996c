"""The shape of a Llama-family model, independent of where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face `rope_scaling` dict (only rope_type "llama3" changes anything), or None.
    rope_scaling: dict | None = None
    max_position: int = 2048  # the context length the model was trained on
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Build from a Hugging Face `config.json` dict (LlamaConfig fields)."""
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            hidden_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_hf_rope_theta(cfg),
            rope_scaling=_hf_rope_scaling(cfg),
            max_position=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=cfg.get("bos_token_id"),
            eos_ids=eos_ids,
        )


def _hf_rope_theta(cfg: dict) -> float:
    # transformers 5 writes `rope_parameters` (theta included) where 4.x wrote `rope_theta` + `rope_scaling`.
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _hf_rope_scaling(cfg: dict) -> dict | None:
    """The scaling dict with key `rope_type` (old configs say `type`), or None for plain RoPE."""
    scaling = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    scaling.pop("rope_theta", None)
    kind = scaling.pop("type", None)
    scaling.setdefault("rope_type", kind)
    if scaling["rope_type"] in (None, "default"):
        return None
    return scaling
