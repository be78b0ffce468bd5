# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""Batch-normalization kernels on 3-D views ``x[a, c, b]``.

``cbn._layout`` turns every input into views of shape (A, C, B): ``c`` runs
over channels and (a, b) over the values that share a channel, with any
strides.  Bulk arrays are float32 or float64 (one ``cython.floating`` kernel
per operation); per-channel arrays are float64 and every sum is float64.

Two traversals, chosen from x's strides:

* row mode (NCHW-like, B is the finer axis): a channel is A rows of B values.
  A channel whose block fits in L2 is done start to finish by one thread
  (statistics, then normalize or gradient, while the block is cached): the
  data is read from memory once.  Larger channels are cut into chunks.
* column mode (NC, NHWC: C is the finer axis): rows of C channels.  Rows are
  cut into chunks whose per-channel partial results are merged afterwards.

Every cut depends on the shape only, never on the thread count, and partial
results are merged in a fixed order: the bits do not depend on the number of
threads.  Variances are two-pass within a cached block and merged with Chan's
formula, never E[x^2] - E[x]^2.  The inner loops over contiguous runs are C
(``src_c/cbn_loops_t.h``), compiled for several instruction sets.
"""
import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

cdef extern from "cbn_openmp.h":
    int omp_get_max_threads() noexcept nogil
    int CBN_OPENMP_VERSION
    const char *cbn_openmp_library() noexcept

# A channel block up to this size (all arrays it reads) stays in L2 between
# the statistics pass and the normalize/gradient pass.
cdef Py_ssize_t FUSE_BYTES = 1 << 20
# Chunks of this size stay in L2 for their second pass.
cdef Py_ssize_t CHUNK_BYTES = 1 << 18
# Below this much data a parallel region costs more than it saves.
cdef Py_ssize_t SERIAL_BYTES = 1 << 18
cdef Py_ssize_t COLUMN_ROWS = 256


# ==========================================================================
# Inner loops (src_c/cbn_loops_t.h, compiled per instruction set): one fused
# front per loop picks the float or double instance.

cdef extern from "cbn_loops.h" nogil:
    double run_sum_f "cbn_run_sum_f"(const float *x, Py_ssize_t n, Py_ssize_t s)
    double run_sum_d "cbn_run_sum_d"(const double *x, Py_ssize_t n, Py_ssize_t s)
    double run_sq_dev_f "cbn_run_sq_dev_f"(const float *x, Py_ssize_t n, Py_ssize_t s, double mu, double *dev)
    double run_sq_dev_d "cbn_run_sq_dev_d"(const double *x, Py_ssize_t n, Py_ssize_t s, double mu, double *dev)
    void run_affine_f "cbn_run_affine_f"(const float *x, Py_ssize_t sx, float *y, Py_ssize_t sy, Py_ssize_t n,
                                         double mu, double scale, double shift)
    void run_affine_d "cbn_run_affine_d"(const double *x, Py_ssize_t sx, double *y, Py_ssize_t sy, Py_ssize_t n,
                                         double mu, double scale, double shift)
    double run_grad_sums_f "cbn_run_grad_sums_f"(const float *dy, Py_ssize_t sd, const float *x, Py_ssize_t sx,
                                                 Py_ssize_t n, double mu, double *sum_dy)
    double run_grad_sums_d "cbn_run_grad_sums_d"(const double *dy, Py_ssize_t sd, const double *x, Py_ssize_t sx,
                                                 Py_ssize_t n, double mu, double *sum_dy)
    void run_grad_f "cbn_run_grad_f"(const float *dy, Py_ssize_t sd, const float *x, Py_ssize_t sx, float *dx,
                                     Py_ssize_t so, Py_ssize_t n, double mu, double k_dy, double k_xmu, double k_const)
    void run_grad_d "cbn_run_grad_d"(const double *dy, Py_ssize_t sd, const double *x, Py_ssize_t sx, double *dx,
                                     Py_ssize_t so, Py_ssize_t n, double mu, double k_dy, double k_xmu, double k_const)
    void cols_add_f "cbn_cols_add_f"(const float *x, Py_ssize_t s, double *acc, Py_ssize_t n)
    void cols_add_d "cbn_cols_add_d"(const double *x, Py_ssize_t s, double *acc, Py_ssize_t n)
    void cols_sq_dev_f "cbn_cols_sq_dev_f"(const float *x, Py_ssize_t s, const double *mu, double *acc, Py_ssize_t n)
    void cols_sq_dev_d "cbn_cols_sq_dev_d"(const double *x, Py_ssize_t s, const double *mu, double *acc, Py_ssize_t n)
    void cols_affine_f "cbn_cols_affine_f"(const float *x, Py_ssize_t sx, float *y, Py_ssize_t sy, const double *mu,
                                           const double *scale, const double *shift, Py_ssize_t n)
    void cols_affine_d "cbn_cols_affine_d"(const double *x, Py_ssize_t sx, double *y, Py_ssize_t sy, const double *mu,
                                           const double *scale, const double *shift, Py_ssize_t n)
    void cols_grad_sums_f "cbn_cols_grad_sums_f"(const float *dy, Py_ssize_t sd, const float *x, Py_ssize_t sx,
                                                 const double *mu, double *sum_dy, double *sum_dy_xmu, Py_ssize_t n)
    void cols_grad_sums_d "cbn_cols_grad_sums_d"(const double *dy, Py_ssize_t sd, const double *x, Py_ssize_t sx,
                                                 const double *mu, double *sum_dy, double *sum_dy_xmu, Py_ssize_t n)
    void cols_grad_f "cbn_cols_grad_f"(const float *dy, Py_ssize_t sd, const float *x, Py_ssize_t sx, float *dx,
                                       Py_ssize_t so, const double *mu, const double *k_dy, const double *k_xmu,
                                       const double *k_const, Py_ssize_t n)
    void cols_grad_d "cbn_cols_grad_d"(const double *dy, Py_ssize_t sd, const double *x, Py_ssize_t sx, double *dx,
                                       Py_ssize_t so, const double *mu, const double *k_dy, const double *k_xmu,
                                       const double *k_const, Py_ssize_t n)


cdef inline double run_sum(const floating *x, Py_ssize_t n, Py_ssize_t s) noexcept nogil:
    """sum(x)"""
    if floating is float:
        return run_sum_f(x, n, s)
    else:
        return run_sum_d(x, n, s)


cdef inline double run_sq_dev(const floating *x, Py_ssize_t n, Py_ssize_t s, double mu, double *dev) noexcept nogil:
    """sum((x - mu)**2); adds sum(x - mu) to dev[0]"""
    if floating is float:
        return run_sq_dev_f(x, n, s, mu, dev)
    else:
        return run_sq_dev_d(x, n, s, mu, dev)


cdef inline void run_affine(const floating *x, Py_ssize_t sx, floating *y, Py_ssize_t sy, Py_ssize_t n,
                            double mu, double scale, double shift) noexcept nogil:
    """y = (x - mu) * scale + shift"""
    if floating is float:
        run_affine_f(x, sx, y, sy, n, mu, scale, shift)
    else:
        run_affine_d(x, sx, y, sy, n, mu, scale, shift)


cdef inline double run_grad_sums(const floating *dy, Py_ssize_t sd, const floating *x, Py_ssize_t sx, Py_ssize_t n,
                                 double mu, double *sum_dy) noexcept nogil:
    """sum(dy * (x - mu)); adds sum(dy) to sum_dy[0]"""
    if floating is float:
        return run_grad_sums_f(dy, sd, x, sx, n, mu, sum_dy)
    else:
        return run_grad_sums_d(dy, sd, x, sx, n, mu, sum_dy)


cdef inline void run_grad(const floating *dy, Py_ssize_t sd, const floating *x, Py_ssize_t sx,
                          floating *dx, Py_ssize_t so, Py_ssize_t n,
                          double mu, double k_dy, double k_xmu, double k_const) noexcept nogil:
    """dx = dy * k_dy - (x - mu) * k_xmu - k_const"""
    if floating is float:
        run_grad_f(dy, sd, x, sx, dx, so, n, mu, k_dy, k_xmu, k_const)
    else:
        run_grad_d(dy, sd, x, sx, dx, so, n, mu, k_dy, k_xmu, k_const)


cdef inline void cols_add(const floating *x, Py_ssize_t s, double *acc, Py_ssize_t n) noexcept nogil:
    """acc[i] += x[i]"""
    if floating is float:
        cols_add_f(x, s, acc, n)
    else:
        cols_add_d(x, s, acc, n)


cdef inline void cols_sq_dev(const floating *x, Py_ssize_t s, const double *mu, double *acc,
                             Py_ssize_t n) noexcept nogil:
    """acc[i] += (x[i] - mu[i])**2"""
    if floating is float:
        cols_sq_dev_f(x, s, mu, acc, n)
    else:
        cols_sq_dev_d(x, s, mu, acc, n)


cdef inline void cols_affine(const floating *x, Py_ssize_t sx, floating *y, Py_ssize_t sy, const double *mu,
                             const double *scale, const double *shift, Py_ssize_t n) noexcept nogil:
    """y[i] = (x[i] - mu[i]) * scale[i] + shift[i]"""
    if floating is float:
        cols_affine_f(x, sx, y, sy, mu, scale, shift, n)
    else:
        cols_affine_d(x, sx, y, sy, mu, scale, shift, n)


cdef inline void cols_grad_sums(const floating *dy, Py_ssize_t sd, const floating *x, Py_ssize_t sx,
                                const double *mu, double *sum_dy, double *sum_dy_xmu, Py_ssize_t n) noexcept nogil:
    """sum_dy[i] += dy[i]; sum_dy_xmu[i] += dy[i] * (x[i] - mu[i])"""
    if floating is float:
        cols_grad_sums_f(dy, sd, x, sx, mu, sum_dy, sum_dy_xmu, n)
    else:
        cols_grad_sums_d(dy, sd, x, sx, mu, sum_dy, sum_dy_xmu, n)


cdef inline void cols_grad(const floating *dy, Py_ssize_t sd, const floating *x, Py_ssize_t sx,
                           floating *dx, Py_ssize_t so, const double *mu, const double *k_dy,
                           const double *k_xmu, const double *k_const, Py_ssize_t n) noexcept nogil:
    """dx[i] = dy[i] * k_dy[i] - (x[i] - mu[i]) * k_xmu[i] - k_const[i]"""
    if floating is float:
        cols_grad_f(dy, sd, x, sx, dx, so, mu, k_dy, k_xmu, k_const, n)
    else:
        cols_grad_d(dy, sd, x, sx, dx, so, mu, k_dy, k_xmu, k_const, n)


# ==========================================================================
# Views as raw pointers and element strides

cdef struct View:
    char *data                      # element [0, 0, 0]
    Py_ssize_t sa, sc, sb           # strides in elements


cdef View view_of(const floating[:, :, :] v) noexcept:
    cdef View w
    cdef Py_ssize_t size = sizeof(floating)
    w.data = <char *>&v[0, 0, 0]
    w.sa = v.strides[0] // size
    w.sc = v.strides[1] // size
    w.sb = v.strides[2] // size
    return w


cdef inline floating *at(View *w, Py_ssize_t a, Py_ssize_t c, Py_ssize_t b, floating *kind) noexcept nogil:
    """Address of element [a, c, b] (``kind`` only selects the type)."""
    return (<floating *>w.data) + a * w.sa + c * w.sc + b * w.sb


cdef inline Py_ssize_t magnitude(Py_ssize_t n) noexcept nogil:
    return -n if n < 0 else n


cdef inline bint column_mode(const floating[:, :, :] v) noexcept:
    """True when channels are v's finer axis (NC, NHWC), so rows of C are read."""
    cdef Py_ssize_t sc = v.strides[1], sb = v.strides[2]
    return v.shape[2] == 1 or (v.shape[1] > 1 and magnitude(sc) < magnitude(sb))


cdef int n_threads(Py_ssize_t nbytes, Py_ssize_t n_tasks) noexcept nogil:
    if nbytes < SERIAL_BYTES or n_tasks < 2:
        return 1
    return <int>min(<Py_ssize_t>omp_get_max_threads(), n_tasks)


cdef inline Py_ssize_t ceil_div(Py_ssize_t n, Py_ssize_t d) noexcept nogil:
    return (n + d - 1) // d


# Chunks: a grid over (A, B) per channel (row mode), or over rows r = (a, b)
# and channels (column mode).  Extents depend only on the shape.

cdef struct Grid:
    Py_ssize_t A, C, B, R           # R = A * B rows (column mode)
    Py_ssize_t ta, tb, na, nb       # row mode: tile extents and counts per channel
    Py_ssize_t tr, tc, nr, nc       # column mode


cdef Grid make_grid(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B, Py_ssize_t chunk) noexcept nogil:
    cdef Grid g
    g.A = A
    g.C = C
    g.B = B
    g.R = A * B
    g.tb = max(1, min(B, chunk))
    g.ta = max(1, min(A, chunk // g.tb))
    g.na = ceil_div(A, g.ta)
    g.nb = ceil_div(B, g.tb)
    # column mode: at least COLUMN_ROWS rows per chunk, so that the partial
    # results (one per channel and chunk) stay small next to the data
    g.tc = max(1, min(C, chunk // COLUMN_ROWS))
    g.tr = max(1, min(g.R, chunk // g.tc))
    g.nr = ceil_div(g.R, g.tr)
    g.nc = ceil_div(C, g.tc)
    return g


# Prange bodies take their bounds as a struct assigned per iteration, which
# Cython makes thread-private (a variable only written through a pointer
# would be shared between threads).

cdef struct RowTile:
    Py_ssize_t c, a0, a1, b0, b1


cdef struct ColumnChunk:
    Py_ssize_t j, r0, r1, c0, c1


cdef inline RowTile row_tile(const Grid *g, Py_ssize_t k) noexcept nogil:
    """Row-mode task k (channel-major): channel c, rows a0:a1, values b0:b1."""
    cdef RowTile t
    cdef Py_ssize_t i = k % (g.na * g.nb)
    t.c = k // (g.na * g.nb)
    t.a0 = (i // g.nb) * g.ta
    t.a1 = min(t.a0 + g.ta, g.A)
    t.b0 = (i % g.nb) * g.tb
    t.b1 = min(t.b0 + g.tb, g.B)
    return t


cdef inline ColumnChunk column_chunk(const Grid *g, Py_ssize_t k) noexcept nogil:
    """Column-mode task k (row-chunk-major): row chunk j = rows r0:r1, channels c0:c1."""
    cdef ColumnChunk t
    t.j = k // g.nc
    t.r0 = t.j * g.tr
    t.r1 = min(t.r0 + g.tr, g.R)
    t.c0 = (k % g.nc) * g.tc
    t.c1 = min(t.c0 + g.tc, g.C)
    return t


# ==========================================================================
# Statistics: per-channel mean and M2 = sum((x - mean)**2)

cdef inline void chan_merge(double *n, double *mean, double *m2, double nb, double mb, double m2b) noexcept nogil:
    """Merge (nb, mb, m2b) into (n, mean, m2) (Chan, Golub & LeVeque)."""
    cdef double total = n[0] + nb
    cdef double delta
    if nb == 0:
        return
    delta = mb - mean[0]
    mean[0] += delta * (nb / total)
    m2[0] += m2b + delta * delta * (n[0] * nb / total)
    n[0] = total


cdef void stats_channel_block(View *x, Py_ssize_t c, Py_ssize_t a0, Py_ssize_t a1, Py_ssize_t b0, Py_ssize_t b1,
                              double *mean, double *m2, floating *kind) noexcept nogil:
    """Two-pass mean and M2 of x[a0:a1, c, b0:b1] (the block is cached for pass two)."""
    cdef Py_ssize_t a
    cdef double total = 0, dev = 0, sq = 0, mu
    cdef double count = <double>((a1 - a0) * (b1 - b0))
    for a in range(a0, a1):
        total += run_sum(at(x, a, c, b0, kind), b1 - b0, x.sb)
    mu = total / count
    for a in range(a0, a1):
        sq += run_sq_dev(at(x, a, c, b0, kind), b1 - b0, x.sb, mu, &dev)
    # corrected two-pass: dev is sum(x - mu), zero but for rounding
    mean[0] = mu + dev / count
    m2[0] = max(sq - dev * dev / count, 0.0)


cdef void stats_rows(const floating[:, :, :] xv, double[::1] mean, double[::1] m2):
    """Row mode: each channel cut into (a, b) tiles, two-pass each, merged in order."""
    cdef View x = view_of(xv)
    cdef Grid g = make_grid(xv.shape[0], xv.shape[1], xv.shape[2], CHUNK_BYTES // sizeof(floating))
    cdef Py_ssize_t tiles = g.na * g.nb
    cdef double[:, ::1] part = np.empty((g.C * tiles, 3))   # count, mean, M2 per tile
    cdef RowTile tile
    cdef Py_ssize_t k, c, t
    cdef double n, mu, s2
    cdef floating *kind = NULL
    with nogil:
        for k in prange(g.C * tiles, schedule="static",
                        num_threads=n_threads(g.R * g.C * sizeof(floating), g.C * tiles)):
            tile = row_tile(&g, k)
            c = tile.c
            part[k, 0] = <double>((tile.a1 - tile.a0) * (tile.b1 - tile.b0))
            stats_channel_block(&x, c, tile.a0, tile.a1, tile.b0, tile.b1, &part[k, 1], &part[k, 2], kind)
        for c in range(g.C):
            n = 0
            mu = 0
            s2 = 0
            for t in range(c * tiles, (c + 1) * tiles):
                chan_merge(&n, &mu, &s2, part[t, 0], part[t, 1], part[t, 2])
            mean[c] = mu
            m2[c] = s2


cdef void stats_columns(const floating[:, :, :] xv, double[::1] mean, double[::1] m2):
    """Column mode: rows of channels cut into chunks, two-pass each, merged in order."""
    cdef View x = view_of(xv)
    cdef Grid g = make_grid(xv.shape[0], xv.shape[1], xv.shape[2], CHUNK_BYTES // sizeof(floating))
    cdef double[:, ::1] part_mean = np.zeros((g.nr, g.C))
    cdef double[:, ::1] part_m2 = np.zeros((g.nr, g.C))
    cdef ColumnChunk chunk
    cdef Py_ssize_t k, j, r, c
    cdef double n, mu, s2
    cdef floating *kind = NULL
    with nogil:
        for k in prange(g.nr * g.nc, schedule="static",
                        num_threads=n_threads(g.R * g.C * sizeof(floating), g.nr * g.nc)):
            chunk = column_chunk(&g, k)
            j = chunk.j
            for r in range(chunk.r0, chunk.r1):
                cols_add(at(&x, r // g.B, chunk.c0, r % g.B, kind), x.sc, &part_mean[j, chunk.c0], chunk.c1 - chunk.c0)
            for c in range(chunk.c0, chunk.c1):
                part_mean[j, c] = part_mean[j, c] / (chunk.r1 - chunk.r0)
            for r in range(chunk.r0, chunk.r1):  # the chunk is still in cache
                cols_sq_dev(at(&x, r // g.B, chunk.c0, r % g.B, kind), x.sc, &part_mean[j, chunk.c0], &part_m2[j, chunk.c0], chunk.c1 - chunk.c0)
        for c in range(g.C):
            n = 0
            mu = 0
            s2 = 0
            for j in range(g.nr):
                chan_merge(&n, &mu, &s2, <double>(min(j * g.tr + g.tr, g.R) - j * g.tr), part_mean[j, c], part_m2[j, c])
            mean[c] = mu
            m2[c] = s2


def channel_stats(const floating[:, :, :] x,   # IN  (A, C, B)
                  double[::1] mean,             # OUT (C,)
                  double[::1] m2):              # OUT (C,) sum of squared deviations
    """Per-channel mean and M2 of a view (overwrites mean and m2)."""
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    if column_mode(x):
        stats_columns(x, mean, m2)
    else:
        stats_rows(x, mean, m2)


# ==========================================================================
# Normalize: y = (x - mean) * scale + shift

cdef void affine_views(const floating[:, :, :] xv, floating[:, :, :] yv,
                       const double[::1] mean, const double[::1] scale, const double[::1] shift):
    cdef View x = view_of(xv)
    cdef View y = view_of(yv)
    cdef Grid g = make_grid(xv.shape[0], xv.shape[1], xv.shape[2], CHUNK_BYTES // sizeof(floating))
    cdef Py_ssize_t nbytes = 2 * g.R * g.C * sizeof(floating)
    cdef RowTile tile
    cdef ColumnChunk chunk
    cdef Py_ssize_t k, c, r, a
    cdef floating *kind = NULL
    cdef bint columns = column_mode(xv)
    with nogil:
        if columns:
            for k in prange(g.nr * g.nc, schedule="static", num_threads=n_threads(nbytes, g.nr * g.nc)):
                chunk = column_chunk(&g, k)
                for r in range(chunk.r0, chunk.r1):
                    cols_affine(at(&x, r // g.B, chunk.c0, r % g.B, kind), x.sc, at(&y, r // g.B, chunk.c0, r % g.B, kind), y.sc,
                                &mean[chunk.c0], &scale[chunk.c0], &shift[chunk.c0], chunk.c1 - chunk.c0)
        else:
            for k in prange(g.C * g.na * g.nb, schedule="static", num_threads=n_threads(nbytes, g.C * g.na * g.nb)):
                tile = row_tile(&g, k)
                c = tile.c
                for a in range(tile.a0, tile.a1):
                    run_affine(at(&x, a, c, tile.b0, kind), x.sb, at(&y, a, c, tile.b0, kind), y.sb, tile.b1 - tile.b0,
                               mean[c], scale[c], shift[c])


def normalize(const floating[:, :, :] x,     # IN  (A, C, B)
              floating[:, :, :] y,           # OUT (A, C, B); may be x itself
              const double[::1] mean,        # IN  (C,)
              const double[::1] scale,       # IN  (C,) gamma * invstd
              const double[::1] shift):      # IN  (C,) beta
    """y = (x - mean) * scale + shift, per channel (inference)."""
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    affine_views(x, y, mean, scale, shift)


cdef inline void finish_channel(double m2, double count, double eps, double gam,
                                double *var, double *invstd, double *scale) noexcept nogil:
    """Biased variance, 1 / sqrt(var + eps) and the normalize scale of one channel."""
    var[0] = m2 / count
    invstd[0] = 1.0 / sqrt(var[0] + eps)
    scale[0] = gam * invstd[0]


def forward_train(const floating[:, :, :] xv,   # IN  (A, C, B), A * B > 1
                  floating[:, :, :] yv,         # OUT (A, C, B); may be x itself
                  const double[::1] gamma,      # IN  (C,)
                  const double[::1] beta,       # IN  (C,)
                  double eps,
                  double[::1] mean,             # OUT (C,)
                  double[::1] var,              # OUT (C,) biased
                  double[::1] invstd):          # OUT (C,)
    """Training forward: batch statistics, then y, in as few passes as fit."""
    cdef Py_ssize_t A = xv.shape[0], C = xv.shape[1], B = xv.shape[2]
    cdef double count = <double>(A * B)
    cdef double[::1] scale
    cdef View x, y
    cdef Py_ssize_t c, a
    cdef double m2, sc
    cdef floating *kind = NULL
    if A * B * C == 0:
        return
    if column_mode(xv) or A * B * <Py_ssize_t>sizeof(floating) > FUSE_BYTES:
        # no cache reuse possible: a statistics pass, then a normalize pass
        channel_stats(xv, mean, var)
        scale = np.empty(C)
        for c in range(C):
            finish_channel(var[c], count, eps, gamma[c], &var[c], &invstd[c], &scale[c])
        affine_views(xv, yv, mean, scale, beta)
        return
    # fused: each channel's block is read from memory once, then served from L2
    x = view_of(xv)
    y = view_of(yv)
    with nogil:
        for c in prange(C, schedule="static", num_threads=n_threads(2 * A * B * C * sizeof(floating), C)):
            m2 = 0  # assigned here so that Cython makes it thread-private
            sc = 0
            stats_channel_block(&x, c, 0, A, 0, B, &mean[c], &m2, kind)
            finish_channel(m2, count, eps, gamma[c], &var[c], &invstd[c], &sc)
            for a in range(A):
                run_affine(at(&x, a, c, 0, kind), x.sb, at(&y, a, c, 0, kind), y.sb, B, mean[c], sc, beta[c])


# ==========================================================================
# Gradient

cdef void grad_sums_views(const floating[:, :, :] dyv, const floating[:, :, :] xv, const double[::1] mean,
                          double[::1] sum_dy, double[::1] sum_dy_xmu):
    cdef View dy = view_of(dyv)
    cdef View x = view_of(xv)
    cdef Grid g = make_grid(xv.shape[0], xv.shape[1], xv.shape[2], CHUNK_BYTES // sizeof(floating))
    cdef Py_ssize_t nbytes = 2 * g.R * g.C * sizeof(floating)
    cdef Py_ssize_t tiles = g.na * g.nb
    cdef RowTile tile
    cdef ColumnChunk chunk
    cdef Py_ssize_t k, c, t, j, a, r
    cdef double s_dy, s_dy_xmu
    cdef double[:, ::1] part_dy
    cdef double[:, ::1] part_dy_xmu
    cdef floating *kind = NULL
    if column_mode(xv):
        part_dy = np.zeros((g.nr, g.C))
        part_dy_xmu = np.zeros((g.nr, g.C))
        with nogil:
            for k in prange(g.nr * g.nc, schedule="static", num_threads=n_threads(nbytes, g.nr * g.nc)):
                chunk = column_chunk(&g, k)
                j = chunk.j
                for r in range(chunk.r0, chunk.r1):
                    cols_grad_sums(at(&dy, r // g.B, chunk.c0, r % g.B, kind), dy.sc, at(&x, r // g.B, chunk.c0, r % g.B, kind),
                                   x.sc, &mean[chunk.c0], &part_dy[j, chunk.c0], &part_dy_xmu[j, chunk.c0], chunk.c1 - chunk.c0)
            for c in range(g.C):
                s_dy = 0
                s_dy_xmu = 0
                for j in range(g.nr):
                    s_dy = s_dy + part_dy[j, c]
                    s_dy_xmu = s_dy_xmu + part_dy_xmu[j, c]
                sum_dy[c] = s_dy
                sum_dy_xmu[c] = s_dy_xmu
        return
    part_dy = np.zeros((g.C, tiles))
    part_dy_xmu = np.zeros((g.C, tiles))
    with nogil:
        for k in prange(g.C * tiles, schedule="static", num_threads=n_threads(nbytes, g.C * tiles)):
            tile = row_tile(&g, k)
            c = tile.c
            t = k % tiles
            for a in range(tile.a0, tile.a1):
                part_dy_xmu[c, t] += run_grad_sums(at(&dy, a, c, tile.b0, kind), dy.sb, at(&x, a, c, tile.b0, kind), x.sb,
                                                   tile.b1 - tile.b0, mean[c], &part_dy[c, t])
        for c in range(g.C):
            s_dy = 0
            s_dy_xmu = 0
            for t in range(tiles):
                s_dy = s_dy + part_dy[c, t]
                s_dy_xmu = s_dy_xmu + part_dy_xmu[c, t]
            sum_dy[c] = s_dy
            sum_dy_xmu[c] = s_dy_xmu


cdef void grad_views(const floating[:, :, :] dyv, const floating[:, :, :] xv, floating[:, :, :] dxv,
                     const double[::1] mean, const double[::1] k_dy, const double[::1] k_xmu,
                     const double[::1] k_const):
    cdef View dy = view_of(dyv)
    cdef View x = view_of(xv)
    cdef View dx = view_of(dxv)
    cdef Grid g = make_grid(xv.shape[0], xv.shape[1], xv.shape[2], CHUNK_BYTES // sizeof(floating))
    cdef Py_ssize_t nbytes = 3 * g.R * g.C * sizeof(floating)
    cdef RowTile tile
    cdef ColumnChunk chunk
    cdef Py_ssize_t k, c, r, a
    cdef floating *kind = NULL
    cdef bint columns = column_mode(xv)
    with nogil:
        if columns:
            for k in prange(g.nr * g.nc, schedule="static", num_threads=n_threads(nbytes, g.nr * g.nc)):
                chunk = column_chunk(&g, k)
                for r in range(chunk.r0, chunk.r1):
                    cols_grad(at(&dy, r // g.B, chunk.c0, r % g.B, kind), dy.sc, at(&x, r // g.B, chunk.c0, r % g.B, kind), x.sc,
                              at(&dx, r // g.B, chunk.c0, r % g.B, kind), dx.sc,
                              &mean[chunk.c0], &k_dy[chunk.c0], &k_xmu[chunk.c0], &k_const[chunk.c0], chunk.c1 - chunk.c0)
        else:
            for k in prange(g.C * g.na * g.nb, schedule="static", num_threads=n_threads(nbytes, g.C * g.na * g.nb)):
                tile = row_tile(&g, k)
                c = tile.c
                for a in range(tile.a0, tile.a1):
                    run_grad(at(&dy, a, c, tile.b0, kind), dy.sb, at(&x, a, c, tile.b0, kind), x.sb,
                             at(&dx, a, c, tile.b0, kind), dx.sb, tile.b1 - tile.b0, mean[c], k_dy[c], k_xmu[c], k_const[c])


def backward_reduce(const floating[:, :, :] dy,   # IN  (A, C, B)
                    const floating[:, :, :] x,    # IN  (A, C, B)
                    const double[::1] mean,       # IN  (C,)
                    double[::1] sum_dy,           # OUT (C,)
                    double[::1] sum_dy_xmu):      # OUT (C,)
    """sum_dy[c] = sum(dy); sum_dy_xmu[c] = sum(dy * (x - mean[c])) (overwritten)."""
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    grad_sums_views(dy, x, mean, sum_dy, sum_dy_xmu)


def backward_elemt(const floating[:, :, :] dy,   # IN  (A, C, B)
                   const floating[:, :, :] x,    # IN  (A, C, B)
                   floating[:, :, :] dx,         # OUT (A, C, B); may be dy or x
                   const double[::1] mean,       # IN  (C,)
                   const double[::1] k_dy,       # IN  (C,)
                   const double[::1] k_xmu,      # IN  (C,)
                   const double[::1] k_const):   # IN  (C,)
    """dx = dy * k_dy - (x - mean) * k_xmu - k_const, per channel."""
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    grad_views(dy, x, dx, mean, k_dy, k_xmu, k_const)


cdef inline void grad_coefficients(double s_dy, double s_dy_xmu, double count, double inv, double gam,
                                   double *k_dy, double *k_xmu, double *k_const) noexcept nogil:
    """dx = dy * k_dy - (x - mean) * k_xmu - k_const for one channel."""
    k_dy[0] = gam * inv
    k_xmu[0] = k_dy[0] * inv * inv * s_dy_xmu / count
    k_const[0] = k_dy[0] * s_dy / count


def backward(const floating[:, :, :] dyv,   # IN  (A, C, B)
             const floating[:, :, :] xv,    # IN  (A, C, B)
             floating[:, :, :] dxv,         # OUT (A, C, B); may be dy or x
             const double[::1] mean,        # IN  (C,)
             const double[::1] invstd,      # IN  (C,)
             const double[::1] gamma,       # IN  (C,)
             double[::1] sum_dy,            # OUT (C,) = dbeta
             double[::1] sum_dy_xmu):       # OUT (C,) = dgamma / invstd
    """Training-mode gradient: per-channel sums, then dx, in as few passes as fit."""
    cdef Py_ssize_t A = xv.shape[0], C = xv.shape[1], B = xv.shape[2]
    cdef double count = <double>(A * B)
    cdef double[:, ::1] k
    cdef View dy, x, dx
    cdef Py_ssize_t c, a
    cdef double s_dy, kd, kx, k0
    cdef floating *kind = NULL
    if A * B * C == 0:
        return
    if column_mode(xv) or 2 * A * B * <Py_ssize_t>sizeof(floating) > FUSE_BYTES:
        grad_sums_views(dyv, xv, mean, sum_dy, sum_dy_xmu)
        k = np.empty((3, C))
        for c in range(C):
            grad_coefficients(sum_dy[c], sum_dy_xmu[c], count, invstd[c], gamma[c], &k[0, c], &k[1, c], &k[2, c])
        grad_views(dyv, xv, dxv, mean, k[0], k[1], k[2])
        return
    # fused: a channel's dy and x blocks are read once; dx is computed from L2
    dy = view_of(dyv)
    x = view_of(xv)
    dx = view_of(dxv)
    with nogil:
        for c in prange(C, schedule="static", num_threads=n_threads(3 * A * B * C * sizeof(floating), C)):
            s_dy = 0  # scalars assigned here are thread-private
            kd = kx = k0 = 0
            sum_dy_xmu[c] = 0
            for a in range(A):
                sum_dy_xmu[c] += run_grad_sums(at(&dy, a, c, 0, kind), dy.sb, at(&x, a, c, 0, kind), x.sb, B,
                                               mean[c], &s_dy)
            sum_dy[c] = s_dy
            grad_coefficients(s_dy, sum_dy_xmu[c], count, invstd[c], gamma[c], &kd, &kx, &k0)
            for a in range(A):
                run_grad(at(&dy, a, c, 0, kind), dy.sb, at(&x, a, c, 0, kind), x.sb, at(&dx, a, c, 0, kind), dx.sb,
                         B, mean[c], kd, kx, k0)


# ==========================================================================
# Runtime information

def max_threads():
    """Threads a parallel kernel may use now (OMP_NUM_THREADS, threadpoolctl)."""
    return omp_get_max_threads()


def openmp_info():
    """(OpenMP spec date as int, runtime library path); (0, 'none') if off."""
    return CBN_OPENMP_VERSION, cbn_openmp_library().decode("utf-8", "replace")
