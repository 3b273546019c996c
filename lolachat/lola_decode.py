"""LoLA attention of one new token (decode) in as few tensor ops as its math allows (DESIGN §4.3).

The general path (`LolaAttention._attend_within_chunk`) serves any number of queries: a causal mask,
separate matmuls for the window and the sparse cache, the feature map and the linear readout as in
the reference. A decoded token needs none of the mask and meets the same keys at every step, and the
CPU engine pays a few microseconds per op (more when an op forks threads on a busy machine), so here:

- the sparse cache's and the window's rotated keys and their values sit in one buffer per selection
  head (`DecodeBank`), rebuilt when a chunk leaves the window and appended to by each token: one
  matmul scores every key and one reads every value;
- the values carry a trailing 1 and the linear state is kept as one matrix [H | s], so the softmax
  sum and φ(q)ᵀs come out of the same matmuls as the numerators;
- the Hedgehog map runs as one matmul against [W, −W] and one softmax over both halves;
- cos/sin of the token's position are computed once per step for all layers (`Rope.at`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lolachat.kernels import reference as ref

if TYPE_CHECKING:
    from lolachat.lola import LolaAttention, LolaLayerMemory


@dataclass
class DecodeBank:
    """Rotated keys and values of the sparse cache (rows [0, sparse_len)) and of the window after them.

    Per selection head (query heads for "head" selection, KV heads for "group"), float32."""

    keys: torch.Tensor  # [B, Hs, sparse_len + 2C, D]
    values: torch.Tensor  # [B, Hs, sparse_len + 2C, D + 1]; the last column is 1
    state: torch.Tensor  # [B, H, F, D + 1] = [H | s]
    sparse_len: int
    length: int  # rows filled
    source: tuple  # what it was built from; see `_source`


def _source(mem: LolaLayerMemory) -> tuple:
    """Everything whose change invalidates a bank: the tensors are replaced on eviction or load, and
    the window moves (in place) only when a chunk leaves it, which counts an eviction."""
    return (mem.sparse_k_rot, mem.window_k_rot, mem.h, mem.window_start, mem.evictions)


def _same_source(a: tuple, b: tuple) -> bool:
    return all(x is y for x, y in zip(a[:3], b[:3])) and a[3:] == b[3:]


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """KV-head rows [B, Hkv, N, D] repeated for `heads` consecutive heads (a view when no repeat is needed)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def build_bank(mem: LolaLayerMemory) -> DecodeBank:
    """A bank holding the memory as it is now (window rows [0, window_len))."""
    b, hs, n, d = mem.sparse_k.shape
    window = mem.window_len
    rows = n + mem.window_k.shape[2]
    keys = torch.empty(b, hs, rows, d, dtype=torch.float32, device=mem.h.device)
    values = torch.empty(b, hs, rows, d + 1, dtype=torch.float32, device=mem.h.device)
    values[..., d] = 1.0
    keys[:, :, :n] = mem.sparse_k_rot
    values[:, :, :n, :d] = mem.sparse_v
    keys[:, :, n : n + window] = _expand(mem.window_k_rot[:, :, :window], hs)
    values[:, :, n : n + window, :d] = _expand(mem.window_v[:, :, :window], hs)
    state = torch.cat([mem.h, mem.s.unsqueeze(-1)], dim=-1)
    return DecodeBank(keys, values, state, n, n + window, _source(mem))


def bank_nbytes(mem) -> int:
    """Bytes of a memory's decode bank (0 before its first decoded token, and for memories without one)."""
    bank = getattr(mem, "decode_bank", None)
    return bank.keys.nbytes + bank.values.nbytes + bank.state.nbytes if bank is not None else 0


def _heads_view(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hs, N, D] viewed as [B, Hkv, Hs/Hkv, N, D] (a write of one KV head's row reaches all its copies)."""
    return x.unflatten(1, (kv_heads, -1))


def bank_with_token(mem: LolaLayerMemory, k_rot: torch.Tensor, v: torch.Tensor) -> DecodeBank:
    """The memory's bank once the token just written at window row window_len − 1 is in it."""
    bank = getattr(mem, "decode_bank", None)
    current = bank is not None and _same_source(bank.source, _source(mem))
    if not current or bank.length != bank.sparse_len + mem.window_len - 1:
        bank = build_bank(mem)
        mem.decode_bank = bank
        return bank
    row, kv_heads = bank.length, k_rot.shape[1]
    _heads_view(bank.keys, kv_heads)[:, :, :, row] = k_rot
    _heads_view(bank.values, kv_heads)[:, :, :, row, :-1] = v
    bank.length += 1
    return bank


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE of x [..., D] (float32) at one position: x·cos + rotate_half(x)·sin, rotate_half as a flip of
    the two halves times the sign carried by `sin_signed` (the same floats as the reference)."""
    flipped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return (x * cos).add_(flipped * sin_signed)


class SingleTokenAttention:
    """The decode step of one layer's `LolaAttention`, with the per-layer constants it needs prepared once."""

    def __init__(self, attn: LolaAttention):
        self.attn = attn
        a = attn.adapter
        self.phi_q_both = torch.cat([a.phi_q, -a.phi_q], dim=-1).float()  # [H, D, F]: z and −z in one matmul
        gamma = attn.gamma.view(1, -1, 1, 1)
        self.gamma = gamma
        self.one_minus_gamma = 1.0 - gamma

    def __call__(self, mem: LolaLayerMemory, q_pre: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor,
                 pos: int) -> torch.Tensor:
        """q_pre [B,H,1,D], k_pre and v [B,Hkv,1,D] of the token at `pos`; returns [B,H,1,D]."""
        attn = self.attn
        cos, sin_signed = attn.rope.at(pos)
        k_rot = rotate(k_pre.float(), cos, sin_signed)
        row = mem.window_len
        mem.window_k[:, :, row : row + 1] = k_pre
        mem.window_v[:, :, row : row + 1] = v
        mem.window_k_rot[:, :, row : row + 1] = k_rot
        mem.window_len = row + 1
        bank = bank_with_token(mem, k_rot, v)

        q_rot = rotate(q_pre.float(), cos, sin_signed)
        logits = self._logits(mem, bank, q_pre, q_rot, pos)
        m = logits.amax(dim=-1, keepdim=True)
        weights = (logits - m).exp_()
        b, h = q_pre.shape[:2]
        soft = torch.matmul(weights, bank.values[:, :, : bank.length]).view(b, h, 1, -1)
        phi_q = self._phi_q(q_rot if attn.cfg.phi_input == "post_rope" else q_pre.float())
        linear = torch.matmul(phi_q, bank.state)
        m = m.view(b, h, 1, 1)
        if attn.cfg.mix == "lola":  # the linear term on the softmax part's e^{−m} scale, weighted 1 − γ
            coef = torch.exp(-m).mul_(self.one_minus_gamma)
        else:  # "lolcats": the linear term unscaled
            coef = torch.ones_like(m)
        total = torch.addcmul(soft * self.gamma, linear, coef)
        return (total[..., :-1] / total[..., -1:]).to(q_pre.dtype)

    def _logits(self, mem, bank: DecodeBank, q_pre, q_rot, pos: int) -> torch.Tensor:
        """Scaled logits [B, Hs, H/Hs, rows] of the query against the bank; a sparse key farther than
        max_distance scores as if it sat max_distance back (DESIGN §4.4b)."""
        b, h, _, d = q_rot.shape
        hs = bank.keys.shape[1]
        grouped = q_rot.view(b, hs, h // hs, d)
        logits = torch.matmul(grouped, bank.keys[:, :, : bank.length].transpose(-1, -2))
        cap = self.attn.cfg.max_distance
        if cap is not None and bank.sparse_len and pos - mem.oldest_sparse_pos > cap:
            cos, sin_signed = self.attn.rope.at(cap)
            q_capped = rotate(q_pre.float(), cos, sin_signed).view(b, hs, h // hs, d)
            far = torch.matmul(q_capped, mem.sparse_k.float().transpose(-1, -2))
            is_far = (mem.sparse_pos < pos - cap).unsqueeze(2)
            near = logits[..., : bank.sparse_len]
            near.copy_(torch.where(is_far, far, near))
        return logits.mul_(self.attn.scale)

    def _phi_q(self, q: torch.Tensor) -> torch.Tensor:
        """Hedgehog φ(q) [B,H,1,F]: softmax over each half of q·[W, −W] (ref.hedgehog's math)."""
        z = torch.matmul(q, self.phi_q_both)
        return z.unflatten(-1, (2, -1)).softmax(dim=-1).flatten(-2).clamp_min_(ref.PHI_CLAMP)
