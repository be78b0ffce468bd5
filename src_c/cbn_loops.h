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

#include <stddef.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(CBN_NO_CLONES)
#define CBN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CBN_CLONES
#endif

/* The lane loops are written for the SLP (straight-line) vectorizer.  For
 * double, GCC's loop vectorizer would also vectorize the loop around them,
 * across iterations, into a mess of permutes; the double instances turn it
 * off (CBN_SLP_ONLY).  The float ones vectorize well as they are. */
#if defined(__GNUC__) && !defined(__clang__)
#define CBN_NO_LOOP_VECTORIZE __attribute__((optimize("no-tree-loop-vectorize")))
#else
#define CBN_NO_LOOP_VECTORIZE
#endif

#define CBN_LANES 16
#define CBN_COLS 256


/* Sum of acc[0:CBN_LANES] in a fixed pairwise order. */
static inline double cbn_tree_sum(const double *acc)
{
    double s8[8], s4[4];
    for (int j = 0; j < 8; j++)
        s8[j] = acc[j] + acc[j + 8];
    for (int j = 0; j < 4; j++)
        s4[j] = s8[j] + s8[j + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* Activations fused into the elementwise passes (codes shared with _kernels.pyx). */
enum { CBN_IDENTITY = 0, CBN_RELU = 1, CBN_LEAKY_RELU = 2, CBN_SIGMOID = 3, CBN_TANH = 4 };

#include <math.h>
static inline float cbn_exp_f(float v) { return expf(v); }
static inline double cbn_exp_d(double v) { return exp(v); }
static inline float cbn_tanh_f(float v) { return tanhf(v); }
static inline double cbn_tanh_d(double v) { return tanh(v); }

#define CBN_CAT_(a, b) a##b
#define CBN_CAT(a, b) CBN_CAT_(a, b)

#define CBN_T float
#define CBN_SUFFIX _f
#define CBN_SLP_ONLY
#include "cbn_loops_t.h"
#undef CBN_T
#undef CBN_SUFFIX
#undef CBN_SLP_ONLY

#define CBN_T double
#define CBN_SUFFIX _d
#define CBN_SLP_ONLY CBN_NO_LOOP_VECTORIZE
#include "cbn_loops_t.h"
#undef CBN_T
#undef CBN_SUFFIX
#undef CBN_SLP_ONLY

#endif /* CBN_LOOPS_H */
