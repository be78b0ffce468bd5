/* Memory traffic alone, no batch-norm arithmetic: the floor under each of cbn's kernel shapes.
 *
 * Built and driven by traffic_floor.py (a diagnostic, not part of the package).  Each function
 * moves the bytes one of cbn's kernels must move, in the same passes, with as little arithmetic as
 * keeps the compiler from dropping the loads: a sum of every value read (several accumulators, so
 * no add waits on the one before), and each output value written once with a non-temporal store
 * (no read for ownership; plain stores for the partial lines at the ends of a piece).  OpenMP
 * splits the values evenly, or by cbn's channel groups. */
#include <immintrin.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

/* this thread's share [lo, hi) of n values, whole 64-byte lines of an aligned array */
static void share(ptrdiff_t n, ptrdiff_t *lo, ptrdiff_t *hi)
{
    ptrdiff_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    ptrdiff_t per = ((n + threads - 1) / threads + 15) / 16 * 16;
    *lo = per * t < n ? per * t : n;
    *hi = per * (t + 1) < n ? per * (t + 1) : n;
}

/* sum of a[lo:hi] and, if b is not NULL, of b[lo:hi] */
static float read_span(const float *a, const float *b, ptrdiff_t lo, ptrdiff_t hi)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
           s3 = _mm512_setzero_ps();
    ptrdiff_t i = lo;
    for (; i + 32 <= hi; i += 32) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a + i));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + i + 16));
        if (b) {
            s2 = _mm512_add_ps(s2, _mm512_loadu_ps(b + i));
            s3 = _mm512_add_ps(s3, _mm512_loadu_ps(b + i + 16));
        }
    }
    float tail = 0;
    for (; i < hi; i++)
        tail += a[i] + (b ? b[i] : 0.0f);
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))) + tail;
}

/* out[lo:hi] = a[lo:hi] (+ b[lo:hi] if b is not NULL): the whole 64-byte lines of out by non-temporal
 * stores, the values before and after them by plain ones */
static void write_span(const float *a, const float *b, float *out, ptrdiff_t lo, ptrdiff_t hi)
{
    ptrdiff_t i = lo;
    for (; i < hi && ((uintptr_t)(out + i) & 63); i++)
        out[i] = a[i] + (b ? b[i] : 0.0f);
    for (; i + 16 <= hi; i += 16) {
        __m512 v = _mm512_loadu_ps(a + i);
        if (b)
            v = _mm512_add_ps(v, _mm512_loadu_ps(b + i));
        _mm512_stream_ps(out + i, v);
    }
    for (; i < hi; i++)
        out[i] = a[i] + (b ? b[i] : 0.0f);
}

/* Column layouts (NC, NHWC): every channel needs all rows before its outputs, so the inputs are read
 * from memory twice, once for the sums (statistics, or the gradient's two sums) and once more
 * for the output.  b NULL: the training forward (x, then x to y); else the backward (dy and x, then
 * dy and x to dx). */
float floor_two_passes(const float *a, const float *b, float *out, ptrdiff_t n, int threads)
{
    float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        ptrdiff_t lo, hi;
        share(n, &lo, &hi);
        total += read_span(a, b, lo, hi);
#pragma omp barrier
        write_span(a, b, out, lo, hi);
    }
    _mm_sfence();
    return total;
}

/* Row layouts (NCHW): as cbn's fused groups, a group of channels at a time, its block (a piece of
 * `piece` values in each of `rows` rows, row_len apart) read from memory for the sums, then read
 * again from L2 for the output. */
float floor_groups(const float *a, const float *b, float *out, ptrdiff_t rows, ptrdiff_t row_len, ptrdiff_t piece,
                   int threads)
{
    float total = 0;
    ptrdiff_t groups = (row_len + piece - 1) / piece;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
    for (ptrdiff_t k = 0; k < groups; k++) {
        ptrdiff_t c0 = k * piece, c1 = c0 + piece < row_len ? c0 + piece : row_len;
        for (ptrdiff_t r = 0; r < rows; r++)
            total += read_span(a, b, r * row_len + c0, r * row_len + c1);
        for (ptrdiff_t r = 0; r < rows; r++)
            write_span(a, b, out, r * row_len + c0, r * row_len + c1);
    }
    _mm_sfence();
    return total;
}

/* One pass: a (and b) read once, out written once; b NULL is a copy (the inference's traffic). */
float floor_one_pass(const float *a, const float *b, float *out, ptrdiff_t n, int threads)
{
#pragma omp parallel num_threads(threads)
    {
        ptrdiff_t lo, hi;
        share(n, &lo, &hi);
        write_span(a, b, out, lo, hi);
    }
    _mm_sfence();
    return 0;
}
