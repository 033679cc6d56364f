"""Attention over the paged KV cache on GPU: Triton kernels that read K/V through each
sequence's block table where they lie (no gather, no padding, no mask): one for the
step's decodes (below), one for all its prefill chunks at once (`prefill_attention`).

    k_cache, v_cache: [N, S, Hkv, D]   (one layer's halves of the [2, N, S, Hkv, D] cache)
    block_tables:     [B, W] int32     (block ids of each sequence; only the first
                                        ceil(len / S) entries of a row are read)
    lens:             [B]              (context length of each sequence, this token included)
    q:                [B, H, D]        (any row and head strides; D contiguous)
    out:              [B, H*D]

One program per (sequence, KV head, split) handles the whole query group of that KV
head (GQA: K/V are read once per group, the group's queries form the rows of a
tensor-core dot), walking its share of the context in tiles of whole blocks with an
online softmax. The context is split into `num_splits` parts ("flash decoding") so small
batches still fill the GPU; a second small kernel merges the parts by their
log-sum-exp. The split count depends only on the batch and head counts, never on the
lengths, so a CUDA graph captured for a batch size stays valid for any context.

Knows nothing of requests or scheduling. `TRITON_INTERPRET=1` runs the same kernels on
CPU tensors (numpy), which is how CI checks them without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton ships with torch's CUDA wheels; the CPU wheels lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

TILE_TOKENS = 64  # context tokens per loop iteration (a multiple of the block size)
MAX_SPLITS = 16


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(k_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
    """Whether the kernel runs for this cache and these shapes (on CUDA, or anywhere when
    Triton interprets)."""
    if triton is None or not (k_cache.is_cuda or interpreted()):
        return False
    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return (pow2 and num_heads % num_kv_heads == 0 and k_cache.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and TILE_TOKENS % block_size == 0)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Context splits per (sequence, KV head): about enough programs for two waves of the
    GPU's multiprocessors, rounded down to a power of two, at most MAX_SPLITS."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    want = -(-2 * sms // max(1, batch * num_kv_heads))
    # NOTE: a power of two: the split count is a compile-time constant, and free values made
    # eager steps of new batch sizes compile new variants mid-serving (seen on an H200 as a
    # c=256 run at 6.3k tok/s where a warm one ran 9.6k); powers of two are five variants,
    # all compiled when the CUDA graphs are captured.
    return 1 << (min(MAX_SPLITS, max(1, want)).bit_length() - 1)


if triton is not None:

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


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lens: torch.Tensor, scale: float, out: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """q: [B, H, D]; k_cache, v_cache: [N, S, Hkv, D]; block_tables: [B, W]; lens: [B];
    out: [B, H*D] (written, and returned). Every sequence must have lens >= 1."""
    b, h, d = q.shape
    _, block_s, hkv, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(1) == 1
    assert out.shape == (b, h * d) and block_tables.shape[0] >= b and lens.shape[0] >= b
    if b == 0:
        return out
    group = h // hkv
    splits = splits or num_splits(b, hkv, q.device)
    precision = "ieee" if q.dtype == torch.float32 else None  # float32: exact products, not tf32
    # NOTE: Triton's interpreter (3.9) returns garbage from tl.dot on bfloat16 operands; it
    # runs the 16-bit kernels with the operands upcast (the GPU uses its bf16 tensor cores).
    upcast = interpreted() and q.dtype != torch.float32
    if splits > 1:
        mid_o = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused
    _decode_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, block_tables, lens, out, mid_o, mid_lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, BLOCK_S=block_s,
        TILE=TILE_TOKENS, SPLITS=splits, PRECISION="ieee" if upcast else precision,
        UPCAST=upcast, num_warps=4, num_stages=2,
    )
    if splits > 1:
        _merge_kernel[(b, h)](mid_o, mid_lse, out, out.stride(0), H=h, D=d, SPLITS=splits,
                              SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4)
    return out


PREFILL_TILE = 64  # queries and keys per tile of the prefill kernel


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      meta: torch.Tensor, max_q_len: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of every prefill chunk of a step in one launch, over K/V in the
    paged cache (the chunk's own K/V already written there).

    q: [T, H, D] (the step's rows; any row and head strides); block_tables: [P, W] int32,
    one row per chunk; meta: [3, P] int32 (each chunk's first row in q, its query count,
    its context length after this step); out: [T, H*D], only the chunks' rows written.
    Chunk query i sits at position ctx - q_len + i and sees keys 0..that position."""
    _, h, d = q.shape
    _, block_s, hkv, _ = k_cache.shape
    p = meta.shape[1]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(1) == 1
    assert meta.is_contiguous() and block_tables.shape[0] == p
    if p == 0 or max_q_len == 0:
        return out
    upcast = interpreted() and q.dtype != torch.float32
    precision = "ieee" if q.dtype == torch.float32 or upcast else None
    grid = (p, -(-max_q_len // PREFILL_TILE), h)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, meta, out, scale, p,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        GROUP=h // hkv, D=d, BLOCK_S=block_s, BM=PREFILL_TILE, BN=PREFILL_TILE, PRECISION=precision,
        UPCAST=upcast, num_warps=4, num_stages=2,
    )
    return out
