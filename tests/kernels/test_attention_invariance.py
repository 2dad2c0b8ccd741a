"""Batch-invariant attention over the paged pool (tinylm/kernels/invariant_attention.cpp, issue 21): a query's output
is bitwise the same alone or beside 1 / 7 / 15 other rows of other lengths, under any padding, on 1 or 2 threads,
and whether its token is decoded alone or scored among a prefill chunk's queries (chunks of 1, 5 or the whole
prompt), for float32 / bf16 / int8 pools and GQA; it agrees with float64 SDPA; PagedBatch's wrappers store the
chunk's K/V and give, through prefill_attention, what decode_attention gives token by token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tinylm import kernels
from tinylm.engine.kv_pool import PagedBatch, quantize_rows
from tinylm.model.transformer import build_attention_mask

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain to build tinylm's kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.int8]
SHAPES = [(9, 3, 64), (4, 1, 128), (8, 8, 32)]  # (H, H_kv, D): SmolLM2-135M's GQA 3:1, MQA, plain multi-head
POOL_SLOTS = 4096
PAD_SLOT = 0  # padding points at slot 0, as the engine's gather slots do


def _pool(dtype, kv_heads, dim, seed=0):
    """(k_pool, v_pool, k_scales, v_scales) of POOL_SLOTS rows, and their values as float64 (dequantized)."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(POOL_SLOTS, kv_heads, dim, generator=gen) * 2 for _ in range(2))
    if dtype is torch.int8:
        (k_codes, k_scales), (v_codes, v_scales) = quantize_rows(k), quantize_rows(v)
        exact = [codes.double() * scales.double()[..., None] for codes, scales in ((k_codes, k_scales),
                                                                                   (v_codes, v_scales))]
        return (k_codes, v_codes, k_scales, v_scales), exact
    k, v = k.to(dtype), v.to(dtype)
    return (k, v, None, None), [k.double(), v.double()]


def _sequences(lengths, seed=1):
    """Disjoint random slots (never slot 0) for sequences of the given lengths: each a (L,) int64 tensor."""
    order = torch.randperm(POOL_SLOTS - 64, generator=torch.Generator().manual_seed(seed)) + 64
    cuts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _attend(pool, seqs, queries, pad=0):
    """One call: seqs, a list of (L,) slot tensors laid out right-aligned in a (B, S) slot table padded with slot 0
    (S = the longest + pad); queries, a list of (sequence index, q (H, D), position t), t attending keys 0..t of
    its sequence. -> (R, H, D)."""
    width = max(len(s) for s in seqs) + pad
    slots = torch.full((len(seqs), width), PAD_SLOT, dtype=torch.long)
    for b, s in enumerate(seqs):
        slots[b, width - len(s):] = s
    rows = torch.tensor([b for b, _, _ in queries])
    starts = torch.tensor([width - len(seqs[b]) for b, _, _ in queries])
    ends = starts + torch.tensor([t + 1 for _, _, t in queries])
    q = torch.stack([query for _, query, _ in queries]).float().contiguous()
    k_pool, v_pool, k_scales, v_scales = pool
    return torch.ops.tinylm.invariant_attention(q, k_pool, v_pool, slots, rows, starts, ends, q.shape[-1] ** -0.5,
                                                k_scales, v_scales)


def _others(count, heads, dim, seed):
    """count other sequences of varied lengths, each with a decode query at its last position."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (count,), generator=gen).tolist()
    return lengths, [torch.randn(heads, dim, generator=gen) for _ in lengths]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_a_decode_row_is_bitwise_the_same_beside_any_rows_padding_and_threads(dtype, shape):
    heads, kv_heads, dim = shape
    pool, _ = _pool(dtype, kv_heads, dim)
    q = torch.randn(heads, dim, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for length in (1, 64, 150):
            [target] = _sequences([length], seed=length)
            alone = _attend(pool, [target], [(0, q, length - 1)])[0]
            for count, pad, num_threads in ((1, 0, 1), (7, 37, 2), (15, 5, 2), (15, 0, 1), (0, 70, 2)):
                torch.set_num_threads(num_threads)
                lengths, others = _others(count, heads, dim, seed=count + pad)
                seqs = _sequences([length, *lengths], seed=length + 7)  # same slots count, other places: reseat
                seqs[0] = target
                queries = [(b + 1, o, n - 1) for b, (n, o) in enumerate(zip(lengths, others))]
                position = count // 2  # the target somewhere in the middle of the batch
                queries.insert(position, (0, q, length - 1))
                out = _attend(pool, seqs, queries, pad=pad)
                assert torch.equal(out[position], alone), (length, count, pad, num_threads)
    finally:
        torch.set_num_threads(threads)


def test_todays_decode_kernel_moves_with_the_batch():
    """Why the invariant op exists, and proof that these comparisons can fail: paged_attention splits keys in
    chunks counted on the batch's slot axis, so one row's bits change when a longer row joins it."""
    pool, _ = _pool(torch.bfloat16, 3, 64)
    target, other = _sequences([150, 200])
    q = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(6))
    alone = torch.ops.tinylm.paged_attention(q[:1], pool[0], pool[1], target[None], None, 0.125)
    slots = torch.zeros(2, 200, dtype=torch.long)
    slots[0, 50:], slots[1] = target, other
    together = torch.ops.tinylm.paged_attention(q, pool[0], pool[1], slots, slots != 0, 0.125)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(together[0], alone[0])
    invariant = _attend(pool, [target, other], [(0, q[0], 149), (1, q[1], 199)])
    assert torch.equal(invariant[0], _attend(pool, [target], [(0, q[0], 149)])[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
@pytest.mark.parametrize("chunk", [1, 5, 150])
def test_prefill_queries_equal_the_same_tokens_decoded_alone(dtype, shape, chunk):
    """A 150-token prompt's queries scored in chunks, beside another sequence's prefill rows and a decode row,
    each equal to that position decoded alone over the same cache contents."""
    heads, kv_heads, dim = shape
    pool, _ = _pool(dtype, kv_heads, dim)
    length = 150
    prompt, other = _sequences([length, 90])
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(length, heads, dim, generator=gen)
    q_other = torch.randn(90, heads, dim, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        decoded = torch.stack([_attend(pool, [prompt[:t + 1]], [(0, q[t], t)])[0] for t in range(length)])
        for begin in range(0, length, chunk):
            torch.set_num_threads(1 + begin // chunk % 2)
            end = min(length, begin + chunk)
            # the chunk's own context ends at its last token: the table holds slots 0..end-1 of the prompt
            seqs = [other, prompt[:end]]
            queries = [(0, q_other[t], t) for t in range(40, 47)] + [(1, q[t], t) for t in range(begin, end)]
            queries.append((0, q_other[89], 89))
            out = _attend(pool, seqs, queries, pad=begin % 7)
            assert torch.equal(out[7:7 + end - begin], decoded[begin:end]), (begin, end)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_sdpa(dtype, shape):
    heads, kv_heads, dim = shape
    pool, (k_exact, v_exact) = _pool(dtype, kv_heads, dim)
    lengths = [1, 63, 64, 65, 200]
    seqs = _sequences(lengths)
    gen = torch.Generator().manual_seed(4)
    queries = [(b, torch.randn(heads, dim, generator=gen), t) for b, n in enumerate(lengths)
               for t in sorted({0, n // 2, n - 1})]
    out = _attend(pool, seqs, queries, pad=3)
    for r, (b, query, t) in enumerate(queries):
        keys = k_exact[seqs[b][:t + 1]].transpose(0, 1)  # (H_kv, t + 1, D)
        values = v_exact[seqs[b][:t + 1]].transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(query.double()[:, None], keys, values,
                                                                enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[r].double(), want, rtol=2e-5, atol=2e-5)


def _paged(dtype, kv_heads, dim, pool_dtype):
    """A one-layer stand-in for KVPool (PagedBatch reads keys / values / key_scales / value_scales only)."""
    shape = (POOL_SLOTS, kv_heads, dim)
    store = torch.int8 if pool_dtype is torch.int8 else dtype
    scales = {0: torch.zeros(POOL_SLOTS, kv_heads)} if pool_dtype is torch.int8 else {}
    return SimpleNamespace(keys={0: torch.zeros(shape, dtype=store)}, values={0: torch.zeros(shape, dtype=store)},
                           key_scales=scales, value_scales={k: s.clone() for k, s in scales.items()})


def _decode_token_by_token(pool, q, k, v, slots):
    """q (H, L, D), k/v (H_kv, L, D): each token decoded alone through PagedBatch.decode_attention -> (H, L, D)."""
    outs = []
    for t in range(q.shape[1]):
        batch = PagedBatch(pool, slots[t:t + 1], None, slots[None, :t + 1], None, length=t, batch_invariant=True)
        out = batch.decode_attention(0, q[None, :, t:t + 1], k[None, :, t:t + 1], v[None, :, t:t + 1], None)
        outs.append(out[0, :, 0])
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("pool_dtype", DTYPES, ids=str)
def test_prefill_wrapper_stores_the_chunk_and_equals_decode(pool_dtype):
    """PagedBatch.prefill_attention over left-padded chunks of 5 beside a longer row (the runner's layout, the
    model's mask) stores the same pool rows and returns, at every prompt token, what decode_attention returned
    for it token by token; a decode row beside padded rows equals it alone too."""
    heads, kv_heads, dim, length = 9, 3, 64, 70
    dtype = torch.bfloat16 if pool_dtype is torch.bfloat16 else torch.float32
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, length, dim, generator=gen).to(dtype) for n in (heads, kv_heads, kv_heads))
    slots, other = _sequences([length, 120])
    decode_pool, prefill_pool = _paged(dtype, kv_heads, dim, pool_dtype), _paged(dtype, kv_heads, dim, pool_dtype)
    decoded = _decode_token_by_token(decode_pool, q, k, v, slots)
    k_other = torch.randn(kv_heads, 120, dim, generator=gen).to(dtype)
    _decode_token_by_token(prefill_pool, torch.zeros(heads, 95, dim, dtype=dtype), k_other[:, :95],
                           k_other[:, :95], other)  # the other row's context: 95 tokens already cached
    for begin in range(0, length, 5):
        out = _prefill_beside(prefill_pool, (q, k, v, slots), begin, 5, (k_other, other))
        assert torch.equal(out, decoded[:, begin:begin + 5]), begin
    for name in ("keys", "values", "key_scales", "value_scales"):
        for layer, tensor in getattr(decode_pool, name).items():
            assert torch.equal(getattr(prefill_pool, name)[layer][slots], tensor[slots]), name


def _prefill_beside(pool, prompt, begin, chunk, other_row):
    """Rows: the prompt's chunk [begin, begin+chunk) (left-padded to 5) and the other sequence's next token (at
    position 95 + begin // 5, left-padded); the runner's right-aligned context slots and the model's mask.
    -> the prompt row's outputs (H, chunk, D)."""
    q, k, v, slots = prompt
    k_other, other = other_row
    other_pos = 95 + begin // 5
    contexts = [begin + chunk, other_pos + 1]
    width = max(contexts)
    gather = torch.zeros(2, width, dtype=torch.long)
    gather[0, width - contexts[0]:] = slots[:contexts[0]]
    gather[1, width - contexts[1]:] = other[:contexts[1]]
    write_mask = torch.zeros(2, chunk, dtype=torch.bool)
    write_mask[0], write_mask[1, -1] = True, True
    valid = torch.arange(width)[None] >= (width - torch.tensor(contexts))[:, None]
    mask = build_attention_mask(valid, width - chunk, chunk, "cpu")
    batch = PagedBatch(pool, torch.cat([slots[begin:begin + chunk], other[other_pos:other_pos + 1]]), write_mask,
                       gather, None, length=width - chunk, batch_invariant=True)

    def rows(own, extra):  # (1, n, chunk, D): the prompt row's chunk, then the other row left-padded
        padded = torch.zeros_like(own[:, begin:begin + chunk])
        padded[:, -1] = extra
        return torch.stack([own[:, begin:begin + chunk], padded])

    q_extra = torch.randn(q.shape[0], q.shape[2]).to(q.dtype)
    out = batch.prefill_attention(0, rows(q, q_extra), rows(k, k_other[:, other_pos]), rows(v, k_other[:, other_pos]),
                                  mask)
    return out[0]


def test_fast_paths_are_unchanged_without_invariance():
    pool = _paged(torch.float32, 2, 32, torch.float32)
    slots = torch.arange(64, 80)
    batch = PagedBatch(pool, slots[-1:], None, slots[None], None, length=15, attention_kernel=True)
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 1, 32)
    assert batch.prefill_attention(0, q, k, k, None) is None  # the caller keeps SDPA
    out = batch.decode_attention(0, q, k, k, None)
    want = torch.ops.tinylm.paged_attention(q[:, :, 0].contiguous(), pool.keys[0], pool.values[0], slots[None],
                                            None, 32 ** -0.5)
    assert torch.equal(out[:, :, 0], want)


def test_bad_ranges_raise_instead_of_reading_out_of_bounds():
    pool = torch.randn(64, 2, 32)
    q, slots = torch.randn(1, 4, 32), torch.tensor([[3, 4, 5]])
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="not a range"):
        torch.ops.tinylm.invariant_attention(q, pool, pool, slots, one, one, one + 4, 1.0)
    with pytest.raises(RuntimeError, match="not a row"):
        torch.ops.tinylm.invariant_attention(q, pool, pool, slots, one + 1, one, one + 3, 1.0)
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.tinylm.invariant_attention(q, pool, pool, torch.tensor([[3, 64]]), one, one, one + 2, 1.0)
    empty = torch.ops.tinylm.invariant_attention(q, pool, pool, slots, one, one + 1, one + 1, 1.0)
    assert torch.equal(empty, torch.zeros_like(q))  # no keys (a padding query): zeros, never NaN


def test_traces_under_torch_compile():
    """The fake registration gives compiled graphs the output's shape (the engine's compiled steps call it)."""
    pool = torch.randn(128, 2, 32)
    slots = torch.arange(64, 84).view(2, 10)
    rows, starts, ends = torch.tensor([0, 1]), torch.tensor([0, 3]), torch.tensor([10, 10])

    def attend(q):
        return torch.ops.tinylm.invariant_attention(q * 1.0, pool, pool, slots, rows, starts, ends, 0.5)

    q = torch.randn(2, 4, 32)
    assert torch.equal(torch.compile(attend, backend="aot_eager", fullgraph=True)(q), attend(q))
