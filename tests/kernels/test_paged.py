"""Paged KIVI decode attention: the page layout and reference on the CPU; the CUDA kernel against it on a GPU."""

import pytest
import torch

from lowbit.kernels.kivi_paged import PagedKivi, dequantized_paged_kv, paged_decode_attention_ref, paged_from_parts
from lowbit.kernels.reference import decode_attention_ref
from lowbit.kv.kivi import KiviLayer


def _layer(b, hkv, prefill, steps, bits, sinks=0, residual=128, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    layer = KiviLayer(bits=bits, group=32, residual=residual, sinks=sinks, storage_dtype=dtype)

    def rnd(t):
        return (torch.randn(b, hkv, t, 128, generator=g) * 1.5 + 0.3).to(device=device, dtype=dtype)

    layer.update(rnd(prefill), rnd(prefill))
    for _ in range(steps):
        layer.update(rnd(1), rnd(1))
    return layer


@pytest.mark.parametrize("bits,prefill,steps,sinks", [(2, 300, 5, 0), (4, 128, 130, 4), (2, 700, 0, 2), (4, 40, 3, 0)])
def test_paged_reference_equals_contiguous_reference(bits, prefill, steps, sinks):
    layer = _layer(2, 2, prefill, steps, bits, sinks)
    parts = layer.parts()
    paged = paged_from_parts(parts)
    q = torch.randn(2, 8, 1, 128, generator=torch.Generator().manual_seed(1))
    want = decode_attention_ref(q, parts).transpose(1, 2)
    got = paged_decode_attention_ref(q, paged)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    k, _ = dequantized_paged_kv(paged, 128)
    assert k.shape[-2] == parts.total


def test_block_table_reference_reads_the_table():
    layer = _layer(2, 2, 600, 0, 2)
    paged = paged_from_parts(layer.parts())
    b, pages, h, nbytes = paged.pool.shape
    perm = torch.randperm(b * pages, generator=torch.Generator().manual_seed(3))
    pool = torch.empty(b * pages, h, nbytes, dtype=torch.uint8)
    pool[perm] = paged.pool.reshape(b * pages, h, nbytes)
    tabled = PagedKivi(**{**paged.__dict__, "pool": pool, "table": perm.view(b, pages).int()})
    q = torch.randn(2, 8, 1, 128)
    torch.testing.assert_close(paged_decode_attention_ref(q, tabled), paged_decode_attention_ref(q, paged))


def _cuda_kernel_ok():
    if not torch.cuda.is_available():
        return False
    from lowbit.kernels.cuda_build import available

    return available("kivi_paged")


gpu = pytest.mark.skipif(not _cuda_kernel_ok(), reason="needs CUDA and nvcc (paged KIVI kernel)")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fold", "dequant"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefill,steps,sinks,hq,nq", [
    (4096 + 77, 3, 0, 32, 1), (1000, 130, 4, 32, 1), (300, 0, 0, 8, 2), (129, 1, 0, 32, 2), (5000, 200, 3, 16, 1),
    (60, 5, 0, 32, 1),
])
def test_paged_kernel_matches_reference(variant, bits, dtype, prefill, steps, sinks, hq, nq):
    from lowbit.kernels.kivi_paged import paged_decode_attention

    hkv = 8 if hq >= 8 else hq
    layer = _layer(3, hkv, prefill, steps, bits, sinks, dtype=dtype, device="cuda", seed=prefill + steps)
    paged = paged_from_parts(layer.parts())
    q = torch.randn(3, hq, nq, 128, device="cuda", dtype=dtype)
    start = torch.tensor([0, 5, min(200, layer.get_seq_length() - nq)], device="cuda", dtype=torch.int32)
    for st in (None, start):
        want = paged_decode_attention_ref(q, paged, start=st)
        out = torch.full((3, nq, hq, 128), float("nan"), device="cuda", dtype=dtype)  # poisoned: every element written
        got = paged_decode_attention(q, paged, start=st, out=out, variant=variant)
        torch.cuda.synchronize()
        assert torch.isfinite(got).all()
        assert _rel(got, want) < 2e-3


@gpu
@pytest.mark.gpu
def test_paged_kernel_refuses_too_many_rows():
    from lowbit.kernels.kivi_paged import paged_decode_attention, supported

    layer = _layer(1, 8, 300, 0, 2, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(1, 64, 2, 128, device="cuda", dtype=torch.bfloat16)  # 8 query heads per KV head x 2 tokens = 16 rows
    assert not supported(q, 2, 128, 32, 8)
    with pytest.raises(ValueError, match="rows"):
        paged_decode_attention(q, paged_from_parts(layer.parts()))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [1, 3, 17])
def test_paged_kernel_block_table_and_slices(chunk):
    from lowbit.kernels.kivi_paged import paged_decode_attention

    layer = _layer(2, 8, 3000, 40, 2, dtype=torch.bfloat16, device="cuda", seed=chunk)
    parts = layer.parts()
    parts = type(parts)(**{**parts.__dict__, "n_qk": parts.n_qk - 1,
                           "res_k": torch.cat([layer.full_keys()[:, :, parts.n_sink + parts.n_qk - 1: parts.n_sink + parts.n_qk], parts.res_k], dim=2)})
    paged = paged_from_parts(parts)
    b, pages, h, nbytes = paged.pool.shape
    perm = torch.randperm(b * pages, device="cuda")
    pool = torch.empty(b * pages + 5, h, nbytes, dtype=torch.uint8, device="cuda")
    pool[perm] = paged.pool.reshape(b * pages, h, nbytes)
    tabled = PagedKivi(**{**paged.__dict__, "pool": pool, "table": perm.view(b, pages).int()})
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    want = paged_decode_attention_ref(q, paged)
    assert _rel(paged_decode_attention(q, tabled, chunk=chunk), want) < 2e-3


@pytest.mark.parametrize("batch_heads,pages,sms,chunk", [(64, 256, 132, None), (8, 256, 132, None), (256, 256, 132, None),
                                                        (8, 1024, 132, None), (3, 7, 132, None), (5, 37, 4, None),
                                                        (6, 10, 132, 1), (6, 10, 132, 3), (6, 10, 132, 17), (2, 5, 1, 64)])
def test_split_plan_covers_every_page_once(batch_heads, pages, sms, chunk):
    """The page programs' slices, cut per (sequence x head) as the kernel cuts them, cover every page exactly once;
    each (sequence x head) gets its partials in program order within its `parts` slots (the tail's follows)."""
    from lowbit.kernels.kivi_paged import plan_split

    plan = plan_split(batch_heads, pages, sms, chunk=chunk)
    seen = {}
    for c in range(plan.chunks):
        v0, v1 = c * plan.chunk, min((c + 1) * plan.chunk, batch_heads * pages)
        assert v1 > v0
        bh = v0 // pages
        while bh * pages < v1:
            lo, hi = max(v0, bh * pages) - bh * pages, min(v1, (bh + 1) * pages) - bh * pages
            slot = c - bh * pages // plan.chunk
            seen.setdefault(bh, []).append((slot, lo, hi))
            bh += 1
    for bh in range(batch_heads):
        segs = seen[bh]
        assert [s for s, _, _ in segs] == list(range(plan.partials(bh)))
        assert plan.partials(bh) <= plan.parts
        covered = [p for _, lo, hi in segs for p in range(lo, hi)]
        assert covered == list(range(pages))
    if chunk is None:
        assert plan.chunks <= 4 * sms and (plan.chunk >= 4 or plan.chunks == 1)


def test_split_plan_shapes_and_its_experiment_knob(monkeypatch):
    """One wave of 4 slices per SM, at least 4 pages each: B8/32K (64 x 256 pages, 132 SMs) in 512 slices of 32;
    B32/32K in 525 of 125; a small cache in fewer slices; nothing to split without pages; the env override."""
    from lowbit.kernels import kivi_paged

    p = kivi_paged.plan_split(64, 256, 132)
    assert (p.chunk, p.chunks, p.parts) == (32, 512, 9)
    assert (kivi_paged.plan_split(256, 256, 132).chunk, kivi_paged.plan_split(256, 256, 132).chunks) == (125, 525)
    assert kivi_paged.plan_split(8, 20, 132).chunks == 40  # 160 pages, at least 4 each
    assert kivi_paged.plan_split(8, 0, 132).chunks == 0
    assert kivi_paged.plan_split(64, 256, 132, 3, 4).chunks == 391  # 396 slots: 41.4 -> 42 pages
    assert _env_knob(monkeypatch, kivi_paged._split_model, "LOWBIT_PAGED_SPLIT", "3,2", "four") == ((3, 2), (4, 4))


def _env_knob(monkeypatch, read, name, good, bad):
    """(what the cached reader `read` gives with $name=good, with $name unset); $name=bad must raise naming it."""
    read.cache_clear()
    monkeypatch.setenv(name, good)
    got = read()
    read.cache_clear()
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=name):
        read()
    read.cache_clear()
    monkeypatch.delenv(name)
    default = read()
    read.cache_clear()
    return got, default


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("chunk", [None, 1, 3, 17, 400])
def test_slices_across_sequences_match_reference_on_repeated_calls(bits, chunk):
    # slices that cut across sequences and heads (several partials per program), left padding, repeated calls
    from lowbit.kernels import kivi_paged

    layer = _layer(3, 8, 2000, 45, bits, 2, dtype=torch.float16, device="cuda", seed=chunk or 0)
    paged = paged_from_parts(layer.parts())
    q = torch.randn(3, 32, 1, 128, device="cuda", dtype=torch.float16)
    start = torch.tensor([0, 7, 300], device="cuda", dtype=torch.int32)
    want = paged_decode_attention_ref(q, paged, start=start)
    for _ in range(3):
        out = torch.full((3, 1, 32, 128), float("nan"), device="cuda", dtype=torch.float16)
        got = kivi_paged.paged_decode_attention(q, paged, start=start, chunk=chunk, out=out)
        torch.cuda.synchronize()
        assert torch.isfinite(got).all() and _rel(got, want) < 2e-3


def test_residual_rows_are_passed_16_byte_aligned():
    # the kernel copies sink and residual rows 16 bytes at a time (cp.async): odd views are copied, aligned ones not
    from lowbit.kernels.kivi_paged import _rows16

    base = torch.randn(2, 8, 130, 128, dtype=torch.float16)
    aligned = base[:, :, 2:]  # row offset 2 x 128 halves: still on a 16-byte boundary
    assert _rows16(aligned) is aligned
    odd = base.flatten()[3:].unflatten(0, (-1,))[: 2 * 8 * 129 * 128].view(2, 8, 129, 128)  # 6-byte offset
    assert odd.data_ptr() % 16 != 0
    fixed = _rows16(odd)
    assert fixed.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in fixed.stride()[:-1])
    assert torch.equal(fixed, odd)
    strided = torch.randn(2, 8, 129, 132, dtype=torch.float16)[..., :128]  # row stride 132 halves: not a multiple of 8
    assert torch.equal(_rows16(strided), strided) and _rows16(strided).stride(-2) % 8 == 0
    assert _rows16(None) is None
