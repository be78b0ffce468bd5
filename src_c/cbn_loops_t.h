/* Template of cbn's inner loops: included by cbn_loops.h with CBN_T (the
 * element type) and CBN_SUFFIX defined.  All arithmetic is in double.
 *
 * "run" loops walk n values of one channel (row mode: a parameter per run);
 * "cols" loops walk n channels of one row (column mode: a parameter per
 * value).  Strides are in elements; output arrays may alias input arrays
 * element for element (in-place out=).
 */
#define CBN_FN(name) CBN_CAT(name, CBN_SUFFIX)

/* sum(x) */
CBN_CLONES static double CBN_FN(cbn_run_sum)(const CBN_T *x, ptrdiff_t n, ptrdiff_t s)
{
    double acc[CBN_LANES] = {0};
    ptrdiff_t i = 0;
    if (s == 1)
        for (; i + CBN_LANES <= n; i += CBN_LANES)
            for (int j = 0; j < CBN_LANES; j++)
                acc[j] += x[i + j];
    for (; i < n; i++)
        acc[0] += x[i * s];
    return cbn_tree_sum(acc);
}

/* sum((x - mu)**2); adds sum(x - mu) to *dev */
CBN_CLONES static double CBN_FN(cbn_run_sq_dev)(const CBN_T *x, ptrdiff_t n, ptrdiff_t s, double mu, double *dev)
{
    double acc_dev[CBN_LANES] = {0}, acc_sq[CBN_LANES] = {0};
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
        acc_dev[0] += d;
        acc_sq[0] += d * d;
    }
    *dev += cbn_tree_sum(acc_dev);
    return cbn_tree_sum(acc_sq);
}

/* y = (x - mu) * scale + shift: centred, so a constant run gives exactly shift */
CBN_CLONES static void CBN_FN(cbn_run_affine)(const CBN_T *x, ptrdiff_t sx, CBN_T *y, ptrdiff_t sy, ptrdiff_t n,
                                              double mu, double scale, double shift)
{
    if (sx == 1 && sy == 1)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (CBN_T)((x[i] - mu) * scale + shift);
    else
        for (ptrdiff_t i = 0; i < n; i++)
            y[i * sy] = (CBN_T)((x[i * sx] - mu) * scale + shift);
}

/* sum(dy * (x - mu)); adds sum(dy) to *sum_dy */
CBN_CLONES static double CBN_FN(cbn_run_grad_sums)(const CBN_T *dy, ptrdiff_t sd, const CBN_T *x, ptrdiff_t sx,
                                                   ptrdiff_t n, double mu, double *sum_dy)
{
    double acc_dy[CBN_LANES] = {0}, acc_dy_xmu[CBN_LANES] = {0};
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
        acc_dy[0] += g;
        acc_dy_xmu[0] += g * (x[i * sx] - mu);
    }
    *sum_dy += cbn_tree_sum(acc_dy);
    return cbn_tree_sum(acc_dy_xmu);
}

/* dx = dy * k_dy - (x - mu) * k_xmu - k_const */
CBN_CLONES static void CBN_FN(cbn_run_grad)(const CBN_T *dy, ptrdiff_t sd, const CBN_T *x, ptrdiff_t sx, CBN_T *dx,
                                            ptrdiff_t so, ptrdiff_t n, double mu, double k_dy, double k_xmu,
                                            double k_const)
{
    if (sd == 1 && sx == 1 && so == 1)
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] = (CBN_T)(dy[i] * k_dy - (x[i] - mu) * k_xmu - k_const);
    else
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i * so] = (CBN_T)(dy[i * sd] * k_dy - (x[i * sx] - mu) * k_xmu - k_const);
}

/* acc[i] += x[i] */
CBN_CLONES static void CBN_FN(cbn_cols_add)(const CBN_T *x, ptrdiff_t s, double *CBN_RESTRICT acc, ptrdiff_t n)
{
    if (s == 1)
        for (ptrdiff_t i = 0; i < n; i++)
            acc[i] += x[i];
    else
        for (ptrdiff_t i = 0; i < n; i++)
            acc[i] += x[i * s];
}

/* acc[i] += (x[i] - mu[i])**2 */
CBN_CLONES static void CBN_FN(cbn_cols_sq_dev)(const CBN_T *x, ptrdiff_t s, const double *mu, double *CBN_RESTRICT acc,
                                               ptrdiff_t n)
{
    if (s == 1)
        for (ptrdiff_t i = 0; i < n; i++) {
            double d = x[i] - mu[i];
            acc[i] += d * d;
        }
    else
        for (ptrdiff_t i = 0; i < n; i++) {
            double d = x[i * s] - mu[i];
            acc[i] += d * d;
        }
}

/* y[i] = (x[i] - mu[i]) * scale[i] + shift[i] */
CBN_CLONES static void CBN_FN(cbn_cols_affine)(const CBN_T *x, ptrdiff_t sx, CBN_T *y, ptrdiff_t sy, const double *mu,
                                               const double *scale, const double *shift, ptrdiff_t n)
{
    if (sx == 1 && sy == 1)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (CBN_T)((x[i] - mu[i]) * scale[i] + shift[i]);
    else
        for (ptrdiff_t i = 0; i < n; i++)
            y[i * sy] = (CBN_T)((x[i * sx] - mu[i]) * scale[i] + shift[i]);
}

/* sum_dy[i] += dy[i]; sum_dy_xmu[i] += dy[i] * (x[i] - mu[i]) */
CBN_CLONES static void CBN_FN(cbn_cols_grad_sums)(const CBN_T *dy, ptrdiff_t sd, const CBN_T *x, ptrdiff_t sx,
                                                  const double *mu, double *CBN_RESTRICT sum_dy,
                                                  double *CBN_RESTRICT sum_dy_xmu, ptrdiff_t n)
{
    if (sd == 1 && sx == 1)
        for (ptrdiff_t i = 0; i < n; i++) {
            double g = dy[i];
            sum_dy[i] += g;
            sum_dy_xmu[i] += g * (x[i] - mu[i]);
        }
    else
        for (ptrdiff_t i = 0; i < n; i++) {
            double g = dy[i * sd];
            sum_dy[i] += g;
            sum_dy_xmu[i] += g * (x[i * sx] - mu[i]);
        }
}

/* dx[i] = dy[i] * k_dy[i] - (x[i] - mu[i]) * k_xmu[i] - k_const[i] */
CBN_CLONES static void CBN_FN(cbn_cols_grad)(const CBN_T *dy, ptrdiff_t sd, const CBN_T *x, ptrdiff_t sx, CBN_T *dx,
                                             ptrdiff_t so, const double *mu, const double *k_dy, const double *k_xmu,
                                             const double *k_const, ptrdiff_t n)
{
    if (sd == 1 && sx == 1 && so == 1)
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i] = (CBN_T)(dy[i] * k_dy[i] - (x[i] - mu[i]) * k_xmu[i] - k_const[i]);
    else
        for (ptrdiff_t i = 0; i < n; i++)
            dx[i * so] = (CBN_T)(dy[i * sd] * k_dy[i] - (x[i * sx] - mu[i]) * k_xmu[i] - k_const[i]);
}

#undef CBN_FN
