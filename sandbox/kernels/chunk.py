"""Triton kernels of the chunkwise form (rules.md section 2), forward and backward, one family for all rules.

Seven kernels; ``tl.constexpr`` switches select the rule: ``DECAY`` (has log_alpha), ``BETA`` (has beta),
``DELTA`` (probe key ``p = alpha * k``, else ``p = 0``), ``MOMENTUM`` (has log_mu and eta, carries M).
Missing gates mean alpha = 1, beta = 1, no M, eta = 1.

Per chunk of ``C`` tokens, with ``A_t = exp(gA_t)``, ``Mu_t = exp(gM_t)`` from chunk-local cumsums of the
log gates (PyTorch glue), ``La[t, i] = A_t / A_i`` (i <= t), ``Las`` its strictly lower part and
``Lm[i, j] = Mu_i / Mu_j`` (j <= i), every one built as ``exp`` of a masked, non-positive exponent:

    Gs    = Las diag(b) Lm           Gamma = Gs + diag(b) Lm          (= La diag(b) Lm)
    bMs_t = sum_i Las[t, i] b_i Mu_i bM    = bMs + b * Mu
    KK    = diag(e) K
    Amat  = Gs o (K KK^T)            Tm    = (I + Amat)^-1             (strictly lower Amat)
    U     = Tm (V - diag(A) K S0 + diag(bMs) K M0)                   (U = V without DELTA)
    O     = scale (diag(A) Q S0 - diag(bM) Q M0 + (Gamma o Q KK^T) U)
    S_C   = A_C S0 - bM_C M0 + (diag(Gamma[C, :]) KK)^T U
    M_C   = Mu_C M0 - (diag(Lm[C, :]) KK)^T U

This is rules.md's form with the probe folded in: ``a_t Gamma[t-1, j] = Gs[t, j]``, ``A_{t-1} a_t = A_t``,
``a_t bM_{t-1} = bMs_t``, so no shifted matrices are needed.

Kernels: ``prepare`` (per chunk: ``Tm`` by forward substitution), ``forward_scan`` (per batch-head and
V tile: walks the chunks carrying S, M; writes U and the per-chunk start states), ``forward_output`` (per
chunk and V tile, in parallel: O from the start states, U and the chunk's own ``Gamma o Q KK^T``),
``backward_intra`` (per chunk: the intra-chunk term ``W^T dO'`` of dU, and dW), ``backward_scan`` (walks the
chunks backwards carrying dS, dM; adds the state terms to dU, writes dR = dV and the per-chunk end-state
gradients), ``backward_matrices`` (per chunk, all of K: the C x C products P = dW o Gamma and
Qm = dAmat o Gs, and the gate gradients through the C x C matrices) and ``backward_chunk`` (per chunk and
K tile: dq, dk and the gate gradients through the vectors, which ``gates.py`` chains). Only the hand-over of
the states is sequential: nothing of O(C^2 K) or O(C^3) work per chunk runs in the scans, and the scans
take Q and K as loaded, the gates scaling rows of the C x V side. Between the kernels Tm, dR, P and Qm are
float32; U, the per-chunk start states and their gradients are bfloat16 for bfloat16 inputs with head sizes
up to 128 (read back as bf16 tensor-core operands, gates applied after the product) and float32 otherwise.
The backward never transposes a ``tl.dot`` result before feeding it to another ``tl.dot`` (Triton 3.4-3.7.0
miscompiles that on Hopper): every transposed product is computed from loaded operands or from matrices
built transposed or read transposed from memory.
"""

import triton
import triton.language as tl


@triton.jit
def _lower(g, STRICT: tl.constexpr):
    """``L[r, c] = exp(g_r - g_c)`` for c <= r (c < r if STRICT), else 0; masked before exp."""
    C: tl.constexpr = g.shape[0]
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    keep = (c < r) if STRICT else (c <= r)
    return tl.exp(tl.where(keep, g[:, None] - g[None, :], float("-inf")))


@triton.jit
def _upper(g, STRICT: tl.constexpr):
    """The transpose of ``_lower(g)``, built directly: ``LT[r, c] = exp(g_c - g_r)`` for r <= c."""
    C: tl.constexpr = g.shape[0]
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    keep = (r < c) if STRICT else (r <= c)
    return tl.exp(tl.where(keep, g[None, :] - g[:, None], float("-inf")))


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """``a @ b`` with float32 sums: two half operands of one dtype go to the tensor cores as they are (exact
    products), anything else in float32 with the precision PREC."""
    if a.dtype == b.dtype:
        if a.dtype != tl.float32:
            return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, offset, C: tl.constexpr,
                DECAY: tl.constexpr, BETA: tl.constexpr, MOMENTUM: tl.constexpr):
    """Chunk-local gates (float32, padded to whole chunks by the glue): gA, b, gM, e; defaults when absent."""
    t = offset + tl.arange(0, C)
    gA = tl.load(gA_ptr + t) if DECAY else tl.zeros([C], dtype=tl.float32)
    b = tl.load(b_ptr + t) if BETA else tl.full([C], 1.0, dtype=tl.float32)
    gM = tl.load(gM_ptr + t) if MOMENTUM else tl.zeros([C], dtype=tl.float32)
    e = tl.load(e_ptr + t) if MOMENTUM else tl.full([C], 1.0, dtype=tl.float32)
    return gA, b, gM, e


@triton.jit
def _chunk_rows(i_n, i_bh, T, H, N, C: tl.constexpr):
    """Chunk ``i_n`` of batch-head ``i_bh``: its index among all chunks (for per-chunk buffers), its positions
    t, their rows in the ``[B, T, H, ...]`` layout (int64), and which rows are tokens (``t < T``, a column)."""
    t = i_n * C + tl.arange(0, C)
    rows = (tl.cast(i_bh // H, tl.int64) * T + t) * H + i_bh % H
    return tl.cast(i_bh, tl.int64) * N + i_n, t, rows, t[:, None] < T


@triton.jit
def _load_rows(ptr, rows, row_ok, cols, width):
    """The tile ``x[rows, cols]`` of a ``[B, T, H, width]`` tensor, as stored; zeros past T and past width."""
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=row_ok & (cols[None, :] < width), other=0.0)


@triton.jit
def _momentum_weights(bms_ptr, offset, b, gM):
    """Carry-in weights of M0: ``bMs = Las (b Mu)`` (for U; from the gate glue) and ``bM = bMs + b Mu`` (for
    O and S_C)."""
    C: tl.constexpr = b.shape[0]
    bMs = tl.load(bms_ptr + offset + tl.arange(0, C))
    return bMs, bMs + b * tl.exp(gM)


@triton.jit
def _intra_chunk(gA, b, gM, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """``Las, Lm, Gs, Gamma`` of one chunk (Lm is zeros without momentum)."""
    Las = _lower(gA, True)
    if MOMENTUM:
        Lm = _lower(gM, False)
        bLm = b[:, None] * Lm
        Gs = tl.dot(Las, bLm, input_precision=PREC)
        Gamma = Gs + bLm
    else:
        Lm = tl.zeros_like(Las)
        Gs = Las * b[None, :]
        Gamma = _lower(gA, False) * b[None, :]
    return Las, Lm, Gs, Gamma


@triton.jit
def _intra_chunk_transposed(gA, b, gM, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """``Las^T, Lm^T, Gs^T, Gamma^T``, built transposed (not by transposing a dot result)."""
    LasT = _upper(gA, True)
    if MOMENTUM:
        LmT = _upper(gM, False)
        bLmT = LmT * b[None, :]
        GsT = tl.dot(bLmT, LasT, input_precision=PREC)
        GammaT = GsT + bLmT
    else:
        LmT = tl.zeros_like(LasT)
        GsT = LasT * b[:, None]
        GammaT = _upper(gA, False) * b[:, None]
    return LasT, LmT, GsT, GammaT


@triton.jit
def _chunk_end(gA_ptr, b_ptr, gM_ptr, bms_ptr, gc_ptr, offset, gA, b, gM,
               DECAY: tl.constexpr, BETA: tl.constexpr, MOMENTUM: tl.constexpr):
    """End-of-chunk rows: ``Gamma[C, :]``, ``Lm[C, :]``, and the scalars ``A_C, bM_C, Mu_C``.

    The chunk's last gates are loaded as scalars (no reduction), and with momentum ``Gamma[C, :]`` and
    ``bM_C = bMs_C + b_C Mu_C`` come from the gate glue, which builds them once per chunk.
    """
    C: tl.constexpr = gA.shape[0]
    end = offset + C - 1
    if DECAY:
        gA_C = tl.load(gA_ptr + end)
        A_C = tl.exp(gA_C)
    else:
        gA_C = 0.0
        A_C = 1.0
    if MOMENTUM:
        gM_C = tl.load(gM_ptr + end)
        b_C = tl.load(b_ptr + end) if BETA else 1.0
        Mu_C = tl.exp(gM_C)
        gamma_C = tl.load(gc_ptr + offset + tl.arange(0, C))
        lm_C = tl.exp(gM_C - gM)
        bM_C = tl.load(bms_ptr + end) + b_C * Mu_C
    else:
        gamma_C = b * tl.exp(gA_C - gA)             # b_i A_C / A_i
        lm_C = tl.zeros_like(b)
        bM_C = 0.0
        Mu_C = 0.0
    return gamma_C, lm_C, A_C, bM_C, Mu_C


@triton.jit
def _merge_blocks(Amat, Td, S: tl.constexpr, N_SUB: tl.constexpr):
    """From the inverses of the S x S diagonal blocks of ``I + Amat`` (block-diagonal ``Td``) to those of its
    (N_SUB S) x (N_SUB S) diagonal blocks, by block forward substitution, all blocks at once:
    X_j = Td_jj (E_j - L_j X) for sub-blocks j = 1 .. N_SUB - 1, where L is the part of Amat inside the big
    blocks and below the small ones, and the rows of X for sub-blocks < j are already final."""
    C: tl.constexpr = Amat.shape[0]
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    eye = tl.where(r == c, 1.0, 0.0)
    below = tl.where(((r // (N_SUB * S)) == (c // (N_SUB * S))) & ((r // S) != (c // S)), Amat, 0.0)
    X = tl.where((r // S) % N_SUB == 0, Td, 0.0)
    for j in range(1, N_SUB):
        rhs = tl.where((r // S) % N_SUB == j, eye - tl.dot(below, X, input_precision="tf32x3"), 0.0)
        X += tl.dot(Td, rhs, input_precision="tf32x3")
    return X


@triton.jit
def _unit_lower_inverse(Amat):
    """``(I + Amat)^-1`` for a strictly lower ``Amat``, by forward substitution in exact float32 products.

    First the 4 x 4 diagonal blocks, all at once, one row of each per step (row i of a block is
    e_i - sum_{j<i} Amat[i, j] X[j, :], with its rows j < i already final); then block forward substitution
    merges them into 16 x 16 blocks and those into the whole chunk (``_merge_blocks``): 15 dependent products
    for C = 64, where row-by-row substitution on 16 x 16 blocks took 21. Every step is a ``tl.dot`` with
    masked operands (tf32x3: float32 accuracy on tensor cores), so the serial chain has no cross-thread
    reductions. (Power-series forms such as (I - A)(I + A^2)(I + A^4)... need fewer steps but lose accuracy
    when keys repeat: 4.5e-3 in float32 for a repeated key at beta near 2.)
    """
    C: tl.constexpr = Amat.shape[0]
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    diagonal_blocks = tl.where((r // 4) == (c // 4), Amat, 0.0)
    X = tl.where(r == c, 1.0, 0.0)
    for i in range(1, 4):
        X -= tl.dot(tl.where(r % 4 == i, diagonal_blocks, 0.0), X, input_precision="tf32x3")
    X = _merge_blocks(Amat, X, 4, 4)
    if C == 32:
        X = _merge_blocks(Amat, X, 16, 2)
    if C == 64:
        X = _merge_blocks(Amat, X, 16, 4)
    return X


@triton.jit
def prepare_kernel(k_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, tm_ptr, T, H, K, N,
                   C: tl.constexpr, BK: tl.constexpr, DECAY: tl.constexpr, BETA: tl.constexpr,
                   MOMENTUM: tl.constexpr):
    """Per (chunk, batch-head): ``Tm = (I + Amat)^-1`` (float32-accurate products)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    chunk, t, rows, row_ok = _chunk_rows(i_n, i_bh, T, H, N, C)
    k = _load_rows(k_ptr, rows, row_ok, tl.arange(0, BK), K)
    gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk * C, C, DECAY, BETA, MOMENTUM)
    Las, Lm, Gs, Gamma = _intra_chunk(gA, b, gM, MOMENTUM, "tf32x3")
    # K K^T in k's own dtype (exact products, float32 sums), eta on its columns after
    Amat = Gs * _dot(k, tl.trans(k), "tf32x3") * e[None, :]

    Tm = _unit_lower_inverse(Amat)
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    tl.store(tm_ptr + chunk * C * C + r * C + c, Tm)


@triton.jit
def forward_scan_kernel(k_ptr, v_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, bms_ptr, gc_ptr, tm_ptr,
                        s_init_ptr, m_init_ptr, u_ptr, s_chunks_ptr, m_chunks_ptr, s_out_ptr, m_out_ptr,
                        T, H, K, V, N,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        DECAY: tl.constexpr, BETA: tl.constexpr, DELTA: tl.constexpr, MOMENTUM: tl.constexpr,
                        HAS_INITIAL: tl.constexpr, PREC: tl.constexpr):
    """Per (V tile, batch-head): walk the chunks carrying S (and M) in float32 registers.

    Only the state hand-over is sequential: per chunk U (delta rules) and the next S, M. It writes the start
    states of every chunk and U; ``forward_output`` turns them into O, all chunks in parallel.
    """
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    state_mask = (dk[:, None] < K) & (dv[None, :] < V)
    state_offset = dk[:, None] * V + dv[None, :]
    bh_state = tl.cast(i_bh, tl.int64) * K * V
    if HAS_INITIAL:
        S = tl.load(s_init_ptr + bh_state + state_offset, mask=state_mask, other=0.0)
        M = tl.load(m_init_ptr + bh_state + state_offset, mask=state_mask, other=0.0) if MOMENTUM else S
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        M = tl.zeros([BK, BV], dtype=tl.float32)
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]

    for i_n in range(N):
        chunk, t, rows, row_ok = _chunk_rows(i_n, i_bh, T, H, N, C)
        tl.store(s_chunks_ptr + chunk * K * V + state_offset, S.to(s_chunks_ptr.dtype.element_ty), mask=state_mask)
        if MOMENTUM:
            tl.store(m_chunks_ptr + chunk * K * V + state_offset, M.to(m_chunks_ptr.dtype.element_ty),
                     mask=state_mask)
        v_mask = row_ok & (dv[None, :] < V)
        k = _load_rows(k_ptr, rows, row_ok, dk, K)
        v = _load_rows(v_ptr, rows, row_ok, dv, V).to(tl.float32)
        gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk * C, C, DECAY, BETA, MOMENTUM)
        gamma_C, lm_C, A_C, bM_C, Mu_C = _chunk_end(gA_ptr, b_ptr, gM_ptr, bms_ptr, gc_ptr, chunk * C, gA, b, gM,
                                                    DECAY, BETA, MOMENTUM)

        # The gates scale rows of the C x BV products (or of U), so every product takes K itself as operand.
        if DELTA:
            Tm = tl.load(tm_ptr + chunk * C * C + r * C + c)
            R = v - tl.exp(gA)[:, None] * _dot(k, S, PREC)
            if MOMENTUM:
                bMs, bM = _momentum_weights(bms_ptr, chunk * C, b, gM)
                R += bMs[:, None] * _dot(k, M, PREC)
            U = tl.dot(Tm, R, input_precision=PREC)
            tl.store(u_ptr + rows[:, None] * V + dv[None, :], U.to(u_ptr.dtype.element_ty), mask=v_mask)
        else:
            U = v

        S_next = A_C * S + _dot(tl.trans(k), (e * gamma_C)[:, None] * U, PREC)
        if MOMENTUM:
            S_next -= bM_C * M
            M = Mu_C * M - _dot(tl.trans(k), (e * lm_C)[:, None] * U, PREC)
        S = S_next

    tl.store(s_out_ptr + bh_state + state_offset, S, mask=state_mask)
    if MOMENTUM:
        tl.store(m_out_ptr + bh_state + state_offset, M, mask=state_mask)


@triton.jit
def forward_output_kernel(q_ptr, k_ptr, u_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, bms_ptr, s_chunks_ptr, m_chunks_ptr,
                          o_ptr,
                          scale, T, H, K, V, N,
                          C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          DECAY: tl.constexpr, BETA: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, batch-head, V tile): ``O = scale (diag(A) Q S0 - diag(bM) Q M0 + (Gamma o Q KK^T) U)``.

    ``u_ptr`` is U (float32, delta rules) or V. Q K^T is taken in the inputs' own dtype (exact products,
    float32 sums) and eta is applied to its columns afterwards.
    """
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_v = tl.program_id(2)
    chunk, t, rows, row_ok = _chunk_rows(i_n, i_bh, T, H, N, C)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    state_mask = (dk[:, None] < K) & (dv[None, :] < V)
    state_offset = chunk * K * V + dk[:, None] * V + dv[None, :]
    q = _load_rows(q_ptr, rows, row_ok, dk, K)
    k = _load_rows(k_ptr, rows, row_ok, dk, K)
    U = _load_rows(u_ptr, rows, row_ok, dv, V).to(tl.float32)
    gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk * C, C, DECAY, BETA, MOMENTUM)
    Las, Lm, Gs, Gamma = _intra_chunk(gA, b, gM, MOMENTUM, PREC)
    W = Gamma * e[None, :] * tl.dot(q, tl.trans(k), input_precision=PREC)
    S0 = tl.load(s_chunks_ptr + state_offset, mask=state_mask, other=0.0)
    # diag(A) Q S0 as diag(A) (Q S0): Q and S0 as stored (bf16 products for bf16 inputs), the gate after
    o = tl.exp(gA)[:, None] * _dot(q, S0, PREC) + tl.dot(W, U, input_precision=PREC)
    if MOMENTUM:
        M0 = tl.load(m_chunks_ptr + state_offset, mask=state_mask, other=0.0)
        bMs, bM = _momentum_weights(bms_ptr, chunk * C, b, gM)
        o -= bM[:, None] * _dot(q, M0, PREC)
    tl.store(o_ptr + rows[:, None] * V + dv[None, :], (scale * o).to(o_ptr.dtype.element_ty),
             mask=row_ok & (dv[None, :] < V))


@triton.jit
def backward_intra_kernel(q_ptr, k_ptr, u_ptr, do_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, dr_ptr, dw_ptr,
                          scale, T, H, K, V, N,
                          C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          DECAY: tl.constexpr, BETA: tl.constexpr, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, batch-head): what the backward needs of ``W = Gamma o Q KK^T`` and no state.

    Writes the intra-chunk part of dU, ``W^T dO'``, into the dR buffer (``backward_scan`` adds the state terms)
    and ``dW = dO' U^T`` (``u_ptr``: U, or V without DELTA), which ``backward_matrices`` turns into
    ``P = dW o Gamma`` (without gates this kernel does). Loops over the V tiles, so W^T is built once per
    chunk. K Q^T is taken in the inputs' own dtype (exact products, float32 sums) and eta is applied to its
    rows afterwards.
    """
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    chunk, t, rows, row_ok = _chunk_rows(i_n, i_bh, T, H, N, C)
    dk = tl.arange(0, BK)
    q = _load_rows(q_ptr, rows, row_ok, dk, K)
    k = _load_rows(k_ptr, rows, row_ok, dk, K)
    gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk * C, C, DECAY, BETA, MOMENTUM)
    LasT, LmT, GsT, GammaT = _intra_chunk_transposed(gA, b, gM, MOMENTUM, PREC)
    WT = GammaT * e[:, None] * tl.dot(k, tl.trans(q), input_precision=PREC)
    dW = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        dv = i_v * BV + tl.arange(0, BV)
        v_mask = row_ok & (dv[None, :] < V)
        do = _load_rows(do_ptr, rows, row_ok, dv, V)
        U = _load_rows(u_ptr, rows, row_ok, dv, V)
        tl.store(dr_ptr + rows[:, None] * V + dv[None, :], scale * tl.dot(WT, do.to(tl.float32), input_precision=PREC),
                 mask=v_mask)
        dW += scale * _dot(do, tl.trans(U), PREC)
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    if not (DECAY or BETA or MOMENTUM):
        # No gates (linear): Gamma is the lower triangle, so P = dW o Gamma here and no backward_matrices.
        dW = tl.where(c <= r, dW, 0.0)
    tl.store(dw_ptr + chunk * C * C + r * C + c, dW)


@triton.jit
def backward_scan_kernel(q_ptr, k_ptr, do_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, bms_ptr, gc_ptr, tm_ptr,
                         ds_final_ptr, dm_final_ptr, dr_ptr, ds_chunks_ptr, dm_chunks_ptr, ds_init_ptr, dm_init_ptr,
                         scale, T, H, K, V, N,
                         C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         DECAY: tl.constexpr, BETA: tl.constexpr, DELTA: tl.constexpr, MOMENTUM: tl.constexpr,
                         HAS_DFINAL: tl.constexpr, PREC: tl.constexpr):
    """Per (V tile, batch-head): walk the chunks backwards carrying the gradients of the chunk-end states.

    Per chunk: dU = W^T dO' + G dS - D dM (its first term already in the dR buffer, from ``backward_intra``),
    dR = Tm^T dU (= dV), and the gradients of the start states
    dS0 = (A Q)^T dO' + A_C dS - (A K)^T dR,  dM0 = -(bM Q)^T dO' - bM_C dS + Mu_C dM + (bMs K)^T dR.
    """
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    state_mask = (dk[:, None] < K) & (dv[None, :] < V)
    state_offset = dk[:, None] * V + dv[None, :]
    bh_state = tl.cast(i_bh, tl.int64) * K * V
    if HAS_DFINAL:
        dS = tl.load(ds_final_ptr + bh_state + state_offset, mask=state_mask, other=0.0)
        dM = tl.load(dm_final_ptr + bh_state + state_offset, mask=state_mask, other=0.0) if MOMENTUM else dS
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
        dM = tl.zeros([BK, BV], dtype=tl.float32)
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]

    for i_back in range(N):
        chunk, t, rows, row_ok = _chunk_rows(N - 1 - i_back, i_bh, T, H, N, C)
        tl.store(ds_chunks_ptr + chunk * K * V + state_offset, dS.to(ds_chunks_ptr.dtype.element_ty),
                 mask=state_mask)
        if MOMENTUM:
            tl.store(dm_chunks_ptr + chunk * K * V + state_offset, dM.to(dm_chunks_ptr.dtype.element_ty),
                     mask=state_mask)
        v_mask = row_ok & (dv[None, :] < V)
        q = _load_rows(q_ptr, rows, row_ok, dk, K)
        k = _load_rows(k_ptr, rows, row_ok, dk, K)
        do = scale * _load_rows(do_ptr, rows, row_ok, dv, V).to(tl.float32)
        gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk * C, C, DECAY, BETA, MOMENTUM)
        gamma_C, lm_C, A_C, bM_C, Mu_C = _chunk_end(gA_ptr, b_ptr, gM_ptr, bms_ptr, gc_ptr, chunk * C, gA, b, gM,
                                                    DECAY, BETA, MOMENTUM)
        A = tl.exp(gA)

        # As in forward_scan: the gates scale rows of the C x BV operands and products, Q and K stay as loaded.
        dU = _load_rows(dr_ptr, rows, row_ok, dv, V)
        dU += (e * gamma_C)[:, None] * _dot(k, dS, PREC)
        if MOMENTUM:
            dU -= (e * lm_C)[:, None] * _dot(k, dM, PREC)
        if DELTA:
            Tm = tl.load(tm_ptr + chunk * C * C + r * C + c)
            dR = tl.dot(tl.trans(Tm), dU, input_precision=PREC)
        else:
            dR = dU
        tl.store(dr_ptr + rows[:, None] * V + dv[None, :], dR, mask=v_mask)

        dS0 = _dot(tl.trans(q), A[:, None] * do, PREC) + A_C * dS
        if DELTA:
            dS0 -= _dot(tl.trans(k), A[:, None] * dR, PREC)
        if MOMENTUM:
            bMs, bM = _momentum_weights(bms_ptr, chunk * C, b, gM)
            dM0 = Mu_C * dM - bM_C * dS - _dot(tl.trans(q), bM[:, None] * do, PREC)
            if DELTA:
                dM0 += _dot(tl.trans(k), bMs[:, None] * dR, PREC)
            dM = dM0
        dS = dS0

    tl.store(ds_init_ptr + bh_state + state_offset, dS, mask=state_mask)
    if MOMENTUM:
        tl.store(dm_init_ptr + bh_state + state_offset, dM, mask=state_mask)


@triton.jit
def _gate_chain(dGamma, dGs, dLm, dA, dbM, dbMs, dMu, gA, b, gM, MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """From gradients of the intra-chunk matrices and weights to those of the chunk-local cumulative gates.

    In: d(Gamma), d(Gs) (the delta rule's part, through Amat = Gs o K KK^T), d(Lm) and the vectors d(A_t),
    d(bM_t), d(bMs_t), d(Mu_t). Out: ``(dgA, db, dgM)``. The map is linear, so its callers split the inputs:
    ``backward_matrices`` passes the C x C products, ``gates_backward_kernel`` the K-tile sums of the vector
    gradients of ``backward_chunk``, and the two results add up.
    """
    Las = _lower(gA, True)
    if MOMENTUM:
        Lm = _lower(gM, False)
        Mu = tl.exp(gM)
        # Gamma = Gs + diag(b) Lm
        dGs += dGamma
        db = tl.sum(dGamma * Lm, axis=1)
        dLm += b[:, None] * dGamma
        # Gs = Las (diag(b) Lm)
        dLas = tl.dot(dGs, _upper(gM, False) * b[None, :], input_precision=PREC)
        dY = tl.dot(_upper(gA, True), dGs, input_precision=PREC)
        db += tl.sum(dY * Lm, axis=1)
        dLm += b[:, None] * dY
        # bM = bMs + b Mu,  bMs = Las (b Mu)
        dbMs += dbM
        db += dbM * Mu
        dMu += dbM * b
        dLas += dbMs[:, None] * (b * Mu)[None, :]
        through_las = tl.sum(Las * dbMs[:, None], axis=0)
        db += Mu * through_las
        dMu += b * through_las
        Fm = dLm * Lm
        dgM = tl.sum(Fm, axis=1) - tl.sum(Fm, axis=0) + dMu * Mu
    else:
        # Gamma = (Las + I) diag(b), Gs = Las diag(b)
        C: tl.constexpr = gA.shape[0]
        r = tl.arange(0, C)[:, None]
        c = tl.arange(0, C)[None, :]
        db = tl.sum(tl.where(r == c, dGamma, 0.0), axis=0)
        dGs += tl.where(c < r, dGamma, 0.0)
        dLas = dGs * b[None, :]
        db += tl.sum(dGs * Las, axis=0)
        dgM = tl.zeros_like(gA)
    E = dLas * Las
    dgA = tl.sum(E, axis=1) - tl.sum(E, axis=0) + dA * tl.exp(gA)
    return dgA, db, dgM


@triton.jit
def backward_matrices_kernel(q_ptr, k_ptr, u_ptr, dr_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, dw_ptr, qm_ptr, mat_ptr,
                             T, H, K, V, N,
                             C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             DECAY: tl.constexpr, BETA: tl.constexpr, DELTA: tl.constexpr,
                             MOMENTUM: tl.constexpr, PREC: tl.constexpr):
    """Per (chunk, batch-head), all of K at once: the C x C side of the backward, once per chunk.

    Turns dW (``backward_intra``) into ``P = dW o Gamma`` in place and, for the delta rules, builds
    ``dAmat = -dR U^T`` (a pass over V) and ``Qm = dAmat o Gs``; ``backward_chunk`` needs only P and Qm (and
    their transposes, read transposed from memory) for the intra-chunk parts of dq and dk. Here, with all of
    K, the gradients d(Gamma) = dW o (Q KK^T) and d(Gs) = dAmat o (K KK^T) go down the gate chain to this
    chunk's matrix share of the gate gradients (``mat_ptr``: dgA, db, dgM, de planes), and eta's share
    through dKK (sum_k K o dKK, with dKK = P^T Q + Qm^T K). Q K^T and K K^T are taken in the inputs' own
    dtype (exact products, float32 sums), eta applied to their columns after.
    """
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    chunk, t, rows, row_ok = _chunk_rows(i_n, i_bh, T, H, N, C)
    dk = tl.arange(0, BK)
    q = _load_rows(q_ptr, rows, row_ok, dk, K)
    k = _load_rows(k_ptr, rows, row_ok, dk, K)
    gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk * C, C, DECAY, BETA, MOMENTUM)
    Las, Lm, Gs, Gamma = _intra_chunk(gA, b, gM, MOMENTUM, PREC)
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    cc = chunk * C * C + r * C + c

    dW = tl.load(dw_ptr + cc)
    QK = _dot(q, tl.trans(k), PREC)                     # q_t . k_j
    P = dW * Gamma
    tl.store(dw_ptr + cc, P)
    dGamma = tl.where(c <= r, dW * QK * e[None, :], 0.0)
    dGs = tl.zeros([C, C], dtype=tl.float32)
    de = tl.sum(P * QK, axis=0)                         # sum_k K o (P^T Q), eta's share (momentum only)
    if DELTA:
        dAm = tl.zeros([C, C], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            dv = i_v * BV + tl.arange(0, BV)
            dR = _load_rows(dr_ptr, rows, row_ok, dv, V)
            U = _load_rows(u_ptr, rows, row_ok, dv, V)
            dAm -= _dot(dR, tl.trans(U), PREC)
        KK = _dot(k, tl.trans(k), PREC)                 # k_t . k_j
        Qm = dAm * Gs
        tl.store(qm_ptr + cc, Qm)
        # Amat = Gs o (K KK^T)
        dGs = tl.where(c < r, dAm * KK * e[None, :], 0.0)
        de += tl.sum(Qm * KK, axis=0)                   # sum_k K o (Qm^T K)
    if DECAY or BETA or MOMENTUM:
        zeros = tl.zeros([C], dtype=tl.float32)
        dgA, db, dgM = _gate_chain(dGamma, dGs, tl.zeros([C, C], dtype=tl.float32), zeros, zeros, zeros, zeros,
                                   gA, b, gM, MOMENTUM, PREC)
        plane = tl.cast(tl.num_programs(1), tl.int64) * N * C
        gate_t = chunk * C + tl.arange(0, C)
        if DECAY:
            tl.store(mat_ptr + gate_t, dgA)
        if BETA:
            tl.store(mat_ptr + plane + gate_t, db)
        if MOMENTUM:
            tl.store(mat_ptr + 2 * plane + gate_t, dgM)
            tl.store(mat_ptr + 3 * plane + gate_t, de)


@triton.jit
def backward_chunk_kernel(q_ptr, k_ptr, u_ptr, do_ptr, gA_ptr, b_ptr, gM_ptr, e_ptr, bms_ptr, gc_ptr,
                          dr_ptr, pm_ptr, qm_ptr,
                          s_chunks_ptr, m_chunks_ptr, ds_chunks_ptr, dm_chunks_ptr,
                          dq_ptr, dk_ptr, dv_ptr, vec_ptr,
                          scale, T, H, K, V, N,
                          C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          DECAY: tl.constexpr, BETA: tl.constexpr, DELTA: tl.constexpr, MOMENTUM: tl.constexpr,
                          STORE_DV: tl.constexpr, VEC_PLANES: tl.constexpr, PREC: tl.constexpr):
    """Per (K tile and chunk, batch-head): dq, dk, and this K tile's share of the gates' vector gradients.

    ``u_ptr`` is U, or V without DELTA. With STORE_DV the first K tile also copies dV (the dR buffer,
    float32) out in v's dtype.

    Loops over V tiles accumulating the products that reduce over V: the state terms of dq and dk, and,
    multiplied by q or k and summed over this K tile, the gradients of the vectors A_t, bM_t, bMs_t,
    Gamma[C, :], Lm[C, :], eta (and of A_C, bM_C, Mu_C, kept in the last entries). The intra-chunk parts of
    dq and dk come from ``backward_matrices``' P and Qm. The vector gradients sum over K tiles and go down
    the gate chain linearly, so each K tile writes its raw share (``vec_ptr``: ``[K tiles, VEC_PLANES, B * H, N * C]``)
    and ``gates_backward_kernel`` sums and chains them. The K tiles of one chunk are neighbours in the grid
    (``program_id(0) = chunk * K tiles + K tile``), so the second reads P and Qm from L2.
    """
    k_tiles = tl.cdiv(K, BK)
    i_n = tl.program_id(0) // k_tiles
    i_k = tl.program_id(0) % k_tiles
    i_bh = tl.program_id(1)
    chunk, t, rows, row_ok = _chunk_rows(i_n, i_bh, T, H, N, C)
    dk = i_k * BK + tl.arange(0, BK)
    qk_mask = row_ok & (dk[None, :] < K)
    q = _load_rows(q_ptr, rows, row_ok, dk, K).to(tl.float32)
    k = _load_rows(k_ptr, rows, row_ok, dk, K).to(tl.float32)
    gA, b, gM, e = _load_gates(gA_ptr, b_ptr, gM_ptr, e_ptr, chunk * C, C, DECAY, BETA, MOMENTUM)
    gamma_C, lm_C, A_C, bM_C, Mu_C = _chunk_end(gA_ptr, b_ptr, gM_ptr, bms_ptr, gc_ptr, chunk * C, gA, b, gM,
                                                DECAY, BETA, MOMENTUM)
    if MOMENTUM:
        bMs, bM = _momentum_weights(bms_ptr, chunk * C, b, gM)
    else:
        bMs = tl.zeros_like(b)
        bM = tl.zeros_like(b)
    A = tl.exp(gA)

    acc_q = tl.zeros([C, BK], dtype=tl.float32)        # dq minus its intra-chunk attention part
    acc_k = tl.zeros([C, BK], dtype=tl.float32)        # dk from the state terms
    dA = tl.zeros([C], dtype=tl.float32)               # d(A_t), d(bM_t), d(bMs_t)
    dbM = tl.zeros([C], dtype=tl.float32)
    dbMs = tl.zeros([C], dtype=tl.float32)
    dgamma_C = tl.zeros([C], dtype=tl.float32)         # d(Gamma[C, :]), d(Lm[C, :])
    dlm_C = tl.zeros([C], dtype=tl.float32)
    de = tl.zeros([C], dtype=tl.float32)
    dA_C = 0.0
    dbM_C = 0.0
    dMu_C = 0.0
    state_rows = chunk * K * V + dk[:, None] * V
    for i_v in range(tl.cdiv(V, BV)):
        dv = i_v * BV + tl.arange(0, BV)
        v_mask = row_ok & (dv[None, :] < V)
        state_mask = (dk[:, None] < K) & (dv[None, :] < V)
        if STORE_DV:
            if i_k == 0:
                dv_rows = rows[:, None] * V + dv[None, :]
                tl.store(dv_ptr + dv_rows, tl.load(dr_ptr + dv_rows, mask=v_mask).to(dv_ptr.dtype.element_ty),
                         mask=v_mask)
        # do, U, the states and their gradients as stored: bf16 products for bf16 inputs, scale applied after
        do = _load_rows(do_ptr, rows, row_ok, dv, V)
        U = _load_rows(u_ptr, rows, row_ok, dv, V)
        S0 = tl.load(s_chunks_ptr + state_rows + dv[None, :], mask=state_mask, other=0.0)
        dSC = tl.load(ds_chunks_ptr + state_rows + dv[None, :], mask=state_mask, other=0.0)

        # Each product reducing over V serves twice: accumulated into dq or dk, and, multiplied by q or k
        # and summed over this K tile, as a gate-gradient row sum (sum_v do (Q S0) = sum_k Q (do S0^T)).
        dOS = scale * _dot(do, tl.trans(S0), PREC)
        dA += tl.sum(q * dOS, axis=1)
        acc_q += A[:, None] * dOS
        dA_C += tl.sum(dSC.to(tl.float32) * S0.to(tl.float32))
        UdS = _dot(U, tl.trans(dSC), PREC)
        r1 = tl.sum(k * UdS, axis=1)
        dgamma_C += e * r1
        de += gamma_C * r1
        acc_k += (e * gamma_C)[:, None] * UdS
        if MOMENTUM:
            M0 = tl.load(m_chunks_ptr + state_rows + dv[None, :], mask=state_mask, other=0.0)
            dMC = tl.load(dm_chunks_ptr + state_rows + dv[None, :], mask=state_mask, other=0.0)
            dOM = scale * _dot(do, tl.trans(M0), PREC)
            dbM -= tl.sum(q * dOM, axis=1)
            acc_q -= bM[:, None] * dOM
            dbM_C -= tl.sum(dSC.to(tl.float32) * M0.to(tl.float32))
            dMu_C += tl.sum(dMC.to(tl.float32) * M0.to(tl.float32))
            UdM = _dot(U, tl.trans(dMC), PREC)
            r2 = tl.sum(k * UdM, axis=1)
            dlm_C -= e * r2
            de -= lm_C * r2
            acc_k -= (e * lm_C)[:, None] * UdM
        if DELTA:
            dR = _load_rows(dr_ptr, rows, row_ok, dv, V)
            dRS = _dot(dR, tl.trans(S0), PREC)
            dA -= tl.sum(k * dRS, axis=1)
            acc_k -= A[:, None] * dRS
            if MOMENTUM:
                dRM = _dot(dR, tl.trans(M0), PREC)
                dbMs += tl.sum(k * dRM, axis=1)
                acc_k += bMs[:, None] * dRM

    # The intra-chunk parts from P = dW o Gamma and Qm = dAmat o Gs; their transposes read transposed from
    # memory (not by tl.trans of a dot result).
    r = tl.arange(0, C)[:, None]
    c = tl.arange(0, C)[None, :]
    kk = k * e[:, None]
    P = tl.load(pm_ptr + chunk * C * C + r * C + c)
    dq = acc_q + tl.dot(P, kk, input_precision=PREC)
    PT = tl.load(pm_ptr + chunk * C * C + c * C + r)
    dKK = tl.dot(PT, q, input_precision=PREC)
    dk_out = acc_k
    if DELTA:
        Qm = tl.load(qm_ptr + chunk * C * C + r * C + c)
        dk_out += tl.dot(Qm, kk, input_precision=PREC)
        QmT = tl.load(qm_ptr + chunk * C * C + c * C + r)
        dKK += tl.dot(QmT, k, input_precision=PREC)
    dk_out += e[:, None] * dKK
    tl.store(dq_ptr + rows[:, None] * K + dk[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qk_mask)
    tl.store(dk_ptr + rows[:, None] * K + dk[None, :], dk_out.to(dk_ptr.dtype.element_ty), mask=qk_mask)

    # This K tile's raw vector gradients; the chunk-end scalars' in the last entries.
    is_end = tl.arange(0, C) == C - 1
    plane = tl.cast(tl.num_programs(1), tl.int64) * N * C
    share = vec_ptr + i_k * VEC_PLANES * plane + chunk * C + tl.arange(0, C)
    if DECAY:
        tl.store(share, dA + tl.where(is_end, dA_C, 0.0))
    if DECAY or BETA or MOMENTUM:
        tl.store(share + plane, dgamma_C)
    if MOMENTUM:
        tl.store(share + 2 * plane, dbM + tl.where(is_end, dbM_C, 0.0))
        tl.store(share + 3 * plane, dbMs)
        tl.store(share + 4 * plane, dlm_C)
        tl.store(share + 5 * plane, tl.where(is_end, dMu_C, 0.0))
        tl.store(share + 6 * plane, de)
