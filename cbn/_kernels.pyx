# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""Batch-normalization kernels on 3-D views ``x[a, c, b]``.

The Python layer (``cbn._layout``) turns every input into views of shape
(A, C, B): ``c`` runs over the channels and (a, b) over the values that share
a channel, with any strides.  Bulk arrays are float32 or float64 (one
``cython.floating`` kernel per operation); per-channel arrays are float64, and
every sum is accumulated in float64.

The work is cut into tiles whose extents depend only on (A, C, B), never on
the thread count, and the partial sums of the tiles are added in tile order:
results are bitwise identical for any number of threads.

Reductions *add* into their ``acc`` arguments, so a view that has to be
visited in several pieces (see ``cbn._layout``) is reduced by calling the
kernel once per piece, in a fixed order.
"""
import numpy as np

from cython cimport floating
from cython.parallel cimport prange

cdef extern from "cbn_openmp.h":
    int omp_get_max_threads() noexcept nogil
    int CBN_OPENMP_VERSION
    const char *cbn_openmp_library() noexcept

# Elements per tile: large enough to amortise the per-tile bookkeeping,
# small enough to give two threads work even for a few MB of data.
cdef Py_ssize_t TILE = 16384
# Below this many elements a parallel region costs more than it saves.
cdef Py_ssize_t SERIAL_BELOW = 1 << 16


cdef struct Tiling:
    Py_ssize_t A, C, B       # extents of the view
    Py_ssize_t ta, tc, tb    # extents of one tile
    Py_ssize_t na, nc, nb    # number of tiles along each axis


cdef struct Tile:
    Py_ssize_t a0, a1, c0, c1, b0, b1
    Py_ssize_t row           # row of the partial-sum buffer this tile fills


cdef inline Py_ssize_t ceil_div(Py_ssize_t n, Py_ssize_t d) noexcept nogil:
    return (n + d - 1) // d


cdef Tiling make_tiling(Py_ssize_t A, Py_ssize_t C, Py_ssize_t B) noexcept nogil:
    cdef Tiling t
    t.A = A
    t.C = C
    t.B = B
    t.tb = max(1, min(B, TILE))
    t.tc = max(1, min(C, TILE // t.tb))
    t.ta = max(1, min(A, TILE // (t.tb * t.tc)))
    t.na = ceil_div(A, t.ta)
    t.nc = ceil_div(C, t.tc)
    t.nb = ceil_div(B, t.tb)
    return t


cdef inline Tile tile_at(const Tiling *t, Py_ssize_t k) noexcept nogil:
    cdef Tile s
    cdef Py_ssize_t ia = k // (t.nc * t.nb)
    cdef Py_ssize_t ic = (k // t.nb) % t.nc
    cdef Py_ssize_t ib = k % t.nb
    s.a0 = ia * t.ta
    s.a1 = min(s.a0 + t.ta, t.A)
    s.c0 = ic * t.tc
    s.c1 = min(s.c0 + t.tc, t.C)
    s.b0 = ib * t.tb
    s.b1 = min(s.b0 + t.tb, t.B)
    s.row = ia * t.nb + ib
    return s


cdef inline Py_ssize_t n_tiles(const Tiling *t) noexcept nogil:
    return t.na * t.nc * t.nb


cdef int n_threads(const Tiling *t) noexcept nogil:
    if t.A * t.C * t.B < SERIAL_BELOW or n_tiles(t) < 2:
        return 1
    return <int>min(<Py_ssize_t>omp_get_max_threads(), n_tiles(t))


cdef object partial_buffer(const Tiling *t):
    """One row of per-channel partial sums per (a, b) tile position."""
    return np.zeros((t.na * t.nb, t.C), dtype=np.float64)


cdef void add_partials(const double[:, ::1] part, double[::1] acc) noexcept nogil:
    """acc[c] += sum of part[:, c], rows added in order (the fixed combine)."""
    cdef Py_ssize_t p, c
    for p in range(part.shape[0]):
        for c in range(part.shape[1]):
            acc[c] += part[p, c]


# --------------------------------------------------------------------------
# Statistics

def channel_sums(const floating[:, :, :] x,    # IN  (A, C, B)
                 double[::1] acc):             # OUT (C,), added to
    """acc[c] += sum of x[:, c, :]."""
    cdef Tiling t = make_tiling(x.shape[0], x.shape[1], x.shape[2])
    cdef double[:, ::1] part = partial_buffer(&t)
    cdef Py_ssize_t k, a, c, b
    cdef Tile s
    cdef double total
    with nogil:
        for k in prange(n_tiles(&t), num_threads=n_threads(&t), schedule="static"):
            s = tile_at(&t, k)
            for a in range(s.a0, s.a1):
                for c in range(s.c0, s.c1):
                    total = 0.0
                    for b in range(s.b0, s.b1):
                        total = total + x[a, c, b]
                    part[s.row, c] += total
        add_partials(part, acc)


def channel_deviations(const floating[:, :, :] x,   # IN  (A, C, B)
                       const double[::1] mean,      # IN  (C,)
                       double[::1] acc_dev,         # OUT (C,), added to
                       double[::1] acc_sq):         # OUT (C,), added to
    """acc_dev[c] += sum(x - mean[c]); acc_sq[c] += sum((x - mean[c])**2).

    The second pass of the two-pass variance.  acc_dev is zero up to
    rounding; it feeds the correction term of the "corrected two-pass"
    algorithm (Chan, Golub & LeVeque 1983).
    """
    cdef Tiling t = make_tiling(x.shape[0], x.shape[1], x.shape[2])
    cdef double[:, ::1] part_dev = partial_buffer(&t)
    cdef double[:, ::1] part_sq = partial_buffer(&t)
    cdef Py_ssize_t k, a, c, b
    cdef Tile s
    cdef double d, mu, dev, sq
    with nogil:
        for k in prange(n_tiles(&t), num_threads=n_threads(&t), schedule="static"):
            s = tile_at(&t, k)
            for a in range(s.a0, s.a1):
                for c in range(s.c0, s.c1):
                    mu = mean[c]
                    dev = 0.0
                    sq = 0.0
                    for b in range(s.b0, s.b1):
                        d = x[a, c, b] - mu
                        dev = dev + d
                        sq = sq + d * d
                    part_dev[s.row, c] += dev
                    part_sq[s.row, c] += sq
        add_partials(part_dev, acc_dev)
        add_partials(part_sq, acc_sq)


# --------------------------------------------------------------------------
# Elementwise passes

def normalize(const floating[:, :, :] x,     # IN  (A, C, B)
              floating[:, :, :] y,           # OUT (A, C, B); may be x itself
              const double[::1] mean,        # IN  (C,)
              const double[::1] scale,       # IN  (C,) gamma * invstd
              const double[::1] shift):      # IN  (C,) beta
    """y = (x - mean) * scale + shift, per channel.

    The centred form, not the folded ``x * scale + (shift - mean * scale)``:
    the folded one cancels catastrophically when |mean| >> std
    (pytorch#5410), and a constant channel must give exactly ``shift``.
    """
    cdef Tiling t = make_tiling(x.shape[0], x.shape[1], x.shape[2])
    cdef Py_ssize_t k, a, c, b
    cdef Tile s
    cdef double mu, sc, sh
    with nogil:
        for k in prange(n_tiles(&t), num_threads=n_threads(&t), schedule="static"):
            s = tile_at(&t, k)
            for a in range(s.a0, s.a1):
                for c in range(s.c0, s.c1):
                    mu = mean[c]
                    sc = scale[c]
                    sh = shift[c]
                    for b in range(s.b0, s.b1):
                        y[a, c, b] = <floating>((x[a, c, b] - mu) * sc + sh)


# --------------------------------------------------------------------------
# Gradient

def backward_reduce(const floating[:, :, :] dy,   # IN  (A, C, B)
                    const floating[:, :, :] x,    # IN  (A, C, B)
                    const double[::1] mean,       # IN  (C,)
                    double[::1] acc_dy,           # OUT (C,), added to
                    double[::1] acc_dy_xmu):      # OUT (C,), added to
    """acc_dy[c] += sum(dy); acc_dy_xmu[c] += sum(dy * (x - mean[c]))."""
    cdef Tiling t = make_tiling(x.shape[0], x.shape[1], x.shape[2])
    cdef double[:, ::1] part_dy = partial_buffer(&t)
    cdef double[:, ::1] part_dy_xmu = partial_buffer(&t)
    cdef Py_ssize_t k, a, c, b
    cdef Tile s
    cdef double g, mu, sum_dy, sum_dy_xmu
    with nogil:
        for k in prange(n_tiles(&t), num_threads=n_threads(&t), schedule="static"):
            s = tile_at(&t, k)
            for a in range(s.a0, s.a1):
                for c in range(s.c0, s.c1):
                    mu = mean[c]
                    sum_dy = 0.0
                    sum_dy_xmu = 0.0
                    for b in range(s.b0, s.b1):
                        g = dy[a, c, b]
                        sum_dy = sum_dy + g
                        sum_dy_xmu = sum_dy_xmu + g * (x[a, c, b] - mu)
                    part_dy[s.row, c] += sum_dy
                    part_dy_xmu[s.row, c] += sum_dy_xmu
        add_partials(part_dy, acc_dy)
        add_partials(part_dy_xmu, acc_dy_xmu)


def backward_elemt(const floating[:, :, :] dy,   # IN  (A, C, B)
                   const floating[:, :, :] x,    # IN  (A, C, B)
                   floating[:, :, :] dx,         # OUT (A, C, B); may be dy or x
                   const double[::1] mean,       # IN  (C,)
                   const double[::1] k_dy,       # IN  (C,)
                   const double[::1] k_xmu,      # IN  (C,)
                   const double[::1] k_const):   # IN  (C,)
    """dx = dy * k_dy - (x - mean) * k_xmu - k_const, per channel."""
    cdef Tiling t = make_tiling(x.shape[0], x.shape[1], x.shape[2])
    cdef Py_ssize_t k, a, c, b
    cdef Tile s
    cdef double mu, kd, kx, k0
    with nogil:
        for k in prange(n_tiles(&t), num_threads=n_threads(&t), schedule="static"):
            s = tile_at(&t, k)
            for a in range(s.a0, s.a1):
                for c in range(s.c0, s.c1):
                    mu = mean[c]
                    kd = k_dy[c]
                    kx = k_xmu[c]
                    k0 = k_const[c]
                    for b in range(s.b0, s.b1):
                        dx[a, c, b] = <floating>(
                            dy[a, c, b] * kd - (x[a, c, b] - mu) * kx - k0)


# --------------------------------------------------------------------------
# Runtime information

def max_threads():
    """Threads a parallel kernel may use now (OMP_NUM_THREADS, threadpoolctl)."""
    return omp_get_max_threads()


def openmp_info():
    """(OpenMP spec date as int, runtime library path); (0, 'none') if off."""
    return CBN_OPENMP_VERSION, cbn_openmp_library().decode("utf-8", "replace")
