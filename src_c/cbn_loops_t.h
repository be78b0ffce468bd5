/* Template of cbn's inner loops: included by cbn_loops.h with CBN_T (the
 * element type) and CBN_SUFFIX defined.
 *
 * Reductions accumulate in double.  Elementwise loops compute in the element
 * type, with the mean split in two (mu = mu_hi + mu_lo, mu_hi the nearest
 * CBN_T): x - mu_hi is exact for x near the mean (Sterbenz), so large
 * offsets cost no accuracy, and a constant run gives exactly the shift.
 *
 * "run" loops walk m runs of n values of one channel (row mode: one set of
 * parameters); "cols" loops walk n channels of one row (column mode: a
 * parameter per value).  Strides are in elements; output arrays may alias input arrays
 * element for element (in-place out=).
 */
#define CBN_FN(name) CBN_CAT(name, CBN_SUFFIX)

/* The run loops walk m runs of n values, run r starting at x + r * xa. */

/* sum(x), in double */
CBN_CLONES static double CBN_FN(cbn_run_sum)(const CBN_T *x, ptrdiff_t m, ptrdiff_t xa, ptrdiff_t n, ptrdiff_t s)
{
    double acc[CBN_LANES] = {0};
    for (ptrdiff_t r = 0; r < m; r++, x += xa) {
        ptrdiff_t i = 0;
        if (s == 1)
            for (; i + CBN_LANES <= n; i += CBN_LANES)
                for (int j = 0; j < CBN_LANES; j++)
                    acc[j] += x[i + j];
        for (; i < n; i++)
            acc[i % CBN_LANES] += x[i * s];
    }
    return cbn_tree_sum(acc);
}

/* sum((x - mu)**2) in double; adds sum(x - mu) to *dev */
CBN_CLONES static double CBN_FN(cbn_run_sq_dev)(const CBN_T *x, ptrdiff_t m, ptrdiff_t xa, ptrdiff_t n, ptrdiff_t s,
                                                double mu, double *dev)
{
    double acc_dev[CBN_LANES] = {0}, acc_sq[CBN_LANES] = {0};
    for (ptrdiff_t r = 0; r < m; r++, x += xa) {
        ptrdiff_t i = 0;
        if (s == 1)
            for (; i + CBN_LANES <= n; i += CBN_LANES)
                for (int j = 0; j < CBN_LANES; j++) {
                    double d = x[i + j] - mu;
                    acc_dev[j] += d;
                    acc_sq[j] += d * d;
                }
        for (; i < n; i++) {
            double d = x[i * s] - mu;
            acc_dev[i % CBN_LANES] += d;
            acc_sq[i % CBN_LANES] += d * d;
        }
    }
    *dev += cbn_tree_sum(acc_dev);
    return cbn_tree_sum(acc_sq);
}

/* y = ((x - mu_hi) - mu_lo) * scale + shift: centred, never folded into x * a + b */
CBN_CLONES static void CBN_FN(cbn_run_affine)(const CBN_T *x, ptrdiff_t xa, ptrdiff_t sx, CBN_T *y, ptrdiff_t ya,
                                              ptrdiff_t sy, ptrdiff_t m, ptrdiff_t n,
                                              CBN_T mu_hi, CBN_T mu_lo, CBN_T scale, CBN_T shift)
{
    for (ptrdiff_t r = 0; r < m; r++, x += xa, y += ya) {
        if (sx == 1 && sy == 1)
            for (ptrdiff_t i = 0; i < n; i++)
                y[i] = ((x[i] - mu_hi) - mu_lo) * scale + shift;
        else
            for (ptrdiff_t i = 0; i < n; i++)
                y[i * sy] = ((x[i * sx] - mu_hi) - mu_lo) * scale + shift;
    }
}

/* sum(dy * (x - mu)) in double; adds sum(dy) to *sum_dy */
CBN_CLONES static double CBN_FN(cbn_run_grad_sums)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x,
                                                   ptrdiff_t xa, ptrdiff_t sx, ptrdiff_t m, ptrdiff_t n, double mu,
                                                   double *sum_dy)
{
    double acc_dy[CBN_LANES] = {0}, acc_dy_xmu[CBN_LANES] = {0};
    for (ptrdiff_t r = 0; r < m; r++, dy += da, x += xa) {
        ptrdiff_t i = 0;
        if (sd == 1 && sx == 1)
            for (; i + CBN_LANES <= n; i += CBN_LANES)
                for (int j = 0; j < CBN_LANES; j++) {
                    double g = dy[i + j];
                    acc_dy[j] += g;
                    acc_dy_xmu[j] += g * (x[i + j] - mu);
                }
        for (; i < n; i++) {
            double g = dy[i * sd];
            acc_dy[i % CBN_LANES] += g;
            acc_dy_xmu[i % CBN_LANES] += g * (x[i * sx] - mu);
        }
    }
    *sum_dy += cbn_tree_sum(acc_dy);
    return cbn_tree_sum(acc_dy_xmu);
}

/* dx = ((dy - dy_mean) - ((x - mu_hi) - mu_lo) * c_xmu) * k_dy: differences first, so a gradient
 * that the mean and xhat absorb cancels exactly before it is scaled */
CBN_CLONES static void CBN_FN(cbn_run_grad)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x, ptrdiff_t xa,
                                            ptrdiff_t sx, CBN_T *dx, ptrdiff_t oa, ptrdiff_t so, ptrdiff_t m,
                                            ptrdiff_t n, CBN_T mu_hi, CBN_T mu_lo, CBN_T dy_mean, CBN_T c_xmu,
                                            CBN_T k_dy)
{
    for (ptrdiff_t r = 0; r < m; r++, dy += da, x += xa, dx += oa) {
        if (sd == 1 && sx == 1 && so == 1)
            for (ptrdiff_t i = 0; i < n; i++)
                dx[i] = ((dy[i] - dy_mean) - ((x[i] - mu_hi) - mu_lo) * c_xmu) * k_dy;
        else
            for (ptrdiff_t i = 0; i < n; i++)
                dx[i * so] = ((dy[i * sd] - dy_mean) - ((x[i * sx] - mu_hi) - mu_lo) * c_xmu) * k_dy;
    }
}

/* The column loops walk m rows of n channels: row r of x starts at x + r * xa,
 * channel i of a row is at i * sx.  Rows are read in memory order; the
 * per-channel accumulators (CBN_COLS channels at a time) stay in L1. */

/* Per channel: mean and M2 = sum((x - mean)**2) of the m rows, two-pass (the
 * rows are small enough to stay in cache), written to mean[i] and m2[i]. */
CBN_CLONES static void CBN_FN(cbn_cols_stats)(const CBN_T *x, ptrdiff_t xa, ptrdiff_t sx, ptrdiff_t m, ptrdiff_t n,
                                              double *mean, double *m2)
{
    for (ptrdiff_t c0 = 0; c0 < n; c0 += CBN_COLS) {
        const CBN_T *xc = x + c0 * sx;
        ptrdiff_t w = n - c0 < CBN_COLS ? n - c0 : CBN_COLS;
        double mu[CBN_COLS] = {0}, dev[CBN_COLS] = {0}, sq[CBN_COLS] = {0};
        for (ptrdiff_t r = 0; r < m; r++) {
            const CBN_T *row = xc + r * xa;
            if (sx == 1)
                for (ptrdiff_t i = 0; i < w; i++)
                    mu[i] += row[i];
            else
                for (ptrdiff_t i = 0; i < w; i++)
                    mu[i] += row[i * sx];
        }
        for (ptrdiff_t i = 0; i < w; i++)
            mu[i] /= m;
        for (ptrdiff_t r = 0; r < m; r++) {
            const CBN_T *row = xc + r * xa;
            if (sx == 1)
                for (ptrdiff_t i = 0; i < w; i++) {
                    double d = row[i] - mu[i];
                    dev[i] += d;
                    sq[i] += d * d;
                }
            else
                for (ptrdiff_t i = 0; i < w; i++) {
                    double d = row[i * sx] - mu[i];
                    dev[i] += d;
                    sq[i] += d * d;
                }
        }
        for (ptrdiff_t i = 0; i < w; i++) {  /* corrected two-pass */
            double q = sq[i] - dev[i] * dev[i] / m;
            mean[c0 + i] = mu[i] + dev[i] / m;
            m2[c0 + i] = q > 0 ? q : 0.0;
        }
    }
}

/* Per channel: sum_dy[i] = sum(dy), sum_dy_xmu[i] = sum(dy * (x - mu[i])) over the m rows. */
CBN_CLONES static void CBN_FN(cbn_cols_grad_sums)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x,
                                                  ptrdiff_t xa, ptrdiff_t sx, ptrdiff_t m, ptrdiff_t n,
                                                  const double *mu, double *sum_dy, double *sum_dy_xmu)
{
    for (ptrdiff_t c0 = 0; c0 < n; c0 += CBN_COLS) {
        ptrdiff_t w = n - c0 < CBN_COLS ? n - c0 : CBN_COLS;
        double acc_dy[CBN_COLS] = {0}, acc_dy_xmu[CBN_COLS] = {0};
        for (ptrdiff_t r = 0; r < m; r++) {
            const CBN_T *g = dy + r * da + c0 * sd, *v = x + r * xa + c0 * sx;
            if (sd == 1 && sx == 1)
                for (ptrdiff_t i = 0; i < w; i++) {
                    acc_dy[i] += g[i];
                    acc_dy_xmu[i] += g[i] * (v[i] - mu[c0 + i]);
                }
            else
                for (ptrdiff_t i = 0; i < w; i++) {
                    acc_dy[i] += g[i * sd];
                    acc_dy_xmu[i] += g[i * sd] * (v[i * sx] - mu[c0 + i]);
                }
        }
        for (ptrdiff_t i = 0; i < w; i++) {
            sum_dy[c0 + i] = acc_dy[i];
            sum_dy_xmu[c0 + i] = acc_dy_xmu[i];
        }
    }
}

/* y = ((x - mu_hi) - mu_lo) * scale + shift per channel; p holds 4 rows (mu_hi, mu_lo, scale, shift)
 * of ps values */
CBN_CLONES static void CBN_FN(cbn_cols_affine)(const CBN_T *x, ptrdiff_t xa, ptrdiff_t sx, CBN_T *y, ptrdiff_t ya,
                                               ptrdiff_t sy, ptrdiff_t m, ptrdiff_t n, const CBN_T *p, ptrdiff_t ps)
{
    const CBN_T *mu_hi = p, *mu_lo = p + ps, *scale = p + 2 * ps, *shift = p + 3 * ps;
    for (ptrdiff_t r = 0; r < m; r++, x += xa, y += ya) {
        if (sx == 1 && sy == 1)
            for (ptrdiff_t i = 0; i < n; i++)
                y[i] = ((x[i] - mu_hi[i]) - mu_lo[i]) * scale[i] + shift[i];
        else
            for (ptrdiff_t i = 0; i < n; i++)
                y[i * sy] = ((x[i * sx] - mu_hi[i]) - mu_lo[i]) * scale[i] + shift[i];
    }
}

/* dx = ((dy - dy_mean) - ((x - mu_hi) - mu_lo) * c_xmu) * k_dy per channel; p holds 5 rows
 * (mu_hi, mu_lo, dy_mean, c_xmu, k_dy) of ps values */
CBN_CLONES static void CBN_FN(cbn_cols_grad)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x, ptrdiff_t xa,
                                             ptrdiff_t sx, CBN_T *dx, ptrdiff_t oa, ptrdiff_t so, ptrdiff_t m,
                                             ptrdiff_t n, const CBN_T *p, ptrdiff_t ps)
{
    const CBN_T *mu_hi = p, *mu_lo = p + ps, *dy_mean = p + 2 * ps, *c_xmu = p + 3 * ps, *k_dy = p + 4 * ps;
    for (ptrdiff_t r = 0; r < m; r++, dy += da, x += xa, dx += oa) {
        if (sd == 1 && sx == 1 && so == 1)
            for (ptrdiff_t i = 0; i < n; i++)
                dx[i] = ((dy[i] - dy_mean[i]) - ((x[i] - mu_hi[i]) - mu_lo[i]) * c_xmu[i]) * k_dy[i];
        else
            for (ptrdiff_t i = 0; i < n; i++)
                dx[i * so] = ((dy[i * sd] - dy_mean[i]) - ((x[i * sx] - mu_hi[i]) - mu_lo[i]) * c_xmu[i]) * k_dy[i];
    }
}

#undef CBN_FN
