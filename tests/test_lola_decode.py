"""The single-token decode path (lolachat.lola_decode) against the general path on random inputs.

Two copies of one layer's memory are driven token by token, one through `LolaAttention.attend` (which
takes the single-token path for T = 1), one through the general path; outputs and memories must agree
with the sparse cache empty, partly full and full, λ = 0, per-head and per-group selection, sinks,
a distance cap that some cached keys exceed, both mixes and both feature-map inputs.
"""

import copy

import pytest
import torch

from lolachat.lola import LayerAdapter, LolaAttention, LolaConfig, LolaLayerMemory, Rope
from lolachat.lola_decode import bank_nbytes, rotate

HEADS, KV_HEADS, D, HALF = 6, 2, 8, 6


def layer(cfg: LolaConfig, seed: int = 0, gamma_logit: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    adapter = LayerAdapter(phi_q=torch.randn(HEADS, D, HALF, generator=g),
                           phi_k=torch.randn(HEADS, D, HALF, generator=g),
                           window_factor=gamma_logit + torch.randn(HEADS, generator=g))
    rope = Rope(1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    attn = LolaAttention(cfg, adapter, rope, scale=D**-0.5)
    mem = LolaLayerMemory(cfg, 1, HEADS, KV_HEADS, D, 2 * HALF, torch.float32, "cpu")
    return attn, mem


def inputs(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, HEADS, n, D, generator=g) * 2, torch.randn(1, KV_HEADS, n, D, generator=g) * 2,
            torch.randn(1, KV_HEADS, n, D, generator=g))


def general_step(attn: LolaAttention, mem: LolaLayerMemory, q, k, v, pos: int) -> torch.Tensor:
    """What `attend` does for one token, through the general path."""
    y = attn._attend_general(mem, q, k, v, pos)
    if mem.current_len == attn.cfg.chunk:
        attn._close_chunk(mem)
    return y


def assert_same_memory(a: LolaLayerMemory, b: LolaLayerMemory) -> None:
    for name in ("window_k", "window_v", "window_k_rot", "sparse_k", "sparse_v", "sparse_pos", "h", "s"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)
    assert (a.window_start, a.window_len, a.folded) == (b.window_start, b.window_len, b.folded)


def decode_both(attn, mem, q, k, v, start: int, end: int, mem_general=None):
    mem_general = mem_general if mem_general is not None else copy.deepcopy(mem)
    for t in range(start, end):
        step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        fast = attn.attend(mem, *step, t)
        want = general_step(attn, mem_general, *step, t)
        torch.testing.assert_close(fast, want, atol=2e-5, rtol=2e-5, msg=f"token {t}")
    assert_same_memory(mem, mem_general)
    return mem_general


CHUNK = 4


@pytest.mark.parametrize("selection", ["head", "group"])
@pytest.mark.parametrize("sparse", [0, 6, 40])
@pytest.mark.parametrize("prefill", [0, 5, 2 * CHUNK + 3, 30])  # sparse cache empty, first filling, partly, full
@pytest.mark.parametrize("sinks", [0, 2])
def test_single_token_path_equals_general_path(selection, sparse, prefill, sinks):
    attn, mem = layer(LolaConfig(chunk=CHUNK, sparse=sparse, selection=selection, sinks=sinks))
    q, k, v = inputs(prefill + 3 * CHUNK + 1)
    if prefill:
        attn.attend(mem, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], 0)
    decode_both(attn, mem, q, k, v, prefill, q.shape[2])  # crosses several evictions


@pytest.mark.parametrize("selection", ["head", "group"])
@pytest.mark.parametrize("mix", ["lola", "lolcats"])
@pytest.mark.parametrize("phi_input", ["pre_rope", "post_rope"])
def test_mixes_feature_inputs_and_capped_distances(selection, mix, phi_input):
    """max_distance 10 with keys up to ~60 back: some cached keys are scored at the cap, some not."""
    cfg = LolaConfig(chunk=CHUNK, sparse=12, selection=selection, mix=mix, phi_input=phi_input, max_distance=10)
    attn, mem = layer(cfg, gamma_logit=-1.0)
    q, k, v = inputs(70)
    attn.attend(mem, q[:, :, :40], k[:, :, :40], v[:, :, :40], 0)
    assert int(mem.sparse_pos.min()) < 40 - 10 < int(mem.sparse_pos.max())
    decode_both(attn, mem, q, k, v, 40, 70)


def test_decode_after_a_block_and_after_a_reload_rebuilds_its_bank():
    """A block through the general path (a new user turn) and a memory reload leave the bank stale;
    the next decoded token must see the memory as it is."""
    attn, mem = layer(LolaConfig(chunk=CHUNK, sparse=6, selection="group"))
    q, k, v = inputs(60)
    attn.attend(mem, q[:, :, :10], k[:, :, :10], v[:, :, :10], 0)
    general = decode_both(attn, mem, q, k, v, 10, 15)
    for m in (mem, general):
        attn.attend(m, q[:, :, 15:22], k[:, :, 15:22], v[:, :, 15:22], 15)
    decode_both(attn, mem, q, k, v, 22, 26, general)
    reloaded = LolaLayerMemory(attn.cfg, 1, HEADS, KV_HEADS, D, 2 * HALF, torch.float32, "cpu")
    reloaded.load(mem.tensors(), attn.rope)
    decode_both(attn, reloaded, q, k, v, 26, 40, general)


def test_rope_at_one_position_matches_the_table():
    rope = Rope(1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    x = torch.randn(3, 1, D)
    for pos in (0, 7, 5000):
        cos, sin_signed = rope.at(pos)
        torch.testing.assert_close(rotate(x, cos, sin_signed), rope.rotate(x, torch.tensor([pos])), atol=0, rtol=0)


def test_the_decode_bank_is_counted_in_the_memory_it_holds():
    """The fast path's float32 copy of cache + window is memory too: reported once it exists (memory_stats'
    decode_bytes, apart from the memory's own cache_bytes)."""
    cfg = LolaConfig(chunk=4, sparse=6, selection="group")
    attn, mem = layer(cfg)
    q, k, v = inputs(20)
    attn.attend(mem, q[:, :, :12], k[:, :, :12], v[:, :, :12], 0)
    assert bank_nbytes(mem) == 0
    for t in range(12, 20):
        attn.attend(mem, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], t)
    bank = mem.decode_bank
    rows = mem.sparse_k.shape[2] + mem.window_k.shape[2]
    assert bank.keys.shape == (1, KV_HEADS, rows, D)  # one bank row per KV head with group selection
    assert bank_nbytes(mem) == 4 * (KV_HEADS * rows * (2 * D + 1) + HEADS * 2 * HALF * (D + 1)) > 0
