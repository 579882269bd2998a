"""The gate glue of the chunk kernels, one launch each way (fewer launches matter at small shapes).

Forward: the rule's gates ``[B, T, H]`` (any float dtype) become float32 ``[B * H, N * C]``, padded to whole
chunks with zeros (log-gates 0 and beta = eta = 0 leave the states unchanged), the log gates as chunk-local
cumsums; for the momentum rules also the two gate vectors every kernel needs and that take O(C^2) work per
chunk (``bMs`` and ``Gamma[C, :]``, see ``chunk.py``), once here rather than in every kernel and V tile. Backward: the chunk kernels' gate gradients (one share per K tile, ``[K tiles, B * H, N * C]``) are
summed over the tiles; for the log gates they are gradients of the chunk-local cumsums, so a reverse cumsum
inside each chunk (padded positions included: they carry the real tokens' sums) turns them into gradients
of the gates; the result goes back to ``[B, T, H]`` in each gate's dtype.
"""

import triton
import triton.language as tl

from .chunk import _lower


@triton.jit
def _chunk_cumsum(x, REVERSE: tl.constexpr):
    """Inclusive cumsum of one chunk's vector (from its end if REVERSE), as a masked sum: no cancellation."""
    C: tl.constexpr = x.shape[0]
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    keep = (c >= r) if REVERSE else (c <= r)
    return tl.sum(tl.where(keep, x[None, :], 0.0), axis=1)


@triton.jit
def _gate_in(x_ptr, out_ptr, t, rows, chunk_offset, T, C: tl.constexpr, LOG: tl.constexpr):
    """One gate of one chunk in, padded (and cumsummed if LOG), stored and returned."""
    x = tl.load(x_ptr + rows, mask=t < T, other=0.0).to(tl.float32)
    if LOG:
        x = _chunk_cumsum(x, False)
    tl.store(out_ptr + chunk_offset + tl.arange(0, C), x)
    return x


@triton.jit
def gates_forward_kernel(la_ptr, b_ptr, lm_ptr, e_ptr, gA_ptr, bo_ptr, gM_ptr, eo_ptr, bms_ptr, gc_ptr, T, H, N,
                         C: tl.constexpr, DECAY: tl.constexpr, BETA: tl.constexpr, MOMENTUM: tl.constexpr):
    """Per (chunk, batch-head): the present gates of one chunk, padded, log gates cumsummed; with momentum
    also ``bMs_t = sum_{i<t} (A_t / A_i) b_i Mu_i`` and ``Gamma[C, j] = sum_i (A_C / A_i) b_i Lm[i, j]``."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    t = i_n * C + tl.arange(0, C)
    rows = (tl.cast(i_b, tl.int64) * T + t) * H + i_h
    chunk_offset = (tl.cast(i_bh, tl.int64) * N + i_n) * C
    gA = tl.zeros([C], dtype=tl.float32)
    b = tl.full([C], 1.0, dtype=tl.float32)
    if DECAY:
        gA = _gate_in(la_ptr, gA_ptr, t, rows, chunk_offset, T, C, True)
    if BETA:
        b = _gate_in(b_ptr, bo_ptr, t, rows, chunk_offset, T, C, False)
    if MOMENTUM:
        gM = _gate_in(lm_ptr, gM_ptr, t, rows, chunk_offset, T, C, True)
        _gate_in(e_ptr, eo_ptr, t, rows, chunk_offset, T, C, False)
        bMs = tl.sum(_lower(gA, True) * (b * tl.exp(gM))[None, :], axis=1)
        gA_C = tl.sum(tl.where(tl.arange(0, C) == C - 1, gA, 0.0), axis=0)
        gamma_C = tl.sum((b * tl.exp(gA_C - gA))[:, None] * _lower(gM, False), axis=0)
        tl.store(bms_ptr + chunk_offset + tl.arange(0, C), bMs)
        tl.store(gc_ptr + chunk_offset + tl.arange(0, C), gamma_C)


@triton.jit
def _gate_out(d_ptr, out_ptr, t, rows, chunk_offset, tile_stride, K_TILES, T, C: tl.constexpr, LOG: tl.constexpr):
    d = tl.zeros([C], dtype=tl.float32)
    for i_k in range(K_TILES):
        d += tl.load(d_ptr + i_k * tile_stride + chunk_offset + tl.arange(0, C))
    if LOG:
        d = _chunk_cumsum(d, True)
    tl.store(out_ptr + rows, d.to(out_ptr.dtype.element_ty), mask=t < T)


@triton.jit
def gates_backward_kernel(dgA_ptr, db_ptr, dgM_ptr, de_ptr, dla_ptr, dbo_ptr, dlm_ptr, deo_ptr,
                          T, H, N, K_TILES, C: tl.constexpr,
                          DECAY: tl.constexpr, BETA: tl.constexpr, MOMENTUM: tl.constexpr):
    """Per (chunk, batch-head): the K tiles' shares summed, log gates reverse-cumsummed, back to [B, T, H]."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    t = i_n * C + tl.arange(0, C)
    rows = (tl.cast(i_b, tl.int64) * T + t) * H + i_h
    chunk_offset = (tl.cast(i_bh, tl.int64) * N + i_n) * C
    tile_stride = tl.cast(tl.num_programs(1), tl.int64) * N * C
    if DECAY:
        _gate_out(dgA_ptr, dla_ptr, t, rows, chunk_offset, tile_stride, K_TILES, T, C, True)
    if BETA:
        _gate_out(db_ptr, dbo_ptr, t, rows, chunk_offset, tile_stride, K_TILES, T, C, False)
    if MOMENTUM:
        _gate_out(dgM_ptr, dlm_ptr, t, rows, chunk_offset, tile_stride, K_TILES, T, C, True)
        _gate_out(de_ptr, deo_ptr, t, rows, chunk_offset, tile_stride, K_TILES, T, C, False)
