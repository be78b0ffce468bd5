# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""Batch-normalization kernels on 3-D views ``x[a, c, b]``.

``cbn._layout`` turns every input into views of shape (A, C, B): ``c`` runs
over channels and (a, b) over the values that share a channel, with any
strides.  Bulk arrays are float32 or float64 (one ``cython.floating`` kernel
per operation); per-channel arrays are float64.

Two traversals, chosen from the view's shape:

* row mode (NCHW-like, B is the finer axis): a channel is A runs of B values.
  When a channel's block fits in L2, groups of channels are done start to
  finish by one thread (statistics, then normalize or gradient, while the
  blocks are cached), so the data is read from memory once.  Otherwise the
  view is cut into (a, c, b) tiles.
* column mode (NC, NHWC: channels are the finest axis, B == 1): rows of C
  channels, cut into chunks of rows whose per-channel partial results are
  merged afterwards.

Every cut that a result depends on follows the shape only, never the thread
count (fused groups of whole channels may follow it: a channel's results do
not depend on its group), and partial results are merged in a fixed order:
the bits do not depend on the number of threads.  Sums accumulate in
float64; variances come from deviations (from a channel's first value in one
pass over a block or column chunk, a second pass from the mean, from cache,
where that could cancel), merged with Chan's formula, never E[x^2] - E[x]^2.
The loops over contiguous runs are C (``src_c/cbn_loops_t.h``), built per
instruction set.

Each parallel loop is a thin ``prange`` over a ``nogil`` task function,
with a plain loop instead when one thread will do (small arrays).
"""
import os

from cbn._machine import cpu_vendor, l3_bytes, stream_threshold

cimport numpy as cnp
from cpython.float cimport PyFloat_CheckExact
from cpython.long cimport PyLong_CheckExact
from cpython.tuple cimport PyTuple_CheckExact
from cpython.unicode cimport PyUnicode_CheckExact
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

cnp.import_array()

cdef extern from "cbn_openmp.h":
    int omp_get_max_threads() noexcept nogil
    int CBN_OPENMP_VERSION
    const char *cbn_openmp_library() noexcept

# A channel block up to this size (all arrays it reads) stays in L2 between
# the statistics pass and the normalize/gradient pass.
cdef Py_ssize_t FUSE_BYTES = 1 << 20
# A block of some of the channels is read in pieces, one per row (of each array
# it reads); pieces shorter than this (all arrays together) defeat the hardware
# prefetchers of a larger array, and two passes in memory order are faster.
cdef Py_ssize_t MIN_PIECE_BYTES = 8 << 10
# Tiles and chunks of this size stay in L2 for a second pass of statistics
# whose one-pass shift could cancel.
cdef Py_ssize_t CHUNK_BYTES = 1 << 18
# Below this much data a parallel region costs more than it saves.
cdef Py_ssize_t SERIAL_BYTES = 1 << 18
# Outputs of at least this size are written with non-temporal stores, which
# skip the read of each line a plain store makes: larger than the caches, they
# would not be read back from there anyway (-1: never).  The size follows the
# CPU (cbn._machine.stream_threshold).
cdef Py_ssize_t STREAM_BYTES = stream_threshold(cpu_vendor(), l3_bytes())
# Tiles cover at least this many values per channel, so that their partial
# results (one per channel and tile) stay small next to the data.
cdef Py_ssize_t MIN_TILE_VALUES = 256
# Column-mode rows up to this size are not cut between tiles.
cdef Py_ssize_t ROW_TILE_BYTES = 1 << 14
# Arrays up to this size are taken to be in cache (L2), where the column sums read CBN_ROWS rows at
# a time whatever the rows' distance (AMD Zen 4, NC 1000x100 and 500x256 float32: training
# 0.87-0.91, backward 0.88-0.93 of the time a row at a time).
cdef Py_ssize_t CACHED_BYTES = 1 << 19


# ==========================================================================
# Inner loops (src_c/cbn_loops_t.h); one fused front per loop picks the float
# or the double instance.

cdef extern from "cbn_loops.h" nogil:
    int CBN_HAVE_STREAM
    void merge_slots "cbn_merge_slots"(Py_ssize_t slots, Py_ssize_t C, const double *counts, const double *part_mean,
                                       const double *part_m2, double *mean, double *m2)
    void norm_params_f "cbn_norm_params_f"(Py_ssize_t n, double count, double eps, const double *mean, double *var,
                                           double *invstd, const double *gamma, const double *beta, float *p,
                                           Py_ssize_t ps)
    void norm_params_d "cbn_norm_params_d"(Py_ssize_t n, double count, double eps, const double *mean, double *var,
                                           double *invstd, const double *gamma, const double *beta, double *p,
                                           Py_ssize_t ps)
    void affine_params_f "cbn_affine_params_f"(double mean, double scale, double shift, float *p, Py_ssize_t ps)
    void affine_params_d "cbn_affine_params_d"(double mean, double scale, double shift, double *p, Py_ssize_t ps)
    void grad_coefs_f "cbn_grad_coefs_f"(double mean, double dy_mean, double c_xmu, double k_dy, float *p,
                                         Py_ssize_t ps)
    void grad_coefs_d "cbn_grad_coefs_d"(double mean, double dy_mean, double c_xmu, double k_dy, double *p,
                                         Py_ssize_t ps)
    void grad_params_f "cbn_grad_params_f"(Py_ssize_t n, double count, const double *mean, const double *invstd,
                                           const double *gamma, const double *sum_dy, const double *sum_dy_xmu,
                                           float *p, Py_ssize_t ps)
    void grad_params_d "cbn_grad_params_d"(Py_ssize_t n, double count, const double *mean, const double *invstd,
                                           const double *gamma, const double *sum_dy, const double *sum_dy_xmu,
                                           double *p, Py_ssize_t ps)
    void group_stats_f "cbn_group_stats_f"(const float *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t s, Py_ssize_t m,
                                           Py_ssize_t g, Py_ssize_t n, double *mean, double *m2)
    void group_stats_d "cbn_group_stats_d"(const double *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t s, Py_ssize_t m,
                                           Py_ssize_t g, Py_ssize_t n, double *mean, double *m2)
    void group_affine_f "cbn_group_affine_f"(const float *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx, float *y,
                                             Py_ssize_t ya, Py_ssize_t yc, Py_ssize_t sy, Py_ssize_t m, Py_ssize_t g,
                                             Py_ssize_t n, const float *p, Py_ssize_t ps, int act, float slope,
                                             int stream)
    void group_affine_d "cbn_group_affine_d"(const double *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx, double *y,
                                             Py_ssize_t ya, Py_ssize_t yc, Py_ssize_t sy, Py_ssize_t m, Py_ssize_t g,
                                             Py_ssize_t n, const double *p, Py_ssize_t ps, int act, double slope,
                                             int stream)
    void group_act_grad_f "cbn_group_act_grad_f"(const float *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd,
                                                 const float *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx,
                                                 float *dz, Py_ssize_t oa, Py_ssize_t oc, Py_ssize_t so,
                                                 Py_ssize_t m, Py_ssize_t g,
                                                 Py_ssize_t n, const float *p, Py_ssize_t ps, int act, float slope)
    void group_act_grad_d "cbn_group_act_grad_d"(const double *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd,
                                                 const double *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx,
                                                 double *dz, Py_ssize_t oa, Py_ssize_t oc, Py_ssize_t so, Py_ssize_t m,
                                                 Py_ssize_t g, Py_ssize_t n, const double *p, Py_ssize_t ps, int act,
                                                 double slope)
    void group_grad_sums_f "cbn_group_grad_sums_f"(const float *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd,
                                                   const float *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx,
                                                   Py_ssize_t m, Py_ssize_t g, Py_ssize_t n, const double *mu,
                                                   double *sum_dy, double *sum_dy_xmu)
    void group_grad_sums_d "cbn_group_grad_sums_d"(const double *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd,
                                                   const double *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx,
                                                   Py_ssize_t m, Py_ssize_t g, Py_ssize_t n, const double *mu,
                                                   double *sum_dy, double *sum_dy_xmu)
    void group_act_grad_sums_f "cbn_group_act_grad_sums_f"(
        const float *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd, const float *x, Py_ssize_t xa, Py_ssize_t xc,
        Py_ssize_t sx, float *dz, Py_ssize_t oa, Py_ssize_t oc, Py_ssize_t so, Py_ssize_t m, Py_ssize_t g,
        Py_ssize_t n, const float *p, Py_ssize_t ps, int act, float slope, const double *mu, double *sum_dy,
        double *sum_dy_xmu)
    void group_act_grad_sums_d "cbn_group_act_grad_sums_d"(
        const double *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd, const double *x, Py_ssize_t xa, Py_ssize_t xc,
        Py_ssize_t sx, double *dz, Py_ssize_t oa, Py_ssize_t oc, Py_ssize_t so, Py_ssize_t m, Py_ssize_t g,
        Py_ssize_t n, const double *p, Py_ssize_t ps, int act, double slope, const double *mu, double *sum_dy,
        double *sum_dy_xmu)
    void group_grad_f "cbn_group_grad_f"(const float *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd, const float *x,
                                         Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx, float *dx, Py_ssize_t oa,
                                         Py_ssize_t oc, Py_ssize_t so, Py_ssize_t m, Py_ssize_t g, Py_ssize_t n,
                                         const float *p, Py_ssize_t ps, int relu, float low, int stream)
    void group_grad_d "cbn_group_grad_d"(const double *dy, Py_ssize_t da, Py_ssize_t dc, Py_ssize_t sd,
                                         const double *x, Py_ssize_t xa, Py_ssize_t xc, Py_ssize_t sx, double *dx,
                                         Py_ssize_t oa, Py_ssize_t oc, Py_ssize_t so, Py_ssize_t m, Py_ssize_t g,
                                         Py_ssize_t n, const double *p, Py_ssize_t ps, int relu, double low,
                                         int stream)
    void cols_stats_f "cbn_cols_stats_f"(const float *x, Py_ssize_t xa, Py_ssize_t sx, Py_ssize_t m, Py_ssize_t n,
                                         int cached, double *mean, double *m2)
    void cols_stats_d "cbn_cols_stats_d"(const double *x, Py_ssize_t xa, Py_ssize_t sx, Py_ssize_t m, Py_ssize_t n,
                                         int cached, double *mean, double *m2)
    void cols_grad_sums_f "cbn_cols_grad_sums_f"(const float *dy, Py_ssize_t da, Py_ssize_t sd, const float *x,
                                                 Py_ssize_t xa, Py_ssize_t sx, Py_ssize_t m, Py_ssize_t n, int cached,
                                                 const double *mu, double *sum_dy, double *sum_dy_xmu)
    void cols_grad_sums_d "cbn_cols_grad_sums_d"(const double *dy, Py_ssize_t da, Py_ssize_t sd, const double *x,
                                                 Py_ssize_t xa, Py_ssize_t sx, Py_ssize_t m, Py_ssize_t n, int cached,
                                                 const double *mu, double *sum_dy, double *sum_dy_xmu)
    void cols_act_grad_sums_f "cbn_cols_act_grad_sums_f"(
        const float *dy, Py_ssize_t da, Py_ssize_t sd, const float *x, Py_ssize_t xa, Py_ssize_t sx, float *dz,
        Py_ssize_t oa, Py_ssize_t so, Py_ssize_t m, Py_ssize_t n, int cached, const float *p, Py_ssize_t ps,
        int act, float slope, const double *mu, double *sum_dy, double *sum_dy_xmu)
    void cols_act_grad_sums_d "cbn_cols_act_grad_sums_d"(
        const double *dy, Py_ssize_t da, Py_ssize_t sd, const double *x, Py_ssize_t xa, Py_ssize_t sx, double *dz,
        Py_ssize_t oa, Py_ssize_t so, Py_ssize_t m, Py_ssize_t n, int cached, const double *p, Py_ssize_t ps,
        int act, double slope, const double *mu, double *sum_dy, double *sum_dy_xmu)
    void cols_affine_f "cbn_cols_affine_f"(const float *x, Py_ssize_t xa, Py_ssize_t sx, float *y, Py_ssize_t ya,
                                           Py_ssize_t sy, Py_ssize_t m, Py_ssize_t n, const float *p, Py_ssize_t ps,
                                           int act, float slope, int stream)
    void cols_affine_d "cbn_cols_affine_d"(const double *x, Py_ssize_t xa, Py_ssize_t sx, double *y, Py_ssize_t ya,
                                           Py_ssize_t sy, Py_ssize_t m, Py_ssize_t n, const double *p, Py_ssize_t ps,
                                           int act, double slope, int stream)
    void cols_act_grad_f "cbn_cols_act_grad_f"(const float *dy, Py_ssize_t da, Py_ssize_t sd, const float *x,
                                               Py_ssize_t xa, Py_ssize_t sx, float *dz, Py_ssize_t oa, Py_ssize_t so,
                                               Py_ssize_t m, Py_ssize_t n, const float *p, Py_ssize_t ps, int act,
                                               float slope)
    void cols_act_grad_d "cbn_cols_act_grad_d"(const double *dy, Py_ssize_t da, Py_ssize_t sd, const double *x,
                                               Py_ssize_t xa, Py_ssize_t sx, double *dz, Py_ssize_t oa, Py_ssize_t so,
                                               Py_ssize_t m, Py_ssize_t n, const double *p, Py_ssize_t ps, int act,
                                               double slope)
    void cols_relu_grad_f "cbn_cols_relu_grad_f"(const float *dy, Py_ssize_t da, const float *x, Py_ssize_t xa,
                                                 float *dx, Py_ssize_t oa, Py_ssize_t m, Py_ssize_t n,
                                                 const float *p, Py_ssize_t ps, float low, int stream)
    void cols_relu_grad_d "cbn_cols_relu_grad_d"(const double *dy, Py_ssize_t da, const double *x, Py_ssize_t xa,
                                                 double *dx, Py_ssize_t oa, Py_ssize_t m, Py_ssize_t n,
                                                 const double *p, Py_ssize_t ps, double low, int stream)
    void cols_grad_f "cbn_cols_grad_f"(const float *dy, Py_ssize_t da, Py_ssize_t sd, const float *x, Py_ssize_t xa,
                                       Py_ssize_t sx, float *dx, Py_ssize_t oa, Py_ssize_t so, Py_ssize_t m,
                                       Py_ssize_t n, const float *p, Py_ssize_t ps, int stream)
    void cols_grad_d "cbn_cols_grad_d"(const double *dy, Py_ssize_t da, Py_ssize_t sd, const double *x, Py_ssize_t xa,
                                       Py_ssize_t sx, double *dx, Py_ssize_t oa, Py_ssize_t so, Py_ssize_t m,
                                       Py_ssize_t n, const double *p, Py_ssize_t ps, int stream)


# ==========================================================================
# Views, the work grid, scratch memory

cdef struct View:
    char *data                      # element [0, 0, 0]
    Py_ssize_t sa, sc, sb           # strides in elements
    bint stream                     # as an output: write it with non-temporal stores (cbn_stream.h)


cdef struct Act:
    int code                        # an activation fused into the elementwise pass (cbn_loops.h)
    double slope                    # negative slope of leaky ReLU


cdef inline bint streams(Py_ssize_t nbytes, Py_ssize_t arrays) noexcept nogil:
    """Whether an output of nbytes is written with non-temporal stores, in a pass over ``arrays`` arrays
    of its size: STREAM_BYTES is the size for 2 (a forward), and the 3 of a fused backward (dy and x
    read once) outgrow the caches at 2/3 of it (AMD Zen 4, NCHW 64x256x14x14 backward: 0.81-0.88 of
    plain stores' time).  Backwards that read dy and x twice keep 2: at 2/3, NC 4096x1024 took 1.06-1.10x
    as long."""
    return STREAM_BYTES >= 0 and nbytes * arrays >= 2 * STREAM_BYTES


cdef View view_of(const floating[:, :, :] v) noexcept:
    cdef View w
    w.data = <char *>&v[0, 0, 0]
    w.sa = v.strides[0] // <Py_ssize_t>sizeof(floating)
    w.sc = v.strides[1] // <Py_ssize_t>sizeof(floating)
    w.sb = v.strides[2] // <Py_ssize_t>sizeof(floating)
    w.stream = streams(v.shape[0] * v.shape[1] * v.shape[2] * <Py_ssize_t>sizeof(floating), 2)
    return w


cdef inline floating *at(const View *w, Py_ssize_t a, Py_ssize_t c, Py_ssize_t b, floating *kind) noexcept nogil:
    """Address of element [a, c, b] (``kind`` only selects the type)."""
    return (<floating *>w.data) + a * w.sa + c * w.sc + b * w.sb


cdef inline Py_ssize_t clamp(Py_ssize_t n, Py_ssize_t high) noexcept nogil:
    """n within [1, max(high, 1)]."""
    return max(1, min(n, high))


cdef struct Grid:
    Py_ssize_t A, C, B, R           # R = A * B values per channel
    bint columns                    # column mode?
    bint cached                     # an array no larger than CACHED_BYTES (probably in cache)?
    # row mode: tiles of ta x tc x tb, na x nct x nb of them, a-major
    Py_ssize_t ta, tct, tb, na, nct, nb
    # column mode (B == 1): chunks of rows r0:r1 (along a) and channels c0:c1
    Py_ssize_t tr, tc, nr, nc       # chunk extents, row chunks, channel tiles
    Py_ssize_t tasks


cdef inline Grid make_grid(const floating[:, :, :] x) noexcept:
    return shape_grid(x.shape[0], x.shape[1], x.shape[2], sizeof(floating))


cdef Grid shape_grid(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B, Py_ssize_t itemsize) noexcept nogil:
    """The work grid of an (A, C, B) view: its mode, and cuts that depend on the shape only."""
    cdef Grid g
    cdef Py_ssize_t chunk = CHUNK_BYTES // itemsize
    g.A = A
    g.C = C
    g.B = B
    g.R = g.A * g.B
    # cbn._layout puts the channel axis last (B == 1) when channels are the
    # finest axis; otherwise runs along b are the contiguous ones
    g.columns = g.B == 1
    g.cached = g.R * g.C * itemsize <= CACHED_BYTES
    g.tb = clamp(g.B, chunk)
    g.tct = clamp(g.C, chunk // max(g.tb, MIN_TILE_VALUES))
    g.ta = clamp(g.A, chunk // (g.tb * g.tct))
    g.na = (g.A + g.ta - 1) // g.ta
    g.nct = (g.C + g.tct - 1) // g.tct
    g.nb = (g.B + g.tb - 1) // g.tb
    # column mode: tiles of tr rows by tc channels.  Rows wider than a tile's
    # channels are kept whole (contiguous memory; pieces a row apart defeat
    # the prefetchers) when they are narrow enough and there are enough of
    # them for 8 tiles of MIN_TILE_VALUES // 2 rows or more: tiles of
    # MIN_TILE_VALUES rows, fewer where that would leave under 8 (AMD Zen 4,
    # 1024 to 2047 rows of 300 to 4096 values: 0.71-0.97 of the time that
    # channel pieces took in float32, 0.58-0.98 in float64)
    g.tc = clamp(g.C, chunk // MIN_TILE_VALUES)
    if g.tc < g.C and g.C * itemsize <= ROW_TILE_BYTES and g.A >= 8 * (MIN_TILE_VALUES // 2):
        g.tc = g.C
    g.tr = clamp(g.A, chunk // min(g.tc, chunk // MIN_TILE_VALUES))
    if g.tc == g.C > chunk // MIN_TILE_VALUES:
        g.tr = min(g.tr, (g.A + 7) // 8)
    g.nr = (g.A + g.tr - 1) // g.tr
    g.nc = (g.C + g.tc - 1) // g.tc
    g.tasks = g.nr * g.nc if g.columns else g.na * g.nct * g.nb
    return g


cdef int n_threads(Py_ssize_t nbytes, Py_ssize_t n_tasks) noexcept nogil:
    if forked_child or nbytes < SERIAL_BYTES or n_tasks < 2:
        return 1
    return <int>min(<Py_ssize_t>omp_get_max_threads(), n_tasks)


# In a child forked after the parent ran OpenMP threads, GNU libgomp's thread
# pool is gone and its next parallel region would hang; the child runs every
# kernel on its own thread instead (one thread takes the plain loops, never
# entering OpenMP).  Results are the same bits: cuts do not depend on threads.
cdef bint forked_child = False


def _after_fork_in_child():
    global forked_child
    forked_child = True


def in_forked_child():
    """True in a process forked from one that imported cbn: kernels run on one thread."""
    return bool(forked_child)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Task bounds come back as structs assigned per iteration, which Cython makes
# thread-private in a prange body.

cdef struct RowTile:
    Py_ssize_t slot                 # index of the tile's (a, b) position: ia * nb + ib
    Py_ssize_t a0, a1, c0, c1, b0, b1


cdef struct ColumnChunk:
    Py_ssize_t j, r0, r1, c0, c1


cdef inline RowTile row_tile(const Grid *g, Py_ssize_t k) noexcept nogil:
    """Row-mode task k, a-major: runs a0:a1 of channels c0:c1, values b0:b1."""
    cdef RowTile t
    cdef Py_ssize_t ia = k // (g.nct * g.nb), ic = (k // g.nb) % g.nct, ib = k % g.nb
    t.slot = ia * g.nb + ib
    t.a0 = ia * g.ta
    t.a1 = min(t.a0 + g.ta, g.A)
    t.c0 = ic * g.tct
    t.c1 = min(t.c0 + g.tct, g.C)
    t.b0 = ib * g.tb
    t.b1 = min(t.b0 + g.tb, g.B)
    return t


cdef inline double slot_count(const Grid *g, Py_ssize_t slot) noexcept nogil:
    """Values per channel in the row tiles at (a, b) position ``slot``."""
    cdef Py_ssize_t a0 = (slot // g.nb) * g.ta, b0 = (slot % g.nb) * g.tb
    return <double>((min(a0 + g.ta, g.A) - a0) * (min(b0 + g.tb, g.B) - b0))


cdef inline ColumnChunk column_chunk(const Grid *g, Py_ssize_t k) noexcept nogil:
    """Column-mode task k (row-chunk-major): row chunk j = rows r0:r1, channels c0:c1."""
    cdef ColumnChunk t
    t.j = k // g.nc
    t.r0 = t.j * g.tr
    t.r1 = min(t.r0 + g.tr, g.A)
    t.c0 = (k % g.nc) * g.tc
    t.c1 = min(t.c0 + g.tc, g.C)
    return t


cdef inline Py_ssize_t chunk_rows(const Grid *g, Py_ssize_t j) noexcept nogil:
    """Rows in row chunk j."""
    return min(j * g.tr + g.tr, g.A) - j * g.tr


cdef inline floating *chunk_at(const View *w, const ColumnChunk *t, floating *kind) noexcept nogil:
    """Address of the chunk's first row and channel (rows run along a: B == 1)."""
    return at(w, t.r0, t.c0, 0, kind)


# The group fronts take a View and a block: runs a0:a1 of channels c0:c1,
# values b0:b1.

cdef inline void group_stats(const View *x, const RowTile *t, double *mean, double *m2, floating *kind) noexcept nogil:
    """Per-channel mean and M2 of a block (one pass; a second from cache where the first could cancel)."""
    if floating is float:
        group_stats_f(at(x, t.a0, t.c0, t.b0, kind), x.sa, x.sc, x.sb, t.a1 - t.a0, t.c1 - t.c0, t.b1 - t.b0,
                      mean, m2)
    else:
        group_stats_d(at(x, t.a0, t.c0, t.b0, kind), x.sa, x.sc, x.sb, t.a1 - t.a0, t.c1 - t.c0, t.b1 - t.b0,
                      mean, m2)


cdef inline void group_affine(const View *x, const View *y, const RowTile *t, const floating *p, Py_ssize_t ps,
                              const Act *act) noexcept nogil:
    """p points at channel c0's (mu_hi, scale, shift), rows ps apart (cbn_affine_params)."""
    cdef floating *kind = NULL
    if floating is float:
        group_affine_f(at(x, t.a0, t.c0, t.b0, kind), x.sa, x.sc, x.sb, at(y, t.a0, t.c0, t.b0, kind), y.sa, y.sc,
                       y.sb, t.a1 - t.a0, t.c1 - t.c0, t.b1 - t.b0, p, ps, act.code, <float>act.slope, y.stream)
    else:
        group_affine_d(at(x, t.a0, t.c0, t.b0, kind), x.sa, x.sc, x.sb, at(y, t.a0, t.c0, t.b0, kind), y.sa, y.sc,
                       y.sb, t.a1 - t.a0, t.c1 - t.c0, t.b1 - t.b0, p, ps, act.code, act.slope, y.stream)


cdef inline void group_act_grad(const View *dy, const View *x, const View *dz, const RowTile *t, const floating *p,
                                Py_ssize_t ps, const Act *act) noexcept nogil:
    cdef floating *kind = NULL
    if floating is float:
        group_act_grad_f(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind), x.sa,
                         x.sc, x.sb, at(dz, t.a0, t.c0, t.b0, kind), dz.sa, dz.sc, dz.sb, t.a1 - t.a0, t.c1 - t.c0,
                         t.b1 - t.b0, p, ps, act.code, <float>act.slope)
    else:
        group_act_grad_d(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind), x.sa,
                         x.sc, x.sb, at(dz, t.a0, t.c0, t.b0, kind), dz.sa, dz.sc, dz.sb, t.a1 - t.a0, t.c1 - t.c0,
                         t.b1 - t.b0, p, ps, act.code, act.slope)


cdef inline void group_grad_sums(const View *dy, const View *x, const RowTile *t, const double *mu, double *sum_dy,
                                 double *sum_dy_xmu, floating *kind) noexcept nogil:
    if floating is float:
        group_grad_sums_f(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind),
                          x.sa, x.sc, x.sb, t.a1 - t.a0, t.c1 - t.c0, t.b1 - t.b0, mu, sum_dy, sum_dy_xmu)
    else:
        group_grad_sums_d(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind),
                          x.sa, x.sc, x.sb, t.a1 - t.a0, t.c1 - t.c0, t.b1 - t.b0, mu, sum_dy, sum_dy_xmu)


cdef inline void group_act_grad_sums(const View *dy, const View *x, const View *dz, const RowTile *t,
                                     const floating *p, Py_ssize_t ps, const Act *act, const double *mu,
                                     double *sum_dy, double *sum_dy_xmu) noexcept nogil:
    """dz = dy * act'(z) run by run into dz, and the sums of dz as group_grad_sums.

    dz NULL: the sums only, for ReLU and leaky ReLU on contiguous runs (whose
    dz group_grad recomputes)."""
    cdef floating *kind = NULL
    cdef floating *out = NULL if dz == NULL else at(dz, t.a0, t.c0, t.b0, kind)
    cdef Py_ssize_t oa = 0 if dz == NULL else dz.sa
    cdef Py_ssize_t oc = 0 if dz == NULL else dz.sc
    cdef Py_ssize_t so = 1 if dz == NULL else dz.sb
    if floating is float:
        group_act_grad_sums_f(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind),
                              x.sa, x.sc, x.sb, out, oa, oc, so, t.a1 - t.a0,
                              t.c1 - t.c0, t.b1 - t.b0, p, ps, act.code, <float>act.slope, mu, sum_dy, sum_dy_xmu)
    else:
        group_act_grad_sums_d(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind),
                              x.sa, x.sc, x.sb, out, oa, oc, so, t.a1 - t.a0,
                              t.c1 - t.c0, t.b1 - t.b0, p, ps, act.code, act.slope, mu, sum_dy, sum_dy_xmu)


cdef inline double relu_low(const Act *relu) noexcept nogil:
    """The slope below 0 of the dx passes' ReLU (code 1) or leaky ReLU (code 2)."""
    return 0.0 if relu.code == 1 else relu.slope


cdef inline void group_grad(const View *dy, const View *x, const View *dx, const RowTile *t, const floating *p,
                            Py_ssize_t ps, const Act *relu) noexcept nogil:
    """p points at channel c0's (mu_hi, dy_mean, c_xmu, k_dy), rows ps apart (cbn_grad_coefs); ``relu``
    set (contiguous runs): dy is taken through ReLU or leaky ReLU, its slope recomputed from x, and p
    holds 6 rows, set_affine's scale and shift after the 4."""
    cdef floating *kind = NULL
    if floating is float:
        group_grad_f(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind), x.sa, x.sc,
                     x.sb, at(dx, t.a0, t.c0, t.b0, kind), dx.sa, dx.sc, dx.sb, t.a1 - t.a0, t.c1 - t.c0,
                     t.b1 - t.b0, p, ps, relu.code != 0, <float>relu_low(relu), dx.stream)
    else:
        group_grad_d(at(dy, t.a0, t.c0, t.b0, kind), dy.sa, dy.sc, dy.sb, at(x, t.a0, t.c0, t.b0, kind), x.sa, x.sc,
                     x.sb, at(dx, t.a0, t.c0, t.b0, kind), dx.sa, dx.sc, dx.sb, t.a1 - t.a0, t.c1 - t.c0,
                     t.b1 - t.b0, p, ps, relu.code != 0, relu_low(relu), dx.stream)


cdef inline void cols_stats(const View *x, const Grid *g, const ColumnChunk *t, double *mean, double *m2,
                            floating *kind) noexcept nogil:
    if floating is float:
        cols_stats_f(chunk_at(x, t, kind), x.sa, x.sc, t.r1 - t.r0, t.c1 - t.c0, g.cached, mean, m2)
    else:
        cols_stats_d(chunk_at(x, t, kind), x.sa, x.sc, t.r1 - t.r0, t.c1 - t.c0, g.cached, mean, m2)


cdef inline void cols_grad_sums(const View *dy, const View *x, const Grid *g, const ColumnChunk *t, const double *mu,
                                double *sum_dy, double *sum_dy_xmu, floating *kind) noexcept nogil:
    if floating is float:
        cols_grad_sums_f(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind),
                         x.sa, x.sc, t.r1 - t.r0, t.c1 - t.c0, g.cached, mu, sum_dy, sum_dy_xmu)
    else:
        cols_grad_sums_d(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind),
                         x.sa, x.sc, t.r1 - t.r0, t.c1 - t.c0, g.cached, mu, sum_dy, sum_dy_xmu)


cdef inline void cols_act_grad_sums(const View *dy, const View *x, const View *dz, const Grid *g,
                                    const ColumnChunk *t, const floating *p, Py_ssize_t ps, const Act *act,
                                    const double *mu, double *sum_dy, double *sum_dy_xmu) noexcept nogil:
    """dz = dy * act'(z) row by row into dz, and the sums of dz as cols_grad_sums.

    dz NULL: the sums only, for ReLU and leaky ReLU on contiguous rows (whose
    dz cols_relu_grad recomputes); the other activations and layouts store dz."""
    cdef floating *kind = NULL
    cdef floating *out = NULL if dz == NULL else chunk_at(dz, t, kind)
    cdef Py_ssize_t oa = 0 if dz == NULL else dz.sa
    cdef Py_ssize_t so = 1 if dz == NULL else dz.sc
    if floating is float:
        cols_act_grad_sums_f(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind), x.sa, x.sc,
                             out, oa, so, t.r1 - t.r0, t.c1 - t.c0, g.cached, p, ps, act.code,
                             <float>act.slope, mu, sum_dy, sum_dy_xmu)
    else:
        cols_act_grad_sums_d(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind), x.sa, x.sc,
                             out, oa, so, t.r1 - t.r0, t.c1 - t.c0, g.cached, p, ps, act.code,
                             act.slope, mu, sum_dy, sum_dy_xmu)


cdef inline void cols_affine(const View *x, const View *y, const Grid *g, const ColumnChunk *t, const floating *p,
                             Py_ssize_t ps, const Act *act) noexcept nogil:
    cdef floating *kind = NULL
    if floating is float:
        cols_affine_f(chunk_at(x, t, kind), x.sa, x.sc, chunk_at(y, t, kind), y.sa,
                      y.sc, t.r1 - t.r0, t.c1 - t.c0, p, ps, act.code, <float>act.slope, y.stream)
    else:
        cols_affine_d(chunk_at(x, t, kind), x.sa, x.sc, chunk_at(y, t, kind), y.sa,
                      y.sc, t.r1 - t.r0, t.c1 - t.c0, p, ps, act.code, act.slope, y.stream)


cdef inline void cols_act_grad(const View *dy, const View *x, const View *dz, const Grid *g, const ColumnChunk *t,
                               const floating *p, Py_ssize_t ps, const Act *act) noexcept nogil:
    cdef floating *kind = NULL
    if floating is float:
        cols_act_grad_f(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind),
                        x.sa, x.sc, chunk_at(dz, t, kind), dz.sa, dz.sc, t.r1 - t.r0,
                        t.c1 - t.c0, p, ps, act.code, <float>act.slope)
    else:
        cols_act_grad_d(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind),
                        x.sa, x.sc, chunk_at(dz, t, kind), dz.sa, dz.sc, t.r1 - t.r0,
                        t.c1 - t.c0, p, ps, act.code, act.slope)


cdef inline void cols_grad(const View *dy, const View *x, const View *dx, const Grid *g, const ColumnChunk *t,
                           const floating *p, Py_ssize_t ps) noexcept nogil:
    cdef floating *kind = NULL
    if floating is float:
        cols_grad_f(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind), x.sa,
                    x.sc, chunk_at(dx, t, kind), dx.sa, dx.sc, t.r1 - t.r0, t.c1 - t.c0, p, ps, dx.stream)
    else:
        cols_grad_d(chunk_at(dy, t, kind), dy.sa, dy.sc, chunk_at(x, t, kind), x.sa,
                    x.sc, chunk_at(dx, t, kind), dx.sa, dx.sc, t.r1 - t.r0, t.c1 - t.c0, p, ps, dx.stream)


cdef void *scratch(Py_ssize_t n, size_t size, bint zero) except NULL:
    """n zeroed (or not) items of ``size`` bytes from the heap; free() it."""
    cdef void *p = calloc(max(n, 1), size) if zero else malloc(max(n, 1) * size)
    if p == NULL:
        raise MemoryError(f"cbn: could not allocate {n * size} bytes of scratch memory")
    return p


cdef inline RowTile whole_channels(const Grid *g, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """A block of whole channels c0:c1 (for the fused passes)."""
    cdef RowTile t
    t.slot = 0
    t.a0 = 0
    t.a1 = g.A
    t.c0 = c0
    t.c1 = c1
    t.b0 = 0
    t.b1 = g.B
    return t


cdef inline Py_ssize_t fused_group(const Grid *g, Py_ssize_t arrays, Py_ssize_t itemsize) noexcept nogil:
    """Channels per fused task, or 0 for two passes: when a channel's blocks do not fit in L2, when an
    array larger than that would be read in short pieces (MIN_PIECE_BYTES), or in column mode.

    An array worth threads gets a task per thread at least.  A channel's results do not depend on
    its group (each is summed over whole channels), so the cut may follow the thread count."""
    cdef Py_ssize_t group, threads = omp_get_max_threads()
    if g.columns or arrays * g.R * itemsize > FUSE_BYTES:
        return 0
    group = FUSE_BYTES // (arrays * g.R * itemsize)
    if group < g.C and arrays * g.B * group * itemsize < MIN_PIECE_BYTES and g.R * g.C * itemsize > FUSE_BYTES:
        return 0
    if not forked_child and (arrays + 1) * g.R * g.C * itemsize >= SERIAL_BYTES:
        group = min(group, (g.C + threads - 1) // threads)
    return clamp(group, g.C)


# ==========================================================================
# Statistics: per-channel mean and M2 = sum((x - mean)**2)

cdef void stats_row_task(const View *x, const Grid *g, Py_ssize_t k, double *part, floating *kind) noexcept nogil:
    """Tile k's per-channel mean and M2 into its slot of the partials (2 rows of slots x C)."""
    cdef RowTile t = row_tile(g, k)
    cdef Py_ssize_t i = t.slot * g.C + t.c0, n = g.na * g.nb * g.C
    group_stats(x, &t, &part[i], &part[n + i], kind)


cdef void stats_column_task(const View *x, const Grid *g, Py_ssize_t k, double *part_mean, double *part_m2,
                            floating *kind) noexcept nogil:
    """Chunk k's per-channel mean and M2 into row j of the partials."""
    cdef ColumnChunk t = column_chunk(g, k)
    cols_stats(x, g, &t, &part_mean[t.j * g.C + t.c0], &part_m2[t.j * g.C + t.c0], kind)


cdef inline Py_ssize_t partials_size(const Grid *g) noexcept nogil:
    """Doubles of zeroed scratch that grid_stats and grid_grad_sums need (the last, one per slot, for counts)."""
    cdef Py_ssize_t slots = g.nr if g.columns else g.na * g.nb
    return 2 * slots * g.C + slots


cdef void grid_stats(const View *x, const Grid *g, double *part, double *mean, double *m2,
                     floating *kind) noexcept nogil:
    """Per-channel mean and M2 over the grid's tasks, merged in a fixed order."""
    cdef Py_ssize_t k, j, slots = g.nr if g.columns else g.na * g.nb
    cdef int nt = n_threads(g.R * g.C * sizeof(floating), g.tasks)
    cdef double *part_m2 = part + slots * g.C
    cdef double *counts
    if nt == 1:
        for k in range(g.tasks):
            if g.columns:
                stats_column_task(x, g, k, part, part_m2, kind)
            else:
                stats_row_task(x, g, k, part, kind)
    else:
        for k in prange(g.tasks, num_threads=nt, schedule="static"):
            if g.columns:
                stats_column_task(x, g, k, part, part_m2, kind)
            else:
                stats_row_task(x, g, k, part, kind)
    counts = part + partials_size(g) - slots
    for j in range(slots):
        counts[j] = <double>chunk_rows(g, j) if g.columns else slot_count(g, j)
    merge_slots(slots, g.C, counts, part, part_m2, mean, m2)


def channel_stats(const floating[:, :, :] x,   # IN  (A, C, B)
                  double[::1] mean,             # OUT (C,)
                  double[::1] m2):              # OUT (C,) sum of squared deviations
    """Per-channel mean and M2 of a view (overwrites mean and m2)."""
    cdef floating *kind = NULL
    cdef View xv
    cdef Grid g
    cdef double *part
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    xv = view_of(x)
    g = make_grid(x)
    part = <double *>scratch(partials_size(&g), sizeof(double), True)
    with nogil:
        grid_stats(&xv, &g, part, &mean[0], &m2[0], kind)
    free(part)


# ==========================================================================
# Normalize: y = (x - mean) * scale + shift

cdef void affine_task(const View *x, const View *y, const Grid *g, Py_ssize_t k, const floating *p,
                      const Act *act) noexcept nogil:
    """Task k of y = act((x - mean) * scale + shift); p holds 3 rows of C parameters (set_affine)."""
    cdef RowTile t
    cdef ColumnChunk h
    if g.columns:
        h = column_chunk(g, k)
        cols_affine(x, y, g, &h, p + h.c0, g.C, act)
    else:
        t = row_tile(g, k)
        group_affine(x, y, &t, p + t.c0, g.C, act)


cdef void grid_affine(const View *x, const View *y, const Grid *g, const floating *p, const Act *act) noexcept nogil:
    cdef Py_ssize_t k
    cdef int nt = n_threads(2 * g.R * g.C * sizeof(floating), g.tasks)
    if nt == 1:
        for k in range(g.tasks):
            affine_task(x, y, g, k, p, act)
    else:
        for k in prange(g.tasks, num_threads=nt, schedule="static"):
            affine_task(x, y, g, k, p, act)


cdef inline void set_affine(floating *p, Py_ssize_t C, Py_ssize_t c, double mean, double scale,
                            double shift) noexcept nogil:
    """Channel c's normalize parameters in p (rows: mu_hi, scale, shift less the rest of the mean)."""
    if floating is float:
        affine_params_f(mean, scale, shift, p + c, C)
    else:
        affine_params_d(mean, scale, shift, p + c, C)


def inference(const floating[:, :, :] x,     # IN  (A, C, B)
              floating[:, :, :] y,           # OUT (A, C, B); may be x itself
              const double[::1] mean,        # IN  (C,) running mean
              const double[::1] var,         # IN  (C,) running variance
              const double[::1] gamma,       # IN  (C,), or (0,) for ones
              const double[::1] beta,        # IN  (C,), or (0,) for zeros
              double eps,
              int act=0, double slope=0.0):  # activation code (cbn_loops.h), leaky-ReLU slope
    """y = act((x - mean) * (1 / sqrt(var + eps) * gamma) + beta), per channel."""
    cdef floating *kind = NULL
    cdef View xv, yv
    cdef Grid g
    cdef Act a = Act(act, slope)
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    xv = view_of(x)
    yv = view_of(y)
    g = make_grid(x)
    inference_views(&xv, &yv, &g, &mean[0], &var[0], &gamma[0] if gamma.shape[0] else NULL,
                    &beta[0] if beta.shape[0] else NULL, eps, &a, kind)


cdef int inference_views(const View *xv, const View *yv, const Grid *g, const double *mean, const double *var,
                         const double *gamma, const double *beta, double eps, const Act *a,
                         floating *kind) except -1:
    """inference() on views (gamma, beta NULL: ones and zeros)."""
    cdef Py_ssize_t C = g.C
    cdef floating *p = <floating *>scratch(3 * C, sizeof(floating), False)
    cdef double *v = <double *>scratch(2 * C, sizeof(double), False)  # the variance and invstd, not returned
    with nogil:
        memcpy(v, var, C * sizeof(double))
        finish_channels(0, C, C, 1.0, eps, gamma, beta, mean, v, v + C, p)
        grid_affine(xv, yv, g, p, a)
    free(v)
    free(p)
    return 0


cdef inline void finish_channels(Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t C, double count, double eps,
                                 const double *gamma, const double *beta, double *mean, double *var, double *invstd,
                                 floating *p) noexcept nogil:
    """Channels c0:c1: M2 in var becomes the biased variance, then invstd and the normalize parameters in p."""
    cdef const double *gam = gamma + c0 if gamma != NULL else NULL
    cdef const double *bet = beta + c0 if beta != NULL else NULL
    if floating is float:
        norm_params_f(c1 - c0, count, eps, mean + c0, var + c0, invstd + c0, gam, bet, p + c0, C)
    else:
        norm_params_d(c1 - c0, count, eps, mean + c0, var + c0, invstd + c0, gam, bet, p + c0, C)


cdef void train_group_task(const View *x, const View *y, const Grid *g, Py_ssize_t k, Py_ssize_t group, double eps,
                           const double *gamma, const double *beta, double *mean, double *var, double *invstd,
                           floating *p, const Act *act, floating *kind) noexcept nogil:
    """Channels k*group:(k+1)*group of the fused training forward: statistics, then y from cache.

    Writes the group's mean, var and invstd.
    """
    cdef RowTile t = whole_channels(g, k * group, min(k * group + group, g.C))
    group_stats(x, &t, &mean[t.c0], &var[t.c0], kind)
    finish_channels(t.c0, t.c1, g.C, <double>g.R, eps, gamma, beta, mean, var, invstd, p)
    group_affine(x, y, &t, p + t.c0, g.C, act)


def forward_train(const floating[:, :, :] x,   # IN  (A, C, B), A * B > 1
                  floating[:, :, :] y,         # OUT (A, C, B); may be x itself
                  const double[::1] gamma,     # IN  (C,), or (0,) for ones
                  const double[::1] beta,      # IN  (C,), or (0,) for zeros
                  double eps,
                  double[:, ::1] stats,        # OUT (3, C): mean, biased var, invstd
                  int act=0, double slope=0.0):  # activation code (cbn_loops.h), leaky-ReLU slope
    """Training forward: batch statistics, then y = act(normalized), in as few passes as fit."""
    cdef floating *kind = NULL
    cdef View xv, yv
    cdef Grid g
    cdef Act a = Act(act, slope)
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    xv = view_of(x)
    yv = view_of(y)
    g = make_grid(x)
    train_views(&xv, &yv, &g, &gamma[0] if gamma.shape[0] else NULL, &beta[0] if beta.shape[0] else NULL, eps,
                &stats[0, 0], &a, kind)


cdef int train_views(const View *xv, const View *yv, const Grid *g, const double *gamma, const double *beta,
                     double eps, double *stats, const Act *a, floating *kind) except -1:
    """forward_train() on views; stats: 3 rows of C doubles (gamma, beta NULL: ones and zeros)."""
    cdef Py_ssize_t C = g.C
    cdef double *mean = stats
    cdef double *var = stats + C
    cdef double *invstd = stats + 2 * C
    cdef Py_ssize_t group = fused_group(g, 1, sizeof(floating))
    cdef Py_ssize_t k, n_groups
    cdef floating *p
    cdef double *part
    cdef int nt
    p = <floating *>scratch(3 * C, sizeof(floating), False)
    try:
        if group:
            # fused: a group's blocks are read from memory once, then served from L2
            n_groups = (C + group - 1) // group
            nt = n_threads(2 * g.R * C * sizeof(floating), n_groups)
            with nogil:
                if nt == 1:
                    for k in range(n_groups):
                        train_group_task(xv, yv, g, k, group, eps, gamma, beta, mean, var, invstd, p, a, kind)
                else:
                    for k in prange(n_groups, num_threads=nt, schedule="static"):
                        train_group_task(xv, yv, g, k, group, eps, gamma, beta, mean, var, invstd, p, a, kind)
            return 0
        # no cache reuse possible: a statistics pass, then a normalize pass
        part = <double *>scratch(partials_size(g), sizeof(double), True)
        with nogil:
            grid_stats(xv, g, part, mean, var, kind)
            finish_channels(0, C, C, <double>g.R, eps, gamma, beta, mean, var, invstd, p)
            grid_affine(xv, yv, g, p, a)
        free(part)
    finally:
        free(p)
    return 0


# ==========================================================================
# Gradient

cdef void act_grad_task(const View *dy, const View *x, const View *dz, const Grid *g, Py_ssize_t k,
                        const floating *p, const Act *act) noexcept nogil:
    """Task k of dz = dy * act'(z), z = (x - mean) * scale + shift; p holds 3 rows of C (set_affine)."""
    cdef RowTile t
    cdef ColumnChunk h
    if g.columns:
        h = column_chunk(g, k)
        cols_act_grad(dy, x, dz, g, &h, p + h.c0, g.C, act)
    else:
        t = row_tile(g, k)
        group_act_grad(dy, x, dz, &t, p + t.c0, g.C, act)


def activation_grad(const floating[:, :, :] dy,   # IN  (A, C, B)
                    const floating[:, :, :] x,    # IN  (A, C, B)
                    floating[:, :, :] dz,         # OUT (A, C, B); may be dy itself
                    const double[::1] mean,       # IN  (C,)
                    const double[::1] scale,      # IN  (C,) gamma * invstd
                    const double[::1] shift,      # IN  (C,) beta
                    int act, double slope):
    """dz = dy * act'(z), the pre-activation z = (x - mean) * scale + shift recomputed from x."""
    cdef View dyv, xv, dzv
    cdef Grid g
    cdef floating *p
    cdef Py_ssize_t c, k, C = x.shape[1]
    cdef Act a = Act(act, slope)
    cdef int nt
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    dyv = view_of(dy)
    xv = view_of(x)
    dzv = view_of(dz)
    g = make_grid(x)
    p = <floating *>scratch(3 * C, sizeof(floating), False)
    nt = n_threads(3 * g.R * g.C * sizeof(floating), g.tasks)
    with nogil:
        for c in range(C):
            set_affine(p, C, c, mean[c], scale[c], shift[c])
        if nt == 1:
            for k in range(g.tasks):
                act_grad_task(&dyv, &xv, &dzv, &g, k, p, &a)
        else:
            for k in prange(g.tasks, num_threads=nt, schedule="static"):
                act_grad_task(&dyv, &xv, &dzv, &g, k, p, &a)
    free(p)


cdef void grad_sums_task(const View *dy, const View *x, const Grid *g, Py_ssize_t k, const double *mean,
                         double *part_dy, double *part_dy_xmu, const View *dz, const floating *pa, const Act *act,
                         floating *kind) noexcept nogil:
    """Task k's sum(dy) and sum(dy * (x - mean)) per channel into its partial slots.

    With an activation, dy is first taken through it (pa: set_affine's
    rows), into dz, and the sums are dz's.
    """
    cdef RowTile t
    cdef ColumnChunk h
    cdef double *s_dy
    cdef double *s_dy_xmu
    if g.columns:
        h = column_chunk(g, k)
        s_dy, s_dy_xmu = &part_dy[h.j * g.C + h.c0], &part_dy_xmu[h.j * g.C + h.c0]
        if act.code:
            cols_act_grad_sums(dy, x, dz, g, &h, pa + h.c0, g.C, act, &mean[h.c0], s_dy, s_dy_xmu)
        else:
            cols_grad_sums(dy, x, g, &h, &mean[h.c0], s_dy, s_dy_xmu, kind)
    else:
        t = row_tile(g, k)
        s_dy, s_dy_xmu = &part_dy[t.slot * g.C + t.c0], &part_dy_xmu[t.slot * g.C + t.c0]
        if act.code:
            group_act_grad_sums(dy, x, dz, &t, pa + t.c0, g.C, act, &mean[t.c0], s_dy, s_dy_xmu)
        else:
            group_grad_sums(dy, x, &t, &mean[t.c0], s_dy, s_dy_xmu, kind)


cdef void grid_grad_sums(const View *dy, const View *x, const Grid *g, double *part_dy, const double *mean,
                         double *sum_dy, double *sum_dy_xmu, const View *dz, const floating *pa, const Act *act,
                         floating *kind) noexcept nogil:
    """Per-channel sum(dy) and sum(dy * (x - mean)), partials added in a fixed order (through the
    activation ``act``, into dz, as grad_sums_task)."""
    cdef Py_ssize_t k, c, j, slots = g.nr if g.columns else g.na * g.nb
    cdef int nt = n_threads(2 * g.R * g.C * sizeof(floating), g.tasks)
    cdef double *part_dy_xmu = part_dy + slots * g.C
    cdef double s_dy, s_dy_xmu
    if nt == 1:
        for k in range(g.tasks):
            grad_sums_task(dy, x, g, k, mean, part_dy, part_dy_xmu, dz, pa, act, kind)
    else:
        for k in prange(g.tasks, num_threads=nt, schedule="static"):
            grad_sums_task(dy, x, g, k, mean, part_dy, part_dy_xmu, dz, pa, act, kind)
    for c in range(g.C):
        s_dy = 0
        s_dy_xmu = 0
        for j in range(slots):
            s_dy = s_dy + part_dy[j * g.C + c]
            s_dy_xmu = s_dy_xmu + part_dy_xmu[j * g.C + c]
        sum_dy[c] = s_dy
        sum_dy_xmu[c] = s_dy_xmu


cdef void grad_task(const View *dy, const View *x, const View *dx, const Grid *g, Py_ssize_t k,
                    const floating *p, const Act *relu) noexcept nogil:
    """Task k of dx = ((dy - dy_mean) - (x - mean) * c_xmu) * k_dy; p holds 4 rows of C (grad_params).

    ``relu`` (contiguous runs or rows): dy is taken through ReLU or leaky
    ReLU on the way, its slope recomputed from x (p then holds 6 rows:
    set_affine's scale and shift after the 4).
    """
    cdef RowTile t
    cdef ColumnChunk h
    if g.columns:
        h = column_chunk(g, k)
        if relu.code:
            cols_relu_grad(dy, x, dx, &h, p + h.c0, g.C, relu)
        else:
            cols_grad(dy, x, dx, g, &h, p + h.c0, g.C)
    else:
        t = row_tile(g, k)
        group_grad(dy, x, dx, &t, p + t.c0, g.C, relu)


cdef inline void cols_relu_grad(const View *dy, const View *x, const View *dx, const ColumnChunk *t,
                                const floating *p, Py_ssize_t ps, const Act *relu) noexcept nogil:
    cdef floating *kind = NULL
    cdef floating low = <floating>relu_low(relu)
    if floating is float:
        cols_relu_grad_f(chunk_at(dy, t, kind), dy.sa, chunk_at(x, t, kind), x.sa, chunk_at(dx, t, kind), dx.sa,
                         t.r1 - t.r0, t.c1 - t.c0, p, ps, low, dx.stream)
    else:
        cols_relu_grad_d(chunk_at(dy, t, kind), dy.sa, chunk_at(x, t, kind), x.sa, chunk_at(dx, t, kind), dx.sa,
                         t.r1 - t.r0, t.c1 - t.c0, p, ps, low, dx.stream)


cdef void grid_grad(const View *dy, const View *x, const View *dx, const Grid *g, const floating *p,
                    const Act *relu) noexcept nogil:
    cdef Py_ssize_t k
    cdef int nt = n_threads(3 * g.R * g.C * sizeof(floating), g.tasks)
    if nt == 1:
        for k in range(g.tasks):
            grad_task(dy, x, dx, g, k, p, relu)
    else:
        for k in prange(g.tasks, num_threads=nt, schedule="static"):
            grad_task(dy, x, dx, g, k, p, relu)


cdef inline void grad_params(Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t C, double count, const double *mean,
                             const double *invstd, const double *gamma, const double *sum_dy,
                             const double *sum_dy_xmu, floating *p) noexcept nogil:
    """Channels c0:c1's gradient coefficients in p (rows: mu_hi, dy_mean, c_xmu, k_dy; cbn_grad_coefs).

    dx = gamma * invstd * (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean)))
    """
    if floating is float:
        grad_params_f(c1 - c0, count, mean + c0, invstd + c0, gamma + c0, sum_dy + c0, sum_dy_xmu + c0, p + c0, C)
    else:
        grad_params_d(c1 - c0, count, mean + c0, invstd + c0, gamma + c0, sum_dy + c0, sum_dy_xmu + c0, p + c0, C)


cdef void backward_group_task(const View *dy, const View *x, const View *dx, const Grid *g, Py_ssize_t k,
                              Py_ssize_t group, const double *mean, const double *invstd, const double *gamma,
                              double *sum_dy, double *sum_dy_xmu, floating *p, const floating *pa, const Act *act,
                              const Act *relu, floating *kind) noexcept nogil:
    """Channels k*group:(k+1)*group of the fused gradient: sums over dy and x, then dx from cache.

    With an activation, dz = dy * act'(z) goes into the group's dx block first
    and takes dy's place, while the block is in cache; ``relu`` set (ReLU or
    leaky ReLU on contiguous runs): dz is not stored, the dx pass recomputes it.
    """
    cdef RowTile t = whole_channels(g, k * group, min(k * group + group, g.C))
    if relu.code:
        group_act_grad_sums(dy, x, NULL, &t, pa + t.c0, g.C, act, &mean[t.c0], &sum_dy[t.c0], &sum_dy_xmu[t.c0])
    elif act.code:
        group_act_grad_sums(dy, x, dx, &t, pa + t.c0, g.C, act, &mean[t.c0], &sum_dy[t.c0], &sum_dy_xmu[t.c0])
        dy = dx
    else:
        group_grad_sums(dy, x, &t, &mean[t.c0], &sum_dy[t.c0], &sum_dy_xmu[t.c0], kind)
    grad_params(t.c0, t.c1, g.C, <double>g.R, mean, invstd, gamma, sum_dy, sum_dy_xmu, p)
    group_grad(dy, x, dx, &t, p + t.c0, g.C, relu)


def backward(const floating[:, :, :] dy,   # IN  (A, C, B)
             const floating[:, :, :] x,    # IN  (A, C, B)
             floating[:, :, :] dx,         # OUT (A, C, B); may be dy, or x without an activation
             const double[:, ::1] stats,   # IN  (3 or 4, C): mean, invstd, gamma, beta (with an activation)
             double[:, ::1] sums,          # OUT (2, C): sum(dz), sum(dz * (x - mean))
             int act=0, double slope=0.0):
    """Training-mode gradient: per-channel sums, then dx, in as few passes as fit.

    With an activation the gradient is taken through it first, dz = dy *
    act'(z) with z = gamma * (x - mean) * invstd + beta recomputed from x,
    written into dx and read back from there (so dx must not be x).
    """
    cdef floating *kind = NULL
    cdef View dyv, xv, dxv
    cdef Grid g
    cdef Act a = Act(act, slope)
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    if act and stats.shape[0] < 4:
        raise ValueError("an activation needs beta: stats must have 4 rows")
    dyv = view_of(dy)
    xv = view_of(x)
    dxv = view_of(dx)
    g = make_grid(x)
    backward_views(&dyv, &xv, &dxv, &g, &stats[0, 0], &sums[0, 0], &a, kind)


cdef int backward_views(const View *dyv, const View *xv, const View *dx_view, const Grid *g, const double *stats,
                        double *sums, const Act *a, floating *kind) except -1:
    """backward() on views; stats: rows of C doubles (mean, invstd, gamma, and beta with an activation),
    sums: 2 rows of C."""
    cdef Py_ssize_t C = g.C
    cdef const double *mean = stats
    cdef const double *invstd = stats + C
    cdef const double *gamma = stats + 2 * C
    cdef double *sum_dy = sums
    cdef double *sum_dy_xmu = sums + C
    cdef View dxv = dx_view[0]
    cdef View dzv
    cdef floating *p
    cdef floating *pa = NULL
    cdef double *part
    cdef Py_ssize_t c, k, n_groups
    cdef Py_ssize_t group = fused_group(g, 2, sizeof(floating))
    cdef int nt
    cdef Act relu = Act(0, 0.0)  # set when the dx pass takes dy through ReLU itself
    # ReLU on contiguous runs or rows: dz is not stored but recomputed in the dx pass (no extra write,
    # and dx may stream)
    cdef bint recompute = (a.code == 1 or a.code == 2) and (
        dyv.sc == 1 and xv.sc == 1 and dxv.sc == 1 if g.columns else dyv.sb == 1 and xv.sb == 1 and dxv.sb == 1)
    memset(sums, 0, 2 * C * sizeof(double))
    p = <floating *>scratch((6 if a.code else 4) * C, sizeof(floating), False)  # rows 4, 5 for relu_grad
    try:
        if a.code:
            pa = <floating *>scratch(3 * C, sizeof(floating), False)
            for c in range(C):
                set_affine(pa, C, c, mean[c], gamma[c] * invstd[c], stats[3 * C + c])
        if recompute:
            relu = a[0]
            memcpy(p + 4 * C, pa + C, 2 * C * sizeof(floating))  # the slope's scale and shift rows
        if group:
            # fused: a group's dy and x blocks are read once, dx computed from L2
            dxv.stream = streams(g.R * C * <Py_ssize_t>sizeof(floating), 3)
            if a.code and not recompute:  # dz fills dx's block first: streaming dx would write those lines twice
                dxv.stream = False
            n_groups = (C + group - 1) // group
            nt = n_threads(3 * g.R * C * sizeof(floating), n_groups)
            with nogil:
                if nt == 1:
                    for k in range(n_groups):
                        backward_group_task(dyv, xv, &dxv, g, k, group, mean, invstd, gamma, sum_dy, sum_dy_xmu,
                                            p, pa, a, &relu, kind)
                else:
                    for k in prange(n_groups, num_threads=nt, schedule="static"):
                        backward_group_task(dyv, xv, &dxv, g, k, group, mean, invstd, gamma, sum_dy, sum_dy_xmu,
                                            p, pa, a, &relu, kind)
            return 0
        part = <double *>scratch(partials_size(g), sizeof(double), True)
        with nogil:
            grid_grad_sums(dyv, xv, g, part, mean, sum_dy, sum_dy_xmu, NULL if recompute else &dxv, pa, a, kind)
            # the sums pass left dz in dx: the gradient is dz's
            dzv = dxv if a.code and not recompute else dyv[0]
            grad_params(0, C, C, <double>g.R, mean, invstd, gamma, sum_dy, sum_dy_xmu, p)
            grid_grad(&dzv, xv, &dxv, g, p, &relu)
        free(part)
    finally:
        free(p)
        free(pa)
    return 0


def backward_reduce(const floating[:, :, :] dy,   # IN  (A, C, B)
                    const floating[:, :, :] x,    # IN  (A, C, B)
                    const double[::1] mean,       # IN  (C,)
                    double[::1] sum_dy,           # OUT (C,)
                    double[::1] sum_dy_xmu):      # OUT (C,)
    """sum_dy[c] = sum(dy); sum_dy_xmu[c] = sum(dy * (x - mean[c])) (overwritten)."""
    cdef floating *kind = NULL
    cdef Act no_act = Act(0, 0.0)
    cdef View dyv, xv
    cdef Grid g
    cdef double *part
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    dyv = view_of(dy)
    xv = view_of(x)
    g = make_grid(x)
    part = <double *>scratch(partials_size(&g), sizeof(double), True)
    with nogil:
        grid_grad_sums(&dyv, &xv, &g, part, &mean[0], &sum_dy[0], &sum_dy_xmu[0], NULL, NULL, &no_act, kind)
    free(part)


def backward_elemt(const floating[:, :, :] dy,   # IN  (A, C, B)
                   const floating[:, :, :] x,    # IN  (A, C, B)
                   floating[:, :, :] dx,         # OUT (A, C, B); may be dy or x
                   const double[:, ::1] coef):   # IN  (4, C): mean, dy_mean, c_xmu, k_dy
    """dx = ((dy - dy_mean) - (x - mean) * c_xmu) * k_dy, per channel."""
    cdef Act no_act = Act(0, 0.0)
    cdef View dyv, xv, dxv
    cdef Grid g
    cdef floating *p
    cdef Py_ssize_t c, C = x.shape[1]
    if x.shape[0] * x.shape[1] * x.shape[2] == 0:
        return
    dyv = view_of(dy)
    xv = view_of(x)
    dxv = view_of(dx)
    g = make_grid(x)
    p = <floating *>scratch(4 * C, sizeof(floating), False)
    with nogil:
        for c in range(C):
            if floating is float:
                grad_coefs_f(coef[0, c], coef[1, c], coef[2, c], coef[3, c], p + c, C)
            else:
                grad_coefs_d(coef[0, c], coef[1, c], coef[2, c], coef[3, c], p + c, C)
        grid_grad(&dyv, &xv, &dxv, &g, p, &no_act)
    free(p)


# ==========================================================================
# The common call on plain NumPy arrays, without memoryviews

include "_plain.pxi"


# ==========================================================================
# Merging packed partials (cbn.distributed's MPI operation)

def merge_packed(const double[::1] a, double[::1] b, Py_ssize_t channels):
    """b = Chan merge of a and b, rows of packed partials [n, mean (C), m2 (C)].

    Symmetric bit for bit (merging a into b or b into a gives the same
    bits), so every rank of an MPI reduction tree ends with the same result;
    an empty side leaves the other unchanged.
    """
    cdef Py_ssize_t width = 2 * channels + 1
    cdef Py_ssize_t row, c, rows
    cdef const double *pa
    cdef double *pb
    cdef double na, nb, n, w, delta
    if a.shape[0] != b.shape[0] or a.shape[0] % width:
        raise ValueError(f"packed partials of {channels} channels must be rows of {width} values")
    rows = a.shape[0] // width
    with nogil:
        for row in range(rows):
            pa = &a[row * width]
            pb = &b[row * width]
            na, nb = pa[0], pb[0]
            if na == 0:
                continue
            if nb == 0:
                for c in range(width):
                    pb[c] = pa[c]
                continue
            n = na + nb
            w = na * nb / n
            for c in range(1, channels + 1):
                delta = pa[c] - pb[c]
                pb[channels + c] = (pa[channels + c] + pb[channels + c]) + delta * delta * w
                pb[c] = (na * pa[c] + nb * pb[c]) / n
            pb[0] = n


# ==========================================================================
# Runtime information

def max_threads():
    """Threads a parallel kernel may use now (OMP_NUM_THREADS, threadpoolctl)."""
    return omp_get_max_threads()


def openmp_info():
    """(OpenMP spec date as int, runtime library path); (0, 'none') if off."""
    return CBN_OPENMP_VERSION, cbn_openmp_library().decode("utf-8", "replace")


def stream_bytes(Py_ssize_t nbytes=-2):
    """Size from which outputs are written with non-temporal stores; -1: never.

    Returns the setting; a value other than -2 replaces it (the tests use
    this to run both store paths on small arrays)."""
    global STREAM_BYTES
    if nbytes != -2:
        if nbytes < -1:
            raise ValueError(f"stream_bytes: nbytes must be >= -1, got {nbytes}")
        STREAM_BYTES = nbytes
    return STREAM_BYTES


def has_stream_stores():
    """Whether this build has non-temporal stores (x86-64, GCC or Clang)."""
    return bool(CBN_HAVE_STREAM)
