"""The gate glue of the chunk kernels, one launch each way (fewer launches matter at small shapes).

Forward: the rule's gates ``[B, T, H]`` (any float dtype) become float32 ``[B * H, N * C]``, padded to whole
chunks with zeros (log-gates 0 and beta = eta = 0 leave the states unchanged), the log gates as chunk-local
cumsums; for the momentum rules also the two gate vectors every kernel needs and that take O(C^2) work per
chunk (``bMs`` and ``Gamma[C, :]``, see ``chunk.py``), once here rather than in every kernel and V tile.

Backward: the chunk kernels' gate gradients come in two linear shares (``chunk.py``): raw vector gradients,
one share per K tile, which are summed and sent down the gate chain here, and a matrix share from
``backward_matrices_kernel``. For the log gates the sum is a gradient of the chunk-local cumsums, so a
reverse cumsum inside each chunk (padded positions included: they carry the real tokens' sums) turns it
into gradients of the gates; the result goes back to ``[B, T, H]`` in each gate's dtype.
"""

import triton
import triton.language as tl

from .chunk import _chunk_rows, _gate_chain, _load_gates, _lower


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
    chunk, t, rows, _ = _chunk_rows(tl.program_id(0), tl.program_id(1), T, H, N, C)
    chunk_offset = chunk * C
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
def _gate_out(d, out_ptr, t, rows, T, LOG: tl.constexpr):
    """One gate's gradient of one chunk out: reverse-cumsummed if LOG, to [B, T, H] in the gate's dtype."""
    if LOG:
        d = _chunk_cumsum(d, True)
    tl.store(out_ptr + rows, d.to(out_ptr.dtype.element_ty), mask=t < T)


@triton.jit
def gates_backward_kernel(vec_ptr, mat_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, dla_ptr, dbo_ptr, dlm_ptr, deo_ptr,
                          T, H, N, K_TILES, C: tl.constexpr, VEC_PLANES: tl.constexpr,
                          DECAY: tl.constexpr, BETA: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, batch-head): the gate gradients of one chunk, from the two linear shares of ``chunk.py``.

    The K tiles' raw vector gradients (``vec_ptr``, ``[K tiles, VEC_PLANES, B * H, N * C]``: d(A_t) (with decay),
    d(Gamma[C, :]), then with momentum d(bM_t), d(bMs_t), d(Lm[C, :]), d(Mu_C), d(eta)) are summed and
    sent down the gate chain (``_gate_chain``); the matrix share from ``backward_matrices_kernel``
    (``mat_ptr``, ``[4, B * H, N * C]``: dgA, db, dgM, d(eta)) is added; log gates are reverse-cumsummed.
    """
    chunk, t, rows, _ = _chunk_rows(tl.program_id(0), tl.program_id(1), T, H, N, C)
    chunk_offset = chunk * C
    plane = tl.cast(tl.num_programs(1), tl.int64) * N * C
    dA = tl.zeros([C], dtype=tl.float32)
    dgamma_C = tl.zeros([C], dtype=tl.float32)
    dbM = tl.zeros([C], dtype=tl.float32)
    dbMs = tl.zeros([C], dtype=tl.float32)
    dlm_C = tl.zeros([C], dtype=tl.float32)
    dMu = tl.zeros([C], dtype=tl.float32)
    de = tl.zeros([C], dtype=tl.float32)
    for i_k in range(K_TILES):
        share = vec_ptr + i_k * VEC_PLANES * plane + chunk_offset + tl.arange(0, C)
        if DECAY:
            dA += tl.load(share)
        dgamma_C += tl.load(share + plane)
        if MOMENTUM:
            dbM += tl.load(share + 2 * plane)
            dbMs += tl.load(share + 3 * plane)
            dlm_C += tl.load(share + 4 * plane)
            dMu += tl.load(share + 5 * plane)
            de += tl.load(share + 6 * plane)
    gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk_offset, C, DECAY, BETA, MOMENTUM)
    last_row = tl.arange(0, C)[:, None] == C - 1
    dgA, db, dgM = _gate_chain(tl.where(last_row, dgamma_C[None, :], 0.0), tl.zeros([C, C], dtype=tl.float32),
                               tl.where(last_row, dlm_C[None, :], 0.0), dA, dbM, dbMs, dMu, gA, b, gM,
                               MOMENTUM, PREC)
    mat = mat_ptr + chunk_offset + tl.arange(0, C)
    if DECAY:
        _gate_out(dgA + tl.load(mat), dla_ptr, t, rows, T, True)
    if BETA:
        _gate_out(db + tl.load(mat + plane), dbo_ptr, t, rows, T, False)
    if MOMENTUM:
        _gate_out(dgM + tl.load(mat + 2 * plane), dlm_ptr, t, rows, T, True)
        _gate_out(de + tl.load(mat + 3 * plane), deo_ptr, t, rows, T, False)
