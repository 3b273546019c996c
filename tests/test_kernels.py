"""Triton kernels against the PyTorch reference (kernels/reference.py), under TRITON_INTERPRET=1.

Fresh random inputs per case (a seed per case), outputs poisoned with NaN before each run, unused
buffer slots (window past the last query, sparse slots past sparse_len) poisoned too so a kernel
that reads them fails. Error is ‖out − ref‖ / ‖ref‖: float32 within 1e-4, bf16/fp16 within 1e-2
(the bounds of the device METHOD.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import importlib

import pytest
import torch

pytest.importorskip("triton")

from lolachat.kernels import (
    ops,
    triton_argmax,
    triton_attention,
    triton_common,
    triton_eviction,
    triton_moves,
    triton_norm,
)
from lolachat.kernels import reference as ref

# Triton picks interpreter or compiler when a kernel is defined: if another test module imported the
# kernels before TRITON_INTERPRET was set, define them again (in place, so ops sees the new ones).
for _module in (triton_common, triton_attention, triton_eviction, triton_moves, triton_norm, triton_argmax):
    importlib.reload(_module)

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "output has NaN (an element was not written)"
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def inv_freq(d: int) -> torch.Tensor:
    return (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE)


class Draw:
    """Random tensors from one seeded generator (on the CPU, then moved)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=self.g) * scale).to(dtype).to(DEVICE)

    def uniform(self, *shape):
        return torch.rand(*shape, generator=self.g).to(DEVICE)

    def positions(self, low, high, shape):
        return torch.randint(low, high, shape, generator=self.g).to(DEVICE)


def state(draw: Draw, b, h, f, d):
    """A linear state as it looks after folding: H = Σ φvᵀ, s = Σ φ (positive s)."""
    phi = draw.uniform(b, h, 3 * f, f).softmax(-1)
    v = draw.normal(b, h, 3 * f, d)
    return torch.einsum("bhnf,bhnd->bhfd", phi, v).contiguous(), phi.sum(2).contiguous()


# ---------------------------------------------------------------- attention step


SHAPES = {  # B, H, Hkv, D, F, C
    "small": (1, 4, 2, 16, 32, 8),
    "odd": (2, 3, 1, 24, 24, 6),  # D/2 = F/2 = 12: every tile padded; GQA group 3
    "real_d": (1, 2, 2, 64, 128, 16),
}


def attention_case(seed, shape, t, has_prev, n_sparse, sparse_used, dtype, cap, big_pos=False):
    b, h, hkv, d, f, c = SHAPES[shape]
    draw = Draw(seed)
    window_start = 40 + (120_000 if big_pos else 0)
    current = c if t == c else t + 2  # tokens of the current chunk, the queries being the last t
    window_len = (c if has_prev else 0) + current
    w = 2 * c
    window_k = torch.full((b, hkv, w, d), float("nan"), dtype=dtype, device=DEVICE)
    window_v = window_k.clone()
    window_k[:, :, :window_len] = draw.normal(b, hkv, window_len, d, dtype=dtype)
    window_v[:, :, :window_len] = draw.normal(b, hkv, window_len, d, dtype=dtype)
    q_pos0 = window_start + window_len - t
    sparse_k = draw.normal(b, h, n_sparse, d, dtype=dtype)
    sparse_v = draw.normal(b, h, n_sparse, d, dtype=dtype)
    sparse_pos = draw.positions(0, window_start, (b, h, n_sparse))
    sparse_k[:, :, sparse_used:] = float("nan")
    sparse_v[:, :, sparse_used:] = float("nan")
    h_state, s_state = state(draw, b, h, f, d)
    return {
        "q_pre": draw.normal(b, h, t, d, dtype=dtype), "q_pos": q_pos0, "window_k": window_k,
        "window_v": window_v, "window_start": window_start, "sparse_k": sparse_k, "sparse_v": sparse_v,
        "sparse_pos": sparse_pos, "h_state": h_state, "s_state": s_state, "gamma": draw.uniform(h),
        "phi_weight": draw.normal(h, d, f // 2), "inv_freq": inv_freq(d), "scale": d**-0.5,
        "max_distance": cap, "sparse_len": sparse_used,
    }


def run_attention(case, mix, phi_input, as_tensors=False, trig=None):
    want = ref.lola_attention(**case, mix=mix, phi_input=phi_input)
    t = case["q_pre"].shape[2]
    if as_tensors:  # the CUDA-graph form: positions and counts as device tensors
        case = dict(case)
        case["q_pos"] = torch.arange(case["q_pos"], case["q_pos"] + t, device=DEVICE)
        case["window_start"] = torch.tensor([case["window_start"]], device=DEVICE)
        case["sparse_len"] = torch.tensor([case["sparse_len"]], device=DEVICE)
    errors = []
    # the split kernel (default) and the single-program one, each with its default form (one query per program
    # and plain products at T = 1, tensor-core tiles of 16 queries above) and the other form
    for split, other_form in ((True, False), (False, False), (True, True), (False, True)):
        out = torch.full_like(want, float("nan"))
        got = triton_attention.lola_attention(**case, mix=mix, phi_input=phi_input, out=out, trig=trig,
                                              split=split, vec=(t != 1) if other_form else None)
        assert got is out
        errors.append(rel_err(got, want))
    return max(errors)


ATTENTION_CASES = [
    # shape,  T, has_prev, sparse N, used, dtype, cap
    ("small", 1, True, 0, 0, torch.float32, None),  # λ = 0: window + linear state (decode)
    ("small", 1, False, 0, 0, torch.float32, None),  # first chunk, nothing evicted yet
    ("small", 5, True, 12, 7, torch.float32, None),  # cache not yet full (poisoned tail)
    ("small", 8, True, 16, 16, torch.float32, 20),  # cache full, whole chunk, capped distance
    ("small", 1, True, 16, 16, torch.float32, 3),  # cap below every distance: all far keys
    ("odd", 3, True, 13, 13, torch.float32, 11),  # padded tiles, GQA group 3, B = 2
    ("odd", 6, False, 5, 2, torch.float32, None),
    ("real_d", 16, True, 70, 70, torch.float32, 30),  # non-multiple of the 64-key block
    ("real_d", 1, True, 64, 64, torch.float32, None),
    ("small", 5, True, 16, 9, torch.bfloat16, 20),
    ("real_d", 1, True, 40, 40, torch.bfloat16, None),
    ("odd", 6, True, 10, 10, torch.float16, 11),
]


@pytest.mark.parametrize("mix", ["lola", "lolcats"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_matches_reference(case, mix):
    shape, t, has_prev, n, used, dtype, cap = case
    index = ATTENTION_CASES.index(case)
    seed = 2 * index + (mix == "lola")
    phi_input = "post_rope" if (index + (mix == "lola")) % 2 else "pre_rope"  # both, across the mixes
    err = run_attention(attention_case(seed, shape, t, has_prev, n, used, dtype, cap), mix, phi_input)
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize(("phi_input", "trig"), [("pre_rope", None), ("post_rope", "libdevice")])
def test_attention_device_scalars_and_far_positions(phi_input, trig):
    case = attention_case(7, "small", 3, True, 16, 11, torch.float32, 25, big_pos=True)
    err = run_attention(case, "lola", phi_input, as_tensors=True, trig=trig)
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


def test_attention_strided_queries():
    """Queries as the engine makes them: a [B,T,H,D] projection viewed as [B,H,T,D]."""
    case = attention_case(11, "small", 5, True, 16, 16, torch.float32, None)
    case["q_pre"] = case["q_pre"].transpose(1, 2).contiguous().transpose(1, 2)
    assert rel_err(triton_attention.lola_attention(**case, mix="lola", phi_input="pre_rope"),
                   ref.lola_attention(**case, mix="lola", phi_input="pre_rope")) < TOL[torch.float32]


# ---------------------------------------------------------------- feature map and eviction


@pytest.mark.parametrize("dims", [(2, 3, 7, 16, 32), (1, 2, 33, 24, 24), (1, 2, 5, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hedgehog(dims, dtype):
    b, h, t, d, f = dims
    draw = Draw(sum(dims))
    x, w = draw.normal(b, h, t, d, dtype=dtype), draw.normal(h, d, f // 2)
    want = ref.hedgehog(x, w)
    out = torch.full_like(want, float("nan"))
    assert rel_err(triton_eviction.hedgehog(x, w, out=out), want) < TOL[torch.float32]


@pytest.mark.parametrize("dims", [(1, 2, 40, 16, 32), (2, 3, 37, 24, 24), (1, 2, 80, 64, 128)])
def test_self_recall_error(dims):
    b, h, n, d, f = dims
    draw = Draw(n)
    phi = draw.uniform(b, h, n, f).softmax(-1)
    v = draw.normal(b, h, n, d)
    h_state, s_state = state(draw, b, h, f, d)
    want = ref.self_recall_error(phi, v, h_state, s_state)
    out = torch.full_like(want, float("nan"))
    assert rel_err(triton_eviction.self_recall_error(phi, v, h_state, s_state, out=out), want) < 1e-4


@pytest.mark.parametrize("fade", [1.0, 0.7])
@pytest.mark.parametrize("dims", [(1, 2, 40, 16, 32), (2, 3, 37, 24, 24), (1, 2, 80, 64, 128)])
def test_others_scores(dims, fade):
    """The leave-one-out score in four launches equals the reference's PyTorch ops against the faded state, and
    leaves the state as it was."""
    b, h, n, d, f = dims
    draw = Draw(n + 2)
    phi = draw.uniform(b, h, n, f).softmax(-1)
    v = draw.normal(b, h, n, d, dtype=torch.bfloat16)
    h_state, s_state = state(draw, b, h, f, d)
    before = h_state.clone(), s_state.clone()
    want = ref.eviction_scores(phi, v, h_state * fade, s_state * fade, "others")
    got = triton_eviction.others_scores(phi, v, h_state, s_state, fade)
    assert rel_err(got, want) < 1e-4
    assert rel_err(got, ref.eviction_scores(phi, v, h_state * fade, s_state * fade, "error")) > 1e-3
    assert torch.equal(h_state, before[0]) and torch.equal(s_state, before[1])


@pytest.mark.parametrize("dims", [(1, 2, 40, 16, 32), (2, 3, 37, 24, 24), (1, 2, 80, 128, 128)])
def test_fold(dims):
    b, h, n, d, f = dims
    draw = Draw(n + 1)
    phi = draw.uniform(b, h, n, f).softmax(-1)
    v = draw.normal(b, h, n, d, dtype=torch.bfloat16)
    h_want, s_want = state(draw, b, h, f, d)
    h_got, s_got = h_want.clone(), s_want.clone()
    ref.fold(phi, v, h_want, s_want)
    triton_eviction.fold(phi, v, h_got, s_got)
    assert rel_err(h_got, h_want) < 1e-4 and rel_err(s_got, s_want) < 1e-4


SELECT_CASES = [  # N, capacities, scores: "normal", "ties" (4 distinct values) or "ties+inf" (-inf too)
    (5, (0, 1, 4, 5), "ties"),
    (37, (20,), "normal"),
    (320, (256, 319, 0, 120), "ties"),  # 120: the cut falls among the zeros (±0.0)
    (832, (768, 831, 832), "ties+inf"),  # the default model's λ = 768 + C = 64
    (1088, (1024, 1), "normal"),
    (2100, (1000, 2099, 2100, 0), "ties+inf"),
]


def select_scores(draw: Draw, n: int, kind: str) -> torch.Tensor:
    if kind == "normal":
        return draw.normal(2, 3, n)
    scores = (draw.uniform(2, 3, n) * 4).floor() - 2.0
    scores[(scores == 0) & (draw.uniform(2, 3, n) < 0.5)] = -0.0  # -0.0 and +0.0 tie, as in the sort
    if kind == "ties+inf":
        scores[draw.uniform(2, 3, n) < 0.3] = float("-inf")
        scores[1, 2] = float("-inf")  # a row of -inf only: every candidate ties
    return scores


def check_select(scores, capacity, **knobs):
    keep_want, drop_want = ref.select_keep(scores, capacity)
    b, h, n = scores.shape
    out = (torch.full((b, h, capacity), -1, dtype=torch.long, device=DEVICE),
           torch.full((b, h, n - capacity), -1, dtype=torch.long, device=DEVICE))
    keep, drop = triton_eviction.select_keep(scores, capacity, out=out, **knobs)
    assert keep is out[0] and drop is out[1]
    assert torch.equal(keep, keep_want), f"capacity {capacity}"
    assert torch.equal(drop, drop_want.sort(-1).values), f"capacity {capacity}"  # the rest, in candidate order


@pytest.mark.parametrize(("n", "capacities", "kind"), SELECT_CASES, ids=lambda c: str(c))
def test_select_keep(n, capacities, kind):
    """The radix search gives the stable sort's keep at any N: ties to the earlier candidate, -inf, 0 and N."""
    scores = select_scores(Draw(n), n, kind)
    for capacity in capacities:
        check_select(scores, capacity)


@pytest.mark.parametrize(("n", "capacity", "knobs"), [
    (2100, 1000, {"block_max": 512}),  # streamed in chunks, the last one partial
    (1088, 1088, {"block_max": 512, "radix_bits": 4}),
    (832, 768, {"radix_bits": 1}),
    (320, 319, {"radix_bits": 2}),
    (320, 3, {"radix_bits": 8}),
], ids=str)
def test_select_keep_knobs(n, capacity, knobs):
    check_select(select_scores(Draw(n + 1), n, "ties+inf"), capacity, **knobs)


def test_select_default_radix_bits():
    """4 bits per pass up to 512 candidates (rounded up to a power of two), 2 above: the H200's fastest."""
    assert [triton_eviction.default_radix_bits(n) for n in (5, 320, 512, 513, 832, 1088, 5000)] == [4, 4, 4, 2, 2, 2, 2]


def test_select_dispatch(monkeypatch):
    """ops.select_keep runs the Triton kernel for any number of candidates (no fallback to the sort)."""
    monkeypatch.setenv("LOLACHAT_TRITON", "1")
    used = []
    kernel = triton_eviction.select_keep
    monkeypatch.setattr(triton_eviction, "select_keep", lambda s, c: used.append(s.shape[-1]) or kernel(s, c))
    draw = Draw(5)
    for n in (70, 512, 513):
        scores = draw.normal(1, 2, n)
        assert torch.equal(ops.select_keep(scores, n - 64)[0], ref.select_keep(scores, n - 64)[0])
    assert used == [70, 512, 513]


EVICT_CASES = [  # B, H, D, F, λ, C, dtype, phi_input
    (1, 2, 16, 32, 24, 8, torch.float32, "pre_rope"),
    (2, 3, 24, 24, 10, 6, torch.float32, "post_rope"),
    (1, 2, 64, 128, 40, 16, torch.bfloat16, "post_rope"),
    (1, 2, 64, 128, 0, 16, torch.float32, "pre_rope"),  # λ = 0 would fold the whole chunk
    (1, 2, 16, 32, 768, 64, torch.float32, "pre_rope"),  # the default model's λ (832 candidates)
]


@pytest.mark.parametrize("case", EVICT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_evict_compete(case):
    b, h, d, f, capacity, c, dtype, phi_input = case
    draw = Draw(capacity + c + d)
    n = capacity + c
    keys, values = draw.normal(b, h, n, d, dtype=dtype), draw.normal(b, h, n, d, dtype=dtype)
    positions = torch.cat([draw.positions(0, 500, (b, h, capacity)),
                           torch.arange(500, 500 + c, device=DEVICE).expand(b, h, c)], dim=2)
    weight, freqs = draw.normal(h, d, f // 2), inv_freq(d)
    h_want, s_want = state(draw, b, h, f, d)
    h_got, s_got = h_want.clone(), s_want.clone()

    x = ref.rope_rotate(keys, positions, freqs) if phi_input == "post_rope" else keys
    want_scores = ref.self_recall_error(ref.hedgehog(x, weight), values, h_want, s_want)
    scores = torch.full_like(want_scores, float("nan"))
    phi = torch.full((b, h, n, f), float("nan"), device=DEVICE)
    triton_eviction.recall_scores(keys, positions, values, h_got, s_got, weight, freqs,
                                  phi_input == "post_rope", out=scores, phi_out=phi)
    assert rel_err(scores, want_scores) < 1e-4
    assert rel_err(phi, ref.hedgehog(x, weight)) < TOL[dtype]  # the rows fold_picked will read

    # the dropped pairs folded from their stored φ rows, or with φ recomputed from the keys: the same state
    drop = ref.select_keep(want_scores, capacity)[1]
    h_keys, s_keys, h_rows, s_rows = h_want.clone(), s_want.clone(), h_want.clone(), s_want.clone()
    triton_eviction.fold_keys(keys, positions, values, drop, h_keys, s_keys, weight, freqs, phi_input == "post_rope")
    triton_eviction.fold_picked(phi, values, drop, h_rows, s_rows)
    assert rel_err(h_rows, h_keys) < 1e-6 and rel_err(s_rows, s_keys) < 1e-6
    assert rel_err(h_rows, h_want) > 1e-3  # and the fold did change it

    keep_want = ref.evict_compete(keys, values, positions, h_want, s_want, weight, capacity, freqs, phi_input)
    os.environ["LOLACHAT_TRITON"] = "1"
    try:
        keep_got = ops.evict_compete(keys, values, positions, h_got, s_got, weight, capacity, freqs, phi_input)
    finally:
        del os.environ["LOLACHAT_TRITON"]
    assert torch.equal(keep_got, keep_want)
    # The state is fp32, but with bf16 inputs the reference rotates keys in bf16 and the kernel in fp32:
    # on the H200 that rounding alone moved H by 1.2e-4 (relative), so the input dtype's bound applies.
    assert rel_err(h_got, h_want) < TOL[dtype] and rel_err(s_got, s_want) < TOL[dtype]


def compete_with_and_without(seed: int, group: int, spacing: int, **variant):
    """One competition (λ = 24 of 32 candidates, 4 heads) three ways: the reference with the default score, the
    reference with `variant` (ref.evict_compete's keywords) and the Triton path with it. Candidate order is age
    order, `spacing` tokens apart. Returns (plain keep, reference keep, Triton keep); the Triton path's state is
    checked against the reference's here."""
    b, h, d, f, capacity, c = 1, 4, 16, 32, 24, 8
    draw = Draw(seed)
    n = capacity + c
    keys, values = draw.normal(b, h, n, d), draw.normal(b, h, n, d, scale=0.5) + draw.uniform(b, h, n, 1) * 3
    positions = (torch.arange(n, device=DEVICE) * spacing).expand(b, h, n)
    weight, freqs = draw.normal(h, d, f // 2), inv_freq(d)
    h_want, s_want = state(draw, b, h, f, d)
    h_got, s_got = h_want.clone(), s_want.clone()
    plain = ref.evict_compete(keys, values, positions, h_want.clone(), s_want.clone(), weight, capacity, freqs,
                              "pre_rope", group)
    keep_want = ref.evict_compete(keys, values, positions, h_want, s_want, weight, capacity, freqs, "pre_rope", group,
                                  **variant)
    os.environ["LOLACHAT_TRITON"] = "1"
    try:
        keep_got = ops.evict_compete(keys, values, positions, h_got, s_got, weight, capacity, freqs, "pre_rope", group,
                                     **variant)
    finally:
        del os.environ["LOLACHAT_TRITON"]
    assert rel_err(h_got, h_want) < 1e-4 and rel_err(s_got, s_want) < 1e-4
    return plain, keep_want, keep_got


@pytest.mark.parametrize("score", ["relative", "others"])
def test_evict_compete_other_scores(score):
    """The eviction scores beside the self-recall error: the Triton path (φ from the scores kernel, the score in
    PyTorch) keeps what the reference keeps, and the score does change what is kept."""
    plain, keep_want, keep_got = compete_with_and_without(91, 2, 1, score=score)
    assert not torch.equal(keep_want, plain)
    assert torch.equal(keep_got, keep_want)


def test_age_discount_halves_a_score_per_halflife():
    scores = torch.full((1, 2, 3), 8.0)
    positions = torch.tensor([[0, 100, 200], [50, 250, 150]]).view(1, 2, 3)
    want = torch.tensor([[2.0, 4.0, 8.0], [2.0, 8.0, 4.0]]).view(1, 2, 3)  # age from each head's newest
    torch.testing.assert_close(ref.age_discount(scores, positions, 100), want)
    assert ref.age_discount(scores, positions, 0) is scores


@pytest.mark.parametrize("group", [1, 2])
def test_evict_compete_discounts_scores_by_age(group):
    """score_halflife: the Triton path (scores kernel, the discount in PyTorch, the split kernel) keeps what the
    reference keeps, and the discount changes what is kept, toward newer pairs."""
    aged = ref.Recency(halflife=400)  # candidates 0 … 1,550 tokens back
    plain, keep_want, keep_got = compete_with_and_without(93, group, 50, recency=aged)
    assert not torch.equal(keep_want, plain)
    assert keep_want.float().mean() > plain.float().mean()  # newer pairs kept
    assert torch.equal(keep_got, keep_want)


def test_keep_newest_raises_the_newest_candidates_of_each_head():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]).view(1, 2, 4)
    positions = torch.tensor([[10, 40, 20, 30], [70, 50, 60, 80]]).view(1, 2, 4)
    inf = float("inf")
    want = torch.tensor([[5.0, inf, 3.0, inf], [inf, 2.0, 3.0, inf]]).view(1, 2, 4)
    torch.testing.assert_close(ref.keep_newest(scores, positions, 2), want)
    assert ref.keep_newest(scores, positions, 0) is scores
    keep, _ = ref.select_keep(ref.keep_newest(scores, positions, 2), 3)
    assert keep.tolist() == [[[0, 1, 3], [0, 2, 3]]]  # two newest, then the best score of the rest


def test_recency_spares_the_exempt_heads_from_recent_slots():
    """Recency.exempt_heads: those heads keep their scores (all λ by score), the others get the newest raised."""
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]).view(1, 3, 4)
    positions = torch.tensor([[10, 40, 20, 30], [70, 50, 60, 80], [1, 2, 3, 4]]).view(1, 3, 4)
    got = ref.Recency(slots=2, exempt_heads=(1,)).apply(scores, positions)
    want = ref.keep_newest(scores, positions, 2)
    want[:, 1] = scores[:, 1]
    torch.testing.assert_close(got, want)
    assert torch.isinf(got[:, [0, 2]]).sum() == 4
    torch.testing.assert_close(ref.Recency(exempt_heads=(1,)).apply(scores, positions), scores)


@pytest.mark.parametrize("group", [1, 2])
def test_evict_compete_keeps_the_newest_in_recent_slots(group):
    """recent slots: the Triton path keeps what the reference keeps; the 8 newest candidates always stay and
    the other 16 slots still go by score: the best older candidates, which the plain score keeps too."""
    plain, keep_want, keep_got = compete_with_and_without(95, group, 1, recency=ref.Recency(slots=8))
    newest = set(range(24, 32))
    for recent_row, plain_row in zip(keep_want[0].tolist(), plain[0].tolist()):
        assert newest <= set(recent_row)
        assert set(recent_row) - newest <= set(plain_row)
    assert not torch.equal(keep_want, plain)
    assert torch.equal(keep_got, keep_want)


@pytest.mark.parametrize("store_phi", [True, False], ids=["phi-stored", "phi-from-keys"])
@pytest.mark.parametrize("score", ["error", "others"])
def test_evict_compete_fades_inside_the_kernels(store_phi, score):
    """A fading state (`fade` < 1): the Triton path scores against fade·(H, s) and folds into it without a
    launch of its own, and keeps what the reference keeps after fading in place."""
    b, h, d, f, capacity, c, group, fade = 1, 4, 16, 32, 24, 8, 2, 0.8
    draw = Draw(57)
    n = capacity + c
    keys, values = draw.normal(b, h, n, d), draw.normal(b, h, n, d)
    positions = torch.arange(n, device=DEVICE).expand(b, h, n)
    weight, freqs = draw.normal(h, d, f // 2), inv_freq(d)
    h0, s0 = state(draw, b, h, f, d)
    s0 = s0 * 1e-6  # φ(k)ᵀs near ε: the fade moves the scores' ε term, and with it the ranking
    h_want, s_want = h0.clone(), s0.clone()
    keep_want = ref.evict_compete(keys, values, positions, h_want, s_want, weight, capacity, freqs, "pre_rope", group,
                                  score, fade)
    unfaded = ref.evict_compete(keys, values, positions, h0.clone(), s0.clone(), weight, capacity, freqs, "pre_rope",
                                group, score)
    assert rel_err(h_want, h0) > 0.1  # the fade did act
    args = (keys, values, positions)
    os.environ["LOLACHAT_TRITON"] = "1"
    try:
        h_got, s_got = h0.clone(), s0.clone()
        keep_got = ops.evict_compete(*args, h_got, s_got, weight, capacity, freqs, "pre_rope", group, store_phi, score,
                                     fade)
    finally:
        del os.environ["LOLACHAT_TRITON"]
    assert torch.equal(keep_got, keep_want)
    assert rel_err(h_got, h_want) < 1e-5 and rel_err(s_got, s_want) < 1e-5
    if score == "error":
        assert not torch.equal(keep_want, unfaded)  # so the faded scores were the ones ranked


def test_fold_with_nothing_picked_still_fades():
    b, h, d, f = 1, 2, 16, 32
    draw = Draw(58)
    values = draw.normal(b, h, 5, d)
    h_state, s_state = state(draw, b, h, f, d)
    h_want, s_want = h_state * 0.5, s_state * 0.5
    nothing = torch.zeros(b, h, 0, dtype=torch.long, device=DEVICE)
    triton_eviction.fold_picked(torch.zeros(b, h, 5, f, device=DEVICE), values, nothing, h_state, s_state, fade=0.5)
    assert torch.equal(h_state, h_want) and torch.equal(s_state, s_want)


@pytest.mark.parametrize(("capacity", "c"), [(12, 8), (768, 64)])  # 20 / 832 candidates
def test_evict_compete_group_selection(capacity, c):
    """Group selection: each pair of query heads ranks by the pair's larger error and keeps the same set."""
    b, h, d, f, group = 1, 4, 16, 32, 2
    draw = Draw(77 + capacity)
    n = capacity + c
    keys = draw.normal(b, h // group, n, d).repeat_interleave(group, dim=1)
    values = draw.normal(b, h // group, n, d).repeat_interleave(group, dim=1)
    positions = torch.arange(n, device=DEVICE).expand(b, h, n)
    weight, freqs = draw.normal(h, d, f // 2), inv_freq(d)
    h_want, s_want = state(draw, b, h, f, d)
    h_got, s_got = h_want.clone(), s_want.clone()
    per_head = ref.evict_compete(keys, values, positions, h_want.clone(), s_want.clone(), weight, capacity, freqs,
                                 "pre_rope")
    keep_want = ref.evict_compete(keys, values, positions, h_want, s_want, weight, capacity, freqs, "pre_rope", group)
    assert torch.equal(keep_want[:, 0], keep_want[:, 1]) and torch.equal(keep_want[:, 2], keep_want[:, 3])
    assert not torch.equal(keep_want, per_head)  # the heads' own rankings differ (their maps and states do)
    os.environ["LOLACHAT_TRITON"] = "1"
    try:
        keep_got = ops.evict_compete(keys, values, positions, h_got, s_got, weight, capacity, freqs, "pre_rope", group)
    finally:
        del os.environ["LOLACHAT_TRITON"]
    assert torch.equal(keep_got, keep_want)
    assert rel_err(h_got, h_want) < 1e-4 and rel_err(s_got, s_want) < 1e-4


# ---------------------------------------------------------------- eviction's data movement

MOVE_CASES = [  # B, H, Hkv, D, λ, C, n (sparse fill), dtype
    (1, 9, 3, 64, 20, 8, 20, torch.bfloat16),
    (2, 4, 2, 24, 10, 6, 10, torch.float32),
    (1, 4, 4, 16, 40, 16, 30, torch.float32),  # cache not yet full: only n + C candidates
    (1, 6, 2, 64, 3, 16, 3, torch.bfloat16),  # λ smaller than the block
]


def move_buffers(case, draw: Draw):
    b, h, hkv, d, lam, c, n, dtype = case
    sparse = (draw.normal(b, h, lam, d, dtype=dtype), draw.normal(b, h, lam, d, dtype=dtype),
              draw.positions(0, 900, (b, h, lam)))
    window = (draw.normal(b, hkv, 2 * c, d, dtype=dtype), draw.normal(b, hkv, 2 * c, d, dtype=dtype))
    cand = (torch.full((b, h, lam + c, d), float("nan"), dtype=dtype, device=DEVICE),
            torch.full((b, h, lam + c, d), float("nan"), dtype=dtype, device=DEVICE),
            torch.full((b, h, lam + c), -1, dtype=torch.long, device=DEVICE))
    return sparse, window, cand


@pytest.mark.parametrize("case", MOVE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("start_as_tensor", [False, True])
def test_assemble_candidates(case, start_as_tensor):
    n, c = case[6], case[5]
    sparse, window, cand = move_buffers(case, Draw(sum(case[:7])))
    want = tuple(t.clone() for t in cand)
    start = torch.tensor([1000], device=DEVICE) if start_as_tensor else 1000
    ref.assemble_candidates(*sparse, n, *window, 1000, *want)
    triton_moves.assemble_candidates(*sparse, n, *window, start, *cand)
    for got, exp in zip(cand, want):
        assert torch.equal(got[:, :, : n + c], exp[:, :, : n + c])


@pytest.mark.parametrize("case", MOVE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_keep_and_shift(case):
    b, h, _, _, lam, c, n, _ = case
    draw = Draw(sum(case[:7]) + 1)
    sparse, window, cand = move_buffers(case, draw)
    ref.assemble_candidates(*sparse, n, *window, 1000, *cand)
    keep = torch.stack([torch.randperm(n + c, generator=draw.g)[:lam].sort().values for _ in range(b * h)])
    keep = keep.view(b, h, lam).to(DEVICE)
    want_sparse, want_window = [t.clone() for t in sparse], [t.clone() for t in window]
    ref.keep_and_shift(*cand, keep, *want_sparse, *want_window)
    triton_moves.keep_and_shift(*cand, keep, *sparse, *window)
    for got, exp in zip(list(sparse) + list(window), want_sparse + want_window):
        assert torch.equal(got, exp)

    # in a prefill block the next chunk comes along: strided views of a [B, T, Hkv, D] projection
    proj = draw.normal(2, b, 3 * c, window[0].shape[1], window[0].shape[3], dtype=window[0].dtype)
    next_k, next_v = (x.transpose(1, 2)[:, :, c : 2 * c] for x in proj)
    ref.keep_and_shift(*cand, keep, *want_sparse, *want_window, next_k, next_v)
    triton_moves.keep_and_shift(*cand, keep, *sparse, *window, next_k, next_v)
    for got, exp in zip(list(sparse) + list(window), want_sparse + want_window):
        assert torch.equal(got, exp)
    assert torch.equal(window[0][:, :, c:], next_k) and torch.equal(window[1][:, :, c:], next_v)


@pytest.mark.parametrize("case", MOVE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("with_next", [False, True])
def test_compete_and_keep(case, with_next):
    """Eviction after assembly in one call: the Triton path (scores, split, then the fold and the keep in one
    launch) against the reference's evict_compete + keep_and_shift, on the first n + C candidate rows (a cache
    not yet full uses fewer rows than the buffers hold) with a fading state."""
    b, h, hkv, d, lam, c, n, dtype = case
    f, fade = 32, 0.9
    draw = Draw(sum(case[:7]) + 2)
    sparse, window, cand = move_buffers(case, draw)
    ref.assemble_candidates(*sparse, n, *window, 1000, *cand)
    weight, freqs = draw.normal(h, d, f // 2), inv_freq(d)
    h0, s0 = state(draw, b, h, f, d)
    proj = draw.normal(2, b, 3 * c, hkv, d, dtype=dtype)
    nxt = tuple(x.transpose(1, 2)[:, :, c : 2 * c] for x in proj) if with_next else (None, None)
    want = [t.clone() for t in (h0, s0, *sparse, *window)]
    keep = ref.evict_compete(*(t[:, :, : n + c] for t in cand), want[0], want[1], weight, lam, freqs, "post_rope",
                             group=h // hkv, fade=fade)
    ref.keep_and_shift(*cand, keep, *want[2:5], *want[5:], *nxt)
    got = [t.clone() for t in (h0, s0, *sparse, *window)]
    os.environ["LOLACHAT_TRITON"] = "1"
    try:
        ops.compete_and_keep(cand, n + c, got[0], got[1], weight, lam, freqs, "post_rope", tuple(got[2:5]), *got[5:],
                             *nxt, group=h // hkv, fade=fade)
    finally:
        del os.environ["LOLACHAT_TRITON"]
    assert rel_err(got[0], want[0]) < TOL[dtype] and rel_err(got[1], want[1]) < TOL[dtype]
    for g, w in zip(got[2:], want[2:]):  # the same pairs kept, the same window
        assert torch.equal(g, w)


# ---------------------------------------------------------------- norms and SiLU between the GEMVs

NORM_SHAPES = [(1, 1, 576), (2, 3, 100), (1, 5, 4096)]  # [B, T, dim]: decode, odd dims, the 8B width


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(shape, dtype):
    draw = Draw(shape[-1])
    x, w = draw.normal(*shape, dtype=dtype, scale=3.0), draw.normal(shape[-1], dtype=dtype)
    out = torch.full_like(x, float("nan"))
    assert rel_err(triton_norm.rms_norm(x, w, 1e-5, out=out), ref.rms_norm(x, w, 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_updates_the_residual(shape, dtype):
    draw = Draw(shape[-1] + 1)
    x, delta = draw.normal(*shape, dtype=dtype), draw.normal(*shape, dtype=dtype)
    w = draw.normal(shape[-1], dtype=dtype)
    x_want, x_got = x.clone(), x.clone()
    want = ref.add_rms_norm(x_want, delta, w, 1e-6)
    out = torch.full_like(x, float("nan"))
    got = triton_norm.add_rms_norm(x_got, delta, w, 1e-6, out=out)
    assert rel_err(x_got, x_want) < TOL[dtype]
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (2, 3, 2 * 50), (1, 2, 2 * 3000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(shape, dtype):
    gate_up = Draw(shape[-1]).normal(*shape, dtype=dtype, scale=2.0)
    out = torch.full(shape[:-1] + (shape[-1] // 2,), float("nan"), dtype=dtype, device=DEVICE)
    assert rel_err(triton_norm.silu_mul(gate_up, out=out, block_n=512), ref.silu_mul(gate_up)) < TOL[dtype]


def test_reference_norm_is_the_model_norm():
    from lolachat.model import RMSNorm

    norm = RMSNorm(48, 1e-5)
    norm.weight.data = torch.randn(48)
    x = torch.randn(2, 3, 48)
    assert torch.equal(ref.rms_norm(x, norm.weight.data, norm.eps), norm(x).detach())


# ---------------------------------------------------------------- greedy token


def argmax_rows(v: int, seed: int) -> torch.Tensor:
    """Rows built to trip an argmax: random; the maximum repeated in several chunks and lanes (the first must
    win); -inf everywhere but one entry; all -inf (torch answers 0); the maximum in the last, partial chunk."""
    draw = Draw(seed)
    rows = draw.normal(5, v)
    rows[1, [v // 3, 7, v - 2, v // 2]] = 50.0
    rows[2] = float("-inf")
    rows[2, v - 5] = -3.0
    rows[3] = float("-inf")
    rows[4, v - 1] = 40.0
    return rows


@pytest.mark.parametrize(("v", "block"), [(49152, 4096), (1000, 256), (37, 4096), (5000, 1024)], ids=str)
def test_argmax_into(v, block):
    logits = argmax_rows(v, v)
    want = ref.argmax_into(logits, torch.empty(5, 1, dtype=torch.long, device=DEVICE))
    out = torch.full((5, 1), -1, dtype=torch.long, device=DEVICE)
    assert triton_argmax.argmax_into(logits, out, block=block) is out
    assert torch.equal(out, want), (out.flatten().tolist(), want.flatten().tolist())
    assert want[1, 0] == 7 and want[3, 0] == 0 and want[4, 0] == v - 1  # the cases are what they claim


# ---------------------------------------------------------------- dispatch


def test_ops_dispatch(monkeypatch):
    case = attention_case(3, "small", 2, True, 16, 16, torch.float32, 20)
    want = ref.lola_attention(**case, mix="lola", phi_input="pre_rope")
    monkeypatch.setenv("LOLACHAT_TRITON", "1")
    assert ops.use_triton(case["q_pre"])
    assert rel_err(ops.lola_attention(**case, mix="lola", phi_input="pre_rope"), want) < 1e-4
    phi = ops.hedgehog(case["q_pre"], case["phi_weight"])
    assert rel_err(phi, ref.hedgehog(case["q_pre"], case["phi_weight"])) < 1e-4
    monkeypatch.setenv("LOLACHAT_TRITON", "0")
    assert not ops.use_triton(case["q_pre"])
    assert torch.equal(ops.lola_attention(**case, mix="lola", phi_input="pre_rope"), want)
