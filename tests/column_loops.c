/* The column layouts' two inner loops outside cbn, to see how the machine treats them (a diagnostic,
 * not a test): BENCHMARKS.md quotes its output.
 *
 *   gcc -O3 -march=native -ffp-contract=off -o /tmp/column_loops tests/column_loops.c && /tmp/column_loops
 *
 * sums: the column gradient sums (acc_dy += g, acc_dy_xmu += g * (v - mu), in double) over two float
 * arrays of 48 MiB in rows of w values, a row at a time against 4 rows per load and store of the
 * accumulators (cbn's CBN_ROWS), and the same over arrays small enough for L2.
 * affine: y = ((x - a) - b) * c + d over rows of w values with the 4 parameters read from 4 rows of w
 * (cbn before 0301ebc), (x - a) * c + d from 3 rows (since), and from scalars, each against memcpy of
 * the same 16 MiB.  Times are best of 15; ratios are what to read. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* rows 1 or 4: the accumulators are loaded and stored once per `rows` rows */
static void sums(const float *dy, const float *x, ptrdiff_t m, ptrdiff_t w, int rows, const double *mu,
                 double *acc_dy, double *acc_dy_xmu)
{
    for (ptrdiff_t r = 0; r + rows <= m; r += rows)
        for (ptrdiff_t i = 0; i < w; i++) {
            double a = acc_dy[i], b = acc_dy_xmu[i];
            for (int q = 0; q < rows; q++) {
                a += dy[(r + q) * w + i];
                b += dy[(r + q) * w + i] * (x[(r + q) * w + i] - mu[i]);
            }
            acc_dy[i] = a;
            acc_dy_xmu[i] = b;
        }
}

static __attribute__((noinline)) void sums1(const float *dy, const float *x, ptrdiff_t m, ptrdiff_t w,
                                            const double *mu, double *s1, double *s2)
{
    sums(dy, x, m, w, 1, mu, s1, s2);
}

static __attribute__((noinline)) void sums4(const float *dy, const float *x, ptrdiff_t m, ptrdiff_t w,
                                            const double *mu, double *s1, double *s2)
{
    sums(dy, x, m, w, 4, mu, s1, s2);
}

/* over tiles of 256 KiB of each array, as cbn's column tiles */
static double time_sums(void (*f)(const float *, const float *, ptrdiff_t, ptrdiff_t, const double *, double *,
                                  double *),
                        const float *dy, const float *x, size_t n, ptrdiff_t w, double *buf)
{
    double best = 1e9, *mu = buf, *s1 = buf + w, *s2 = buf + 2 * w;
    ptrdiff_t m = (ptrdiff_t)n / w, tile = (256 << 10) / (w * 4) / 4 * 4;
    if (tile < 4)
        tile = 4;
    for (int it = 0; it < 15; it++) {
        double t0 = now();
        for (ptrdiff_t r = 0; r < m; r += tile) {
            memset(s1, 0, w * sizeof(double));
            memset(s2, 0, w * sizeof(double));
            f(dy + r * w, x + r * w, m - r < tile ? m - r : tile, w, mu, s1, s2);
        }
        double t = now() - t0;
        best = t < best ? t : best;
    }
    return best;
}

static __attribute__((noinline)) void affine4(const float *x, float *y, ptrdiff_t m, ptrdiff_t w, const float *p)
{
    for (ptrdiff_t r = 0; r < m; r++)
        for (ptrdiff_t i = 0; i < w; i++)
            y[r * w + i] = ((x[r * w + i] - p[i]) - p[w + i]) * p[2 * w + i] + p[3 * w + i];
}

static __attribute__((noinline)) void affine3(const float *x, float *y, ptrdiff_t m, ptrdiff_t w, const float *p)
{
    for (ptrdiff_t r = 0; r < m; r++)
        for (ptrdiff_t i = 0; i < w; i++)
            y[r * w + i] = (x[r * w + i] - p[i]) * p[w + i] + p[2 * w + i];
}

static __attribute__((noinline)) void affine0(const float *x, float *y, ptrdiff_t m, ptrdiff_t w, const float *p)
{
    const float a = p[0], c = p[1], d = p[2];
    for (ptrdiff_t r = 0; r < m; r++)
        for (ptrdiff_t i = 0; i < w; i++)
            y[r * w + i] = (x[r * w + i] - a) * c + d;
}

int main(void)
{
    const size_t big = 12u << 20, small = 32u << 10;  /* floats: 48 MiB and 128 KiB per array */
    float *dy = malloc(big * 4 + 64), *x = malloc(big * 4 + 64), *y = malloc(big * 4 + 64);
    float *p = malloc(4 * 4096 * sizeof(float));
    double *buf = malloc(3 * 8192 * sizeof(double));
    if (!dy || !x || !y || !p || !buf)
        return 1;
    for (size_t i = 0; i < big; i++) {
        dy[i] = (float)(i % 7) - 3;
        x[i] = (float)(i % 5);
    }
    for (int i = 0; i < 4 * 4096; i++)
        p[i] = 1.0f + (float)(i % 3);
    memset(buf, 0, 3 * 8192 * sizeof(double));
    printf("sums, 4 rows at a time over a row at a time: 48 MiB arrays | 128 KiB arrays\n");
    for (ptrdiff_t w = 16; w <= 2048; w *= 2)
        printf("  rows of %5td B: %.2f | %.2f\n", w * 4,
               time_sums(sums4, dy, x, big, w, buf) / time_sums(sums1, dy, x, big, w, buf),
               time_sums(sums4, dy, x, small, w, buf) / time_sums(sums1, dy, x, small, w, buf));
    printf("affine over memcpy, 16 MiB: 4 parameter rows, 3 rows, scalars\n");
    const size_t n = 4u << 20;
    for (ptrdiff_t w = 64; w <= 4096; w *= 4) {
        double best[4] = {1e9, 1e9, 1e9, 1e9};
        for (int it = 0; it < 15; it++) {
            double t[5];
            t[0] = now();
            memcpy(y, x, n * 4);
            t[1] = now();
            affine4(x, y, (ptrdiff_t)n / w, w, p);
            t[2] = now();
            affine3(x, y, (ptrdiff_t)n / w, w, p);
            t[3] = now();
            affine0(x, y, (ptrdiff_t)n / w, w, p);
            t[4] = now();
            for (int k = 0; k < 4; k++)
                best[k] = t[k + 1] - t[k] < best[k] ? t[k + 1] - t[k] : best[k];
        }
        printf("  rows of %4td values: %.2f  %.2f  %.2f\n", w, best[1] / best[0], best[2] / best[0],
               best[3] / best[0]);
    }
    return (int)y[5] + (int)buf[8192];
}
