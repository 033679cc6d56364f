"""The Triton kernels of `paged_attention_triton` (imported only when one runs: importing
triton costs ~73 MB of RSS and ~0.2 s, which a CPU server should not pay).

See paged_attention_triton for the layouts and the algorithm.
"""

import triton
import triton.language as tl


# NOTE: the block tables' row stride varies with the longest context of an eager step;
# specialising on it (Triton does for ints divisible by 16) would compile variants mid-serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(Q, K, V, BT, LENS, OUT, MID_O, MID_LSE, scale,
                   stride_qb, stride_qh, stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
                   stride_bt, stride_ob,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                   TILE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    length = tl.load(LENS + b).to(tl.int32)
    per = tl.cdiv(tl.cdiv(length, SPLITS), TILE) * TILE  # whole tiles per split
    start = sp * per
    end = tl.minimum(start + per, length)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for t0 in range(start, end, TILE):
        offs = t0 + tl.arange(0, TILE)
        valid = offs < end
        blk = tl.load(BT + b * stride_bt + offs // BLOCK_S, mask=valid, other=0).to(tl.int64)
        within = (offs % BLOCK_S).to(tl.int64)
        k = tl.load(K + (blk * stride_kn + within * stride_ks + kvh * stride_kh)[:, None] + d[None, :],
                    mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (blk * stride_vn + within * stride_vs + kvh * stride_vh)[:, None] + d[None, :],
                    mask=valid[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(OUT + b * stride_ob + heads[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        has = l_i > 0  # an empty split (a short context) leaves lse = -inf and zeros
        out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (b * GROUP * tl.num_programs(1) + heads) * SPLITS + sp  # [B, H, SPLITS] index
        tl.store(MID_O + row[:, None] * D + d[None, :], out, mask=gmask[:, None])
        tl.store(MID_LSE + row, lse, mask=gmask)


@triton.jit
def _merge_kernel(MID_O, MID_LSE, OUT, stride_ob, H: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    row = (b * H + h) * SPLITS + s
    smask = s < SPLITS
    lse = tl.load(MID_LSE + row, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)
    o = tl.load(MID_O + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(OUT + b * stride_ob + h * D + d, out.to(OUT.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_bt", "num_chunks"])
def _prefill_kernel(Q, K, V, BT, META, OUT, scale, num_chunks,
                    stride_qt, stride_qh, stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
                    stride_bt, stride_ot,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    c = tl.program_id(0)
    mt = tl.program_id(1)
    h = tl.program_id(2)
    q_len = tl.load(META + num_chunks + c)
    if mt * BM < q_len:
        q0 = tl.load(META + c)
        ctx = tl.load(META + 2 * num_chunks + c)
        off = ctx - q_len  # tokens of context before this chunk (cached or earlier chunks)
        kvh = h // GROUP
        i = mt * BM + tl.arange(0, BM)
        im = i < q_len
        d = tl.arange(0, D)
        rows = (q0 + i).to(tl.int64)
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=im[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        end = tl.minimum(ctx, off + (mt + 1) * BM)  # keys the tile's last query sees
        for t0 in range(0, end, BN):
            j = t0 + tl.arange(0, BN)
            jm = j < end
            blk = tl.load(BT + c * stride_bt + j // BLOCK_S, mask=jm, other=0).to(tl.int64)
            within = (j % BLOCK_S).to(tl.int64)
            k = tl.load(K + (blk * stride_kn + within * stride_ks + kvh * stride_kh)[:, None] + d[None, :],
                        mask=jm[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]
            # causal: query i (position off + i) sees keys 0..off + i; key 0 is always seen,
            # so after the first tile every row's maximum is finite (no NaN from -inf - -inf)
            s = tl.where((j[None, :] <= (off + i)[:, None]) & jm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (blk * stride_vn + within * stride_vs + kvh * stride_vh)[:, None] + d[None, :],
                        mask=jm[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(OUT + rows[:, None] * stride_ot + h * D + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=im[:, None])
