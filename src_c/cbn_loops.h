/* cbn's inner loops, instantiated for float and double from cbn_loops_t.h.
 *
 * Each loop walks one run of values with a stride (1 takes a vectorized
 * path).  On x86-64 Linux with GCC or Clang they are compiled three times,
 * for AVX-512, AVX2 and the baseline, and the loader picks the best the CPU
 * has (target_clones); wheels stay portable and need no -march flag.
 * Reductions use CBN_LANES independent accumulators summed in a fixed tree,
 * and the extension is built with -ffp-contract=off, so every clone gives
 * the same bits.
 */
#ifndef CBN_LOOPS_H
#define CBN_LOOPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cbn_stream.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(CBN_NO_CLONES)
#define CBN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CBN_CLONES
#endif

/* Before each lane loop (j over CBN_LANES, accumulators per lane): kept rolled, GCC's loop
 * vectorizer takes it a vector of lanes at a time, each lane's additions in their order.  Unrolled
 * first (GCC's default for 16 iterations), the loop vectorizer worked across the loop around it,
 * into a mess of permutes for double; left to the SLP vectorizer alone instead, the double lanes
 * came out partly scalar (a sum of dy, 16 vaddsd per 16 values; ReLU's sums, with a branch on the
 * sign of z). */
#if defined(__GNUC__) && !defined(__clang__)
#define CBN_ROLLED _Pragma("GCC unroll 1")
#else
#define CBN_ROLLED
#endif

#if defined(_MSC_VER)
#define CBN_RESTRICT __restrict
#else
#define CBN_RESTRICT restrict
#endif

/* Helpers of the cloned loops must be inlined into them: an out-of-line copy is compiled for the
 * baseline instruction set only, and an exp called per value runs 100x slower than inlined. */
#if defined(__GNUC__)
#define CBN_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define CBN_INLINE static __forceinline
#else
#define CBN_INLINE static inline
#endif

#define CBN_LANES 16
/* the first values of n that whole vectors of any width cover; the rest is a scalar tail */
#define CBN_VECTOR_PART(n) ((n) - (n) % CBN_LANES)
/* channels whose accumulators a column-mode sum keeps at a time: whole rows up to 4 KiB of float32
 * (2 or 3 arrays of 8 KiB stay in L1); strips of 256 channels took 8-16 % longer on 4096x1024 */
#define CBN_COLS 1024
/* The column sums read CBN_ROWS rows per load and store of their accumulators (each channel's
 * additions in the same order as a row at a time) where rows lie a page apart or more, or are short
 * enough that CBN_ROWS of them span at most 1 KiB.  A row at a time, the accumulators' loads and
 * stores bound the loop where a 512-bit store takes two cycles (AMD Zen 4: NC 4096x1024 training
 * 0.76-0.85, backward 0.86 of the time; NHWC 100352x64 training 0.71-0.85).  Rows of 512 B to 2 KiB
 * read interleaved defeat the hardware prefetchers: they took up to 1.7x as long, with software
 * prefetches too.  That is memory's effect: arrays small enough to be in cache take CBN_ROWS rows
 * at a time at any distance (the loops' `cached`). */
#define CBN_ROWS 4
static inline int cbn_rows_at_once(ptrdiff_t da, ptrdiff_t xa, size_t size)
{
    const ptrdiff_t d = da * (ptrdiff_t)size, x = xa * (ptrdiff_t)size;
    return (d >= 4096 && x >= 4096) || (d > 0 && x > 0 && d * CBN_ROWS <= 1024 && x * CBN_ROWS <= 1024);
}
/* (mean - hi) * a, the rest of a mean beyond its nearest value hi in the element type, times a
 * factor, to fold into a shift; 0 where that is not finite (an infinite factor, from an infinite
 * gradient: a rest of 0 times it would make the shift NaN, where the reference keeps inf) */
static inline double cbn_rest_times(double mean, double hi, double a)
{
    const double r = (mean - hi) * a;
    return isfinite(r) ? r : 0.0;
}
/* channels whose accumulators a row-mode sum keeps at a time */
#define CBN_CHANNELS 16
/* A sum over short runs (up to 2 KiB) takes a channel's runs of CBN_RUNS rows in one call: loading
 * and storing the lane accumulators costs as much as a run of a few vectors (AMD Zen 4, runs of 49
 * to 256 values: 0.78-0.97 of the time).  Longer runs go one row at a time, in memory order (runs of
 * 12-64 KiB 4 rows at a time took 1.01-1.05x as long). */
#define CBN_RUNS 4
static inline ptrdiff_t cbn_runs_at_once(ptrdiff_t n, size_t size)
{
    return n * (ptrdiff_t)size <= 2048 ? CBN_RUNS : 1;
}


/* Sum of acc[0:CBN_LANES] in a fixed pairwise order. */
CBN_INLINE double cbn_tree_sum(const double *acc)
{
    double s8[8], s4[4];
    for (int j = 0; j < 8; j++)
        s8[j] = acc[j] + acc[j + 8];
    for (int j = 0; j < 4; j++)
        s4[j] = s8[j] + s8[j + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* Statistics in one pass: the sums d = sum(x - k) and q = sum((x - k)**2) of count values give
 * mean = k + d / count and M2 = q - d**2 / count.  The subtraction cancels when k lies far from
 * the mean (by at most a factor count when k is one of the values); the shift holds when that
 * costs at most 4 bits, d**2 / count <= 16 M2 (NaN: it does not). */
CBN_INLINE int cbn_shift_holds(double count, double d, double q)
{
    double c2 = d * d / count;
    return c2 <= 16 * (q - c2);
}

CBN_INLINE void cbn_centre(double count, double k, double d, double q, double *mean, double *m2)
{
    double q_centred = q - d * d / count;
    *mean = k + d / count;
    *m2 = q_centred > 0 ? q_centred : 0.0;
}

/* A channel's sum over its runs (row mode): lane accumulators, and a scalar for the values after
 * whole vectors */
typedef struct {
    double lane[CBN_LANES];
    double tail;
} cbn_acc;

CBN_INLINE double cbn_acc_total(const cbn_acc *a) { return cbn_tree_sum(a->lane) + a->tail; }

/* sum_dy[c] += and sum_dy_xmu[c] += the totals of accumulators acc_dy[c] and acc_dy_xmu[c], c < w */
CBN_INLINE void cbn_add_totals(const cbn_acc *acc_dy, const cbn_acc *acc_dy_xmu, ptrdiff_t w, double *sum_dy,
                               double *sum_dy_xmu)
{
    for (ptrdiff_t c = 0; c < w; c++) {
        sum_dy[c] += cbn_acc_total(&acc_dy[c]);
        sum_dy_xmu[c] += cbn_acc_total(&acc_dy_xmu[c]);
    }
}

/* Per channel c of C: mean[c] and M2 m2[c] of `slots` partials, slot j holding counts[j] values of
 * every channel with mean part_mean[j * C + c] and M2 part_m2[j * C + c]; merged in slot order with
 * Chan, Golub & LeVeque's update, whose weights all channels share (so the loop over channels has
 * no division and vectorizes). */
CBN_CLONES static void cbn_merge_slots(ptrdiff_t slots, ptrdiff_t C, const double *counts,
                                       const double *CBN_RESTRICT part_mean, const double *CBN_RESTRICT part_m2,
                                       double *CBN_RESTRICT mean, double *CBN_RESTRICT m2)
{
    double n = 0;
    for (ptrdiff_t c = 0; c < C; c++)
        mean[c] = m2[c] = 0;
    for (ptrdiff_t j = 0; j < slots; j++) {
        double nb = counts[j];
        if (nb == 0)
            continue;
        double total = n + nb, w_mean = nb / total, w_m2 = n * nb / total;
        const double *mb = part_mean + j * C, *m2b = part_m2 + j * C;
        for (ptrdiff_t c = 0; c < C; c++) {
            double delta = mb[c] - mean[c];
            mean[c] += delta * w_mean;
            m2[c] += m2b[c] + delta * delta * w_m2;
        }
        n = total;
    }
}

/* Activations fused into the elementwise passes (codes shared with _kernels.pyx). */
enum { CBN_IDENTITY = 0, CBN_RELU = 1, CBN_LEAKY_RELU = 2, CBN_SIGMOID = 3, CBN_TANH = 4 };


/* exp without a library call, so that the activation loops vectorize:
 * x = k ln2 + r (Cody-Waite), exp(r) by its Taylor polynomial, 2^k built in
 * the exponent bits (k is read from the low bits of x / ln2 + 1.5 * 2^p).
 * Arguments are clamped to where the result is a normal number; sigmoid built
 * on it is within 4 ulp and tanh within 2 ulp of 1 over [-87, 88] and [-708,
 * 709] (tests/test_activations.py; tests/activation_accuracy.py measures 3.0
 * and 1.7 in float32, 2.7 and 1.5 in float64). */
CBN_INLINE float cbn_exp_f(float x)
{
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f + 12582912.0f;
    float k = t - 12582912.0f;
    float r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    /* Estrin's scheme, not Horner's: as many operations, a chain of 8 dependent ones instead of 12
     * (sigmoid and tanh: 0.94-0.99 of the time, AMD Zen 4); 1 added last, to r's sum,
     * as Horner did: (1 + r) first rounds once more (sigmoid's mean error 0.34 ulp, not 0.31) */
    float r2 = r * r;
    float p = 1.0f + (r + r2 * ((0.5f + r * 1.6666667e-1f) + r2 * ((4.1666668e-2f + r * 8.3333338e-3f)
              + r2 * 1.3888889e-3f)));
    int32_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (int32_t)((uint32_t)(bits + 127) << 23);
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

CBN_INLINE double cbn_exp_d(double x)
{
    x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    double t = x * 1.4426950408889634 + 6755399441055744.0;
    double k = t - 6755399441055744.0;
    double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    /* Estrin's scheme as in cbn_exp_f: 25 operations in a chain of 10, against Horner's 24 in a
     * chain of 24 (sigmoid and tanh: 0.86-0.97 of the time, AMD Zen 4) */
    double r2 = r * r, r4 = r2 * r2;
    double a = (1.0 / 2 + r * (1.0 / 6)) + r2 * (1.0 / 24 + r * (1.0 / 120));
    double b = (1.0 / 720 + r * (1.0 / 5040)) + r2 * (1.0 / 40320 + r * (1.0 / 362880));
    double c = (1.0 / 3628800 + r * (1.0 / 39916800)) + r2 * (1.0 / 479001600);
    double p = 1.0 + (r + r2 * (a + r4 * (b + r4 * c)));
    int64_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (int64_t)((uint64_t)(bits + 1023) << 52);
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* tanh(v) = 1 - 2 / (exp(2 v) + 1): right at both ends, absolute error ~1 ulp of 1 near 0 */
CBN_INLINE float cbn_tanh_f(float v) { return 1.0f - 2.0f / (cbn_exp_f(2.0f * v) + 1.0f); }
CBN_INLINE double cbn_tanh_d(double v) { return 1.0 - 2.0 / (cbn_exp_d(2.0 * v) + 1.0); }

/* The activation loops, written out once for both element types (CBN_T and
 * CBN_FN are those of the instance being compiled).  The switch stays
 * outside the loops, so that each loop vectorizes; V, DY, Z and OUT are
 * expressions in the loop index i. */

/* The slope of ReLU (low = 0) or leaky ReLU (low = its slope) at z: a choice between two
 * constants, which vectorizes, times dy as in the reference (an inf or NaN dy stays non-finite). */
#define CBN_RELU_SLOPE(Z, low) ((Z) > 0 ? (CBN_T)1 : (low))

/* STMT for i in [0, n), with slope_ = CBN_RELU_SLOPE(Z, low), ReLU's (low = 0) or leaky ReLU's
 * slope at z; the scalar tail takes the slope from a table, the same value without a branch (on the
 * sign of z, which mispredicts) */
#define CBN_SLOPE_EACH(n, low, Z, STMT)                                                             \
    do {                                                                                            \
        const CBN_T slope_of_[2] = {(low), (CBN_T)1};                                               \
        ptrdiff_t i = 0;                                                                            \
        for (; i < CBN_VECTOR_PART(n); i++) {                                                       \
            const CBN_T slope_ = CBN_RELU_SLOPE(Z, low);                                            \
            STMT;                                                                                   \
        }                                                                                           \
        for (; i < (n); i++) {                                                                      \
            const CBN_T slope_ = slope_of_[(Z) > 0];                                                \
            STMT;                                                                                   \
        }                                                                                           \
    } while (0)

/* OUT = V * CBN_RELU_SLOPE(Z, low) for i in [0, n) */
#define CBN_SLOPE_LOOP(n, low, V, Z, OUT) CBN_SLOPE_EACH(n, low, Z, OUT = (V) * slope_)

/* W = ((Q * relu'(z) - DY_MEAN) - t * C_XMU) * K_DY for i in [0, n), where t = U - MU_HI and
 * z = t * SCALE + SHIFT: the gradient through ReLU (low = 0) or leaky ReLU (low = slope), with dz
 * recomputed from x as the sums pass computed it (the same bits as storing it) */
#define CBN_RELU_GRAD_LOOP(n, low, W, Q, U, MU_HI, DY_MEAN, C_XMU, K_DY, SCALE, SHIFT)              \
    CBN_SLOPE_EACH(n, low, ((U) - (MU_HI)) * (SCALE) + (SHIFT),                                     \
                   W = (((Q) * slope_ - (DY_MEAN)) - ((U) - (MU_HI)) * (C_XMU)) * (K_DY))

/* OUT = act(Z) for i in [0, n); ReLU and leaky ReLU in the same loop as Z */
#define CBN_ACTIVATE_LOOPS(n, act, slope, OUT, Z)                                                   \
    do {                                                                                            \
    switch (act) {                                                                                  \
    case CBN_RELU:                                                                                  \
        for (ptrdiff_t i = 0; i < (n); i++) {                                                       \
            CBN_T z_ = (Z);                                                                         \
            OUT = z_ < 0 ? (CBN_T)0 : z_; /* NaN stays NaN, as max(z, 0) in the reference */      \
        }                                                                                           \
        break;                                                                                      \
    case CBN_LEAKY_RELU: /* z * slope(z): z itself where z > 0 (z * 1 is z) */                  \
        CBN_SLOPE_LOOP(n, slope, Z, Z, OUT);                                                        \
        break;                                                                                      \
    case CBN_SIGMOID: /* in a loop of its own: fused with Z's, the exponential ran slower */    \
        for (ptrdiff_t i = 0; i < (n); i++)                                                         \
            OUT = (Z);                                                                              \
        for (ptrdiff_t i = 0; i < (n); i++)                                                         \
            OUT = (CBN_T)1 / ((CBN_T)1 + CBN_FN(cbn_exp)(-(OUT)));                                  \
        break;                                                                                      \
    case CBN_TANH:                                                                                  \
        for (ptrdiff_t i = 0; i < (n); i++)                                                         \
            OUT = (Z);                                                                              \
        for (ptrdiff_t i = 0; i < (n); i++)                                                         \
            OUT = CBN_FN(cbn_tanh)(OUT);                                                            \
        break;                                                                                      \
    default:                                                                                        \
        for (ptrdiff_t i = 0; i < (n); i++)                                                         \
            OUT = (Z);                                                                              \
    }                                                                                               \
    } while (0)

/* OUT = DY * act'(Z) for i in [0, n), Z the pre-activation */
#define CBN_ACT_GRAD_LOOPS(n, act, slope, DY, Z, OUT)                                               \
    do {                                                                                            \
    switch (act) {                                                                                  \
    case CBN_RELU:                                                                                  \
        CBN_SLOPE_LOOP(n, (CBN_T)0, DY, Z, OUT);                                                    \
        break;                                                                                      \
    case CBN_LEAKY_RELU:                                                                            \
        CBN_SLOPE_LOOP(n, slope, DY, Z, OUT);                                                       \
        break;                                                                                      \
    case CBN_SIGMOID:                                                                               \
        for (ptrdiff_t i = 0; i < (n); i++) {                                                       \
            CBN_T a_ = (CBN_T)1 / ((CBN_T)1 + CBN_FN(cbn_exp)(-(Z)));                               \
            OUT = (DY) * a_ * ((CBN_T)1 - a_);                                                      \
        }                                                                                           \
        break;                                                                                      \
    case CBN_TANH:                                                                                  \
        for (ptrdiff_t i = 0; i < (n); i++) {                                                       \
            CBN_T a_ = CBN_FN(cbn_tanh)(Z);                                                         \
            OUT = (DY) * ((CBN_T)1 - a_ * a_);                                                      \
        }                                                                                           \
        break;                                                                                      \
    default:                                                                                        \
        for (ptrdiff_t i = 0; i < (n); i++)                                                         \
            OUT = (DY);                                                                             \
    }                                                                                               \
    } while (0)

/* Streamed output (cbn_stream.h): the statements after `row` compute the k values of row `row` that
 * start at index i0 into w, a buffer in L1 that cbn_stream_copy then moves to OUT + row * oa + i0 with
 * non-temporal stores; the same bits as storing them directly.  Rows that follow each other in memory
 * (oa == n) are one run of m * n values, cut into chunks that end on line boundaries of the output and
 * may span rows, so that only the run's first and last lines are partial (a partial line is stored
 * plainly, and costs a read of memory); other rows are cut chunk by chunk, each row its own run.  The
 * column loops take narrow rows through CBN_FLAT_CHUNKS instead.
 * Runs too short to fill a few whole lines are written directly.  The calling function ends with one
 * cbn_stream_fence() after its last CBN_STREAM_ROWS (a fence per row costs).
 * align, for rows that follow each other: the buffer is shifted so that the chunk's first row start
 * is on a line boundary of it (not where the output has it: NumPy's large arrays start 16 bytes past
 * one), so that the loop over that row stores whole lines into the buffer, and cbn_stream_copy loads
 * across lines instead.  The column loops (a parameter row per value) took 0.55-0.93 of their time
 * for NC inference so, 0.72-0.92 for training, on rows of 2 and 4 KiB (a row start in every chunk;
 * rows of 1200 B or 8 KiB, a span in three or in two chunks aligned, 0.97-1.02); the group loops
 * (scalar parameters) took 1.0-1.3x as long at 2 threads, so they keep the output's alignment. */
#define CBN_STREAM_ROWS(OUT, oa, m, n, align, row, ...)                                             \
    do {                                                                                            \
        CBN_T raw_[(CBN_STREAM_BYTES + 2 * CBN_LINE) / sizeof(CBN_T)];                              \
        CBN_T *const line_ = (CBN_T *)cbn_line_up(raw_);                                            \
        const int flat_ = (oa) == (n);                                                              \
        const ptrdiff_t run_ = flat_ ? (m) * (n) : (n), runs_ = flat_ ? 1 : (m);                    \
        for (ptrdiff_t r0_ = 0; r0_ < runs_; r0_++) {                                               \
            CBN_T *out_ = (OUT) + r0_ * (oa);                                                       \
            if (run_ * (ptrdiff_t)sizeof(CBN_T) < CBN_STREAM_MIN_RUN) {                             \
                for (ptrdiff_t f_ = 0, k; f_ < run_; f_ += k) {                                     \
                    const ptrdiff_t row = flat_ ? f_ / (n) : r0_, i0 = flat_ ? f_ - row * (n) : 0;  \
                    k = (n) - i0;                                                                   \
                    CBN_T *w = out_ + f_;                                                           \
                    __VA_ARGS__;                                                                    \
                }                                                                                   \
                continue;                                                                           \
            }                                                                                       \
            for (ptrdiff_t f0_ = 0, len_; f0_ < run_; f0_ += len_) {                                \
                len_ = cbn_stream_chunk(out_ + f0_, run_ - f0_, sizeof(CBN_T), CBN_STREAM_BYTES);   \
                const ptrdiff_t start_ = (f0_ + (n) - 1) / (n) * (n) - f0_; /* a row start in it? */ \
                CBN_T *const buf_ = line_ + ((align) && flat_ && start_ < len_                      \
                                             ? cbn_line_rest(start_, sizeof(CBN_T)) : 0);           \
                for (ptrdiff_t f_ = f0_, k; f_ < f0_ + len_; f_ += k) {                             \
                    const ptrdiff_t row = flat_ ? f_ / (n) : r0_, i0 = flat_ ? f_ - row * (n) : f_; \
                    k = (n) - i0 < f0_ + len_ - f_ ? (n) - i0 : f0_ + len_ - f_;                    \
                    CBN_T *w = buf_ + (f_ - f0_);                                                   \
                    __VA_ARGS__;                                                                    \
                }                                                                                   \
                cbn_stream_copy(out_ + f0_, buf_, (size_t)len_ * sizeof(CBN_T));                    \
            }                                                                                       \
        }                                                                                           \
    } while (0)

/* Rows of at most this many values that follow each other in memory are computed a chunk at a time
 * (CBN_FLAT_CHUNKS) rather than a row at a time. */
#define CBN_NARROW_ROW 256

/* dst[0:len] = src[0:n] repeated (dst[j] = src[j % n]), values of `size` bytes */
static inline void cbn_repeat(void *dst, const void *src, ptrdiff_t n, ptrdiff_t len, size_t size)
{
    char *d = (char *)dst;
    ptrdiff_t have = n < len ? n : len;
    memcpy(d, src, (size_t)have * size);
    for (; have < len; have *= 2)  /* doubling: a few long copies rather than many short ones */
        memcpy(d + have * size, d, (size_t)(len - have < have ? len - have : have) * size);
}

/* Narrow rows that follow each other in the output and in every input (m rows of n <= CBN_NARROW_ROW
 * values, n apart), with np rows of per-channel parameters (p, rows ps apart): the statements after
 * `pp` compute the k values of the run of m * n from index f, whose channels start at i0 = f % n,
 * into w, reading the parameters from pp + i0 (rows CBN_FLAT_LEN apart).  pp holds p's rows repeated
 * (pp[j] = p[j % n]), so that a chunk spans rows in one loop: a loop per short row costs more in
 * setup than its values do.  The same values, so the same bits, as row by row.  Chunks of
 * CBN_FLAT_BYTES: with 1024 the loops took 1.04-1.12x as long, with 4096 longer still (pp crowds
 * L1), with 256 1.0-1.2x.  stream: chunks end on line boundaries of the output and go through a
 * buffer in L1 as in CBN_STREAM_ROWS (the caller ends with cbn_stream_fence()); else w is the
 * output itself. */
#define CBN_FLAT_BYTES 512
#define CBN_FLAT_LEN (CBN_FLAT_BYTES / (ptrdiff_t)sizeof(CBN_T) + CBN_NARROW_ROW)
#define CBN_FLAT_CHUNKS(OUT, m, n, p, ps, np, stream, pp, ...)                                     \
    do {                                                                                            \
        CBN_T pp[(np) * CBN_FLAT_LEN], buf_[CBN_FLAT_BYTES / sizeof(CBN_T)];                        \
        const ptrdiff_t run_ = (m) * (n), most_ = CBN_FLAT_BYTES / (ptrdiff_t)sizeof(CBN_T);        \
        const int stream_ = (stream) && run_ * (ptrdiff_t)sizeof(CBN_T) >= CBN_STREAM_MIN_RUN;      \
        for (int q_ = 0; q_ < (np); q_++)  /* a chunk reads at most n - 1 + most_ of each row */   \
            cbn_repeat(pp + q_ * CBN_FLAT_LEN, (p) + q_ * (ps), (n),                                \
                       run_ < most_ + (n) ? run_ : most_ + (n), sizeof(CBN_T));                     \
        for (ptrdiff_t f = 0, k; f < run_; f += k) {                                                \
            k = stream_ ? cbn_stream_chunk((OUT) + f, run_ - f, sizeof(CBN_T), CBN_FLAT_BYTES)      \
                        : (run_ - f < most_ ? run_ - f : most_);                                    \
            const ptrdiff_t i0 = f % (n);                                                           \
            CBN_T *w = stream_ ? buf_ : (OUT) + f;                                                  \
            __VA_ARGS__;                                                                            \
            if (stream_)                                                                            \
                cbn_stream_copy((OUT) + f, buf_, (size_t)k * sizeof(CBN_T));                        \
        }                                                                                           \
    } while (0)

#define CBN_CAT_(a, b) a##b
#define CBN_CAT(a, b) CBN_CAT_(a, b)

#define CBN_T float
#define CBN_SUFFIX _f
#include "cbn_loops_t.h"
#undef CBN_T
#undef CBN_SUFFIX

#define CBN_T double
#define CBN_SUFFIX _d
#include "cbn_loops_t.h"
#undef CBN_T
#undef CBN_SUFFIX

#endif /* CBN_LOOPS_H */
