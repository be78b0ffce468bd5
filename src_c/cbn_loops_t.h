/* Template of cbn's inner loops: included by cbn_loops.h with CBN_T (the
 * element type) and CBN_SUFFIX defined.
 *
 * Reductions accumulate in double.  Elementwise loops compute in the element
 * type, centred on mu_hi, the CBN_T nearest the mean (the rest, mu_lo, goes
 * into the shift, or is subtracted next in the gradient): x - mu_hi is exact
 * for x near the mean (Sterbenz), so large offsets cost no accuracy, and a
 * constant run gives exactly the shift.
 *
 * "group" loops walk runs of values, a set of parameters per run (row mode);
 * "cols" loops walk rows of channels, a parameter per value (column mode).
 * Strides are in elements; output arrays may alias input arrays element for
 * element (in-place out=).
 */
#define CBN_FN(name) CBN_CAT(name, CBN_SUFFIX)

/* The group loops (row mode) walk g channels of m runs of n values: the run
 * of channel c in row r starts at x + r * xa + c * xc, its values are s
 * apart.  They go in memory order (r outer, c inner), CBN_CHANNELS channels at
 * a time (sums over short runs: CBN_RUNS rows of runs per channel).  Sums keep
 * per channel CBN_LANES lane accumulators and a scalar (cbn_acc) across the
 * channel's runs, summed by a fixed tree once at its end (a tree per run costs
 * as much as a run of 196 values); runs are added by a function of their own
 * (inlined into the nested loops, GCC no longer vectorizes it). */

/* dev += x - k and sq += (x - k)**2 over `runs` runs of n values (xa apart), in double, as
 * cbn_grad_run */
CBN_CLONES static void CBN_FN(cbn_shifted_run)(const CBN_T *CBN_RESTRICT x, ptrdiff_t n, ptrdiff_t s, ptrdiff_t runs,
                                               ptrdiff_t xa, double k, cbn_acc *CBN_RESTRICT dev,
                                               cbn_acc *CBN_RESTRICT sq)
{
    double acc_dev[CBN_LANES], acc_sq[CBN_LANES];
    double tail_dev = dev->tail, tail_sq = sq->tail;  /* plain scalars: indexing the lanes here would keep them
                                                       * out of registers */
    memcpy(acc_dev, dev->lane, sizeof acc_dev);
    memcpy(acc_sq, sq->lane, sizeof acc_sq);
    for (ptrdiff_t r = 0; r < runs; r++, x += xa) {
        double run_dev = 0, run_sq = 0;  /* a run's tail, added to the total as one term */
        ptrdiff_t i = 0;
        if (s == 1)
            for (; i + CBN_LANES <= n; i += CBN_LANES) {
                CBN_ROLLED
                for (int j = 0; j < CBN_LANES; j++) {
                    double d = x[i + j] - k;
                    acc_dev[j] += d;
                    acc_sq[j] += d * d;
                }
            }
        for (; i < n; i++) {
            double d = x[i * s] - k;
            run_dev += d;
            run_sq += d * d;
        }
        tail_dev += run_dev;
        tail_sq += run_sq;
    }
    memcpy(dev->lane, acc_dev, sizeof acc_dev);
    memcpy(sq->lane, acc_sq, sizeof acc_sq);
    dev->tail = tail_dev;
    sq->tail = tail_sq;
}

/* Per channel c: mean[c] and M2 m2[c] = sum((x - mean)**2), in one pass over the data: the sums of
 * the deviations from k, the channel's first value (cbn_centre), all in double; a channel where
 * they could cancel (cbn_shift_holds) takes a second pass from the mean found (the corrected
 * two-pass), from cache. */
CBN_CLONES static void CBN_FN(cbn_group_stats)(const CBN_T *x, ptrdiff_t xa, ptrdiff_t xc, ptrdiff_t s, ptrdiff_t m,
                                               ptrdiff_t g, ptrdiff_t n, double *mean, double *m2)
{
    const double count = (double)m * (double)n;
    const ptrdiff_t most = cbn_runs_at_once(n, sizeof(CBN_T));
    for (ptrdiff_t c0 = 0; c0 < g; c0 += CBN_CHANNELS) {
        const ptrdiff_t w = g - c0 < CBN_CHANNELS ? g - c0 : CBN_CHANNELS;
        const CBN_T *xg = x + c0 * xc;
        cbn_acc dev[CBN_CHANNELS], sq[CBN_CHANNELS];
        memset(dev, 0, sizeof dev);
        memset(sq, 0, sizeof sq);
        for (ptrdiff_t r = 0; r < m; r += most) {
            const ptrdiff_t runs = m - r < most ? m - r : most;
            for (ptrdiff_t c = 0; c < w; c++)
                CBN_FN(cbn_shifted_run)(xg + r * xa + c * xc, n, s, runs, xa, xg[c * xc], &dev[c], &sq[c]);
        }
        for (ptrdiff_t c = 0; c < w; c++) {
            double k = xg[c * xc], d = cbn_acc_total(&dev[c]), q = cbn_acc_total(&sq[c]);
            if (!cbn_shift_holds(count, d, q)) {
                k += d / count;
                memset(&dev[c], 0, sizeof dev[c]);
                memset(&sq[c], 0, sizeof sq[c]);
                CBN_FN(cbn_shifted_run)(xg + c * xc, n, s, m, xa, k, &dev[c], &sq[c]);
                d = cbn_acc_total(&dev[c]);
                q = cbn_acc_total(&sq[c]);
            }
            cbn_centre(count, k, d, q, &mean[c0 + c], &m2[c0 + c]);
        }
    }
}

/* sum_dy += dy and sum_dy_xmu += dy * (x - mu) over `runs` runs of n values (da and xa apart), one
 * after the other, in double: the accumulators are loaded and stored once for all of them */
CBN_CLONES static void CBN_FN(cbn_grad_run)(const CBN_T *CBN_RESTRICT dy, ptrdiff_t sd, const CBN_T *CBN_RESTRICT x,
                                            ptrdiff_t sx, ptrdiff_t n, ptrdiff_t runs, ptrdiff_t da, ptrdiff_t xa,
                                            double mu, cbn_acc *CBN_RESTRICT sum_dy,
                                            cbn_acc *CBN_RESTRICT sum_dy_xmu)
{
    double acc_dy[CBN_LANES], acc_dy_xmu[CBN_LANES], tail_dy = sum_dy->tail, tail_dy_xmu = sum_dy_xmu->tail;
    memcpy(acc_dy, sum_dy->lane, sizeof acc_dy);
    memcpy(acc_dy_xmu, sum_dy_xmu->lane, sizeof acc_dy_xmu);
    for (ptrdiff_t r = 0; r < runs; r++, dy += da, x += xa) {
        double run_dy = 0, run_dy_xmu = 0;  /* a run's tail, added to the total as one term */
        ptrdiff_t i = 0;
        if (sd == 1 && sx == 1)
            for (; i + CBN_LANES <= n; i += CBN_LANES) {
                CBN_ROLLED
                for (int j = 0; j < CBN_LANES; j++) {
                    double g = dy[i + j];
                    acc_dy[j] += g;
                    acc_dy_xmu[j] += g * (x[i + j] - mu);
                }
            }
        for (; i < n; i++) {
            double g = dy[i * sd];
            run_dy += g;
            run_dy_xmu += g * (x[i * sx] - mu);
        }
        tail_dy += run_dy;
        tail_dy_xmu += run_dy_xmu;
    }
    memcpy(sum_dy->lane, acc_dy, sizeof acc_dy);
    memcpy(sum_dy_xmu->lane, acc_dy_xmu, sizeof acc_dy_xmu);
    sum_dy->tail = tail_dy;
    sum_dy_xmu->tail = tail_dy_xmu;
}

/* cbn_grad_run of dz = dy * relu'(z) (low = 0) or leaky ReLU's (low = slope), z = (x - mu_hi) *
 * scale + shift, for contiguous runs: the sums only, dz not stored (the dx pass recomputes it).  The
 * same lanes and order as cbn_grad_run on dz: the same bits. */
CBN_CLONES static void CBN_FN(cbn_relu_sums_run)(const CBN_T *CBN_RESTRICT dy, const CBN_T *CBN_RESTRICT x,
                                                 ptrdiff_t n, ptrdiff_t runs, ptrdiff_t da, ptrdiff_t xa,
                                                 CBN_T mu_hi, CBN_T scale, CBN_T shift, CBN_T low, double mu,
                                                 cbn_acc *CBN_RESTRICT sum_dy, cbn_acc *CBN_RESTRICT sum_dy_xmu)
{
    double acc_dy[CBN_LANES], acc_dy_xmu[CBN_LANES], tail_dy = sum_dy->tail, tail_dy_xmu = sum_dy_xmu->tail;
    memcpy(acc_dy, sum_dy->lane, sizeof acc_dy);
    memcpy(acc_dy_xmu, sum_dy_xmu->lane, sizeof acc_dy_xmu);
    const CBN_T slope_of[2] = {low, (CBN_T)1};  /* the tail's slope by table, not by a branch */
    for (ptrdiff_t r = 0; r < runs; r++, dy += da, x += xa) {
        double run_dy = 0, run_dy_xmu = 0;  /* a run's tail, added to the total as one term */
        ptrdiff_t i = 0;
        for (; i + CBN_LANES <= n; i += CBN_LANES) {
            CBN_ROLLED
            for (int j = 0; j < CBN_LANES; j++) {
                CBN_T v = x[i + j];
                CBN_T g = dy[i + j] * CBN_RELU_SLOPE((v - mu_hi) * scale + shift, low);
                acc_dy[j] += g;
                acc_dy_xmu[j] += g * (v - mu);
            }
        }
        for (; i < n; i++) {
            CBN_T v = x[i];
            CBN_T g = dy[i] * slope_of[(v - mu_hi) * scale + shift > 0];
            run_dy += g;
            run_dy_xmu += g * (v - mu);
        }
        tail_dy += run_dy;
        tail_dy_xmu += run_dy_xmu;
    }
    memcpy(sum_dy->lane, acc_dy, sizeof acc_dy);
    memcpy(sum_dy_xmu->lane, acc_dy_xmu, sizeof acc_dy_xmu);
    sum_dy->tail = tail_dy;
    sum_dy_xmu->tail = tail_dy_xmu;
}

/* Per-channel work, one loop each that vectorizes (a small call spends much of its time here):
 * mean is split into mu_hi + mu_lo, the nearest CBN_T and the rest. */

/* One channel's affine parameters, 3 rows ps apart: mu_hi, scale, and shift less mu_lo * scale, so
 * that z = (x - mu_hi) * scale + shift is (x - mean) * scale + shift with one parameter row fewer
 * to read than subtracting mu_lo from every value (NC 4096x1024 inference: 0.8x the time on AMD Zen
 * 4); a constant channel (mu_lo = 0) still gives exactly the shift. */
CBN_INLINE void CBN_FN(cbn_affine_params)(double mean, double scale, double shift, CBN_T *p, ptrdiff_t ps)
{
    const CBN_T mu_hi = (CBN_T)mean, s = (CBN_T)scale;
    p[0] = mu_hi;
    p[ps] = s;
    p[2 * ps] = (CBN_T)(shift - cbn_rest_times(mean, mu_hi, s));
}

/* Channels [0, n) of a forward: var (in: M2) becomes M2 / count, invstd = 1 / sqrt(var + eps), and p
 * gets the normalize parameters (cbn_affine_params) of scale = invstd * gamma and shift = beta (gamma
 * and beta NULL for ones and zeros). */
CBN_CLONES static void CBN_FN(cbn_norm_params)(ptrdiff_t n, double count, double eps, const double *CBN_RESTRICT mean,
                                               double *CBN_RESTRICT var, double *CBN_RESTRICT invstd,
                                               const double *CBN_RESTRICT gamma, const double *CBN_RESTRICT beta,
                                               CBN_T *CBN_RESTRICT p, ptrdiff_t ps)
{
    for (ptrdiff_t c = 0; c < n; c++) {
        double v = var[c] / count, inv = 1.0 / sqrt(v + eps);
        var[c] = v;
        invstd[c] = inv;
        CBN_FN(cbn_affine_params)(mean[c], gamma ? inv * gamma[c] : inv, beta ? beta[c] : 0.0, p + c, ps);
    }
}

/* One channel's gradient coefficients, 4 rows ps apart: mu_hi, dy_mean less mu_lo * c_xmu, c_xmu
 * and k_dy, so that ((dy - dy_mean) - (x - mu_hi) * c_xmu) * k_dy is ((dy - mean(dy)) - (x - mean) *
 * c_xmu) * k_dy, centred as cbn_affine_params (NC 4096x1024 and NHWC backward: 0.88-0.95 of the
 * time with a fifth row for mu_lo, on AMD Zen 4). */
CBN_INLINE void CBN_FN(cbn_grad_coefs)(double mean, double dy_mean, double c_xmu, double k_dy, CBN_T *p, ptrdiff_t ps)
{
    const CBN_T mu_hi = (CBN_T)mean, c = (CBN_T)c_xmu;
    p[0] = mu_hi;
    p[ps] = (CBN_T)(dy_mean - cbn_rest_times(mean, mu_hi, c));
    p[2 * ps] = c;
    p[3 * ps] = (CBN_T)k_dy;
}

/* Channels [0, n) of a gradient: p gets the coefficients (cbn_grad_coefs) of dy_mean = sum_dy /
 * count, c_xmu = invstd**2 * sum_dy_xmu / count and k_dy = gamma * invstd, so that
 * dx = gamma * invstd * (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean))). */
CBN_CLONES static void CBN_FN(cbn_grad_params)(ptrdiff_t n, double count, const double *CBN_RESTRICT mean,
                                               const double *CBN_RESTRICT invstd, const double *CBN_RESTRICT gamma,
                                               const double *CBN_RESTRICT sum_dy, const double *CBN_RESTRICT sum_dy_xmu,
                                               CBN_T *CBN_RESTRICT p, ptrdiff_t ps)
{
    for (ptrdiff_t c = 0; c < n; c++) {
        CBN_FN(cbn_grad_coefs)(mean[c], sum_dy[c] / count, invstd[c] * invstd[c] * sum_dy_xmu[c] / count,
                               gamma[c] * invstd[c], p + c, ps);
    }
}

/* w[0:k] = act((u - mu_hi) * scale + shift): centred, never folded into u * a + b */
CBN_INLINE void CBN_FN(cbn_affine_span)(CBN_T *w, const CBN_T *u, ptrdiff_t k, CBN_T mu_hi, CBN_T scale, CBN_T shift,
                                           int act, CBN_T slope)
{
    CBN_ACTIVATE_LOOPS(k, act, slope, w[i], (u[i] - mu_hi) * scale + shift);
}

/* y = act((x - mu_hi) * scale + shift) per channel; p holds 3 rows (mu_hi, scale, shift) of ps
 * values, one per channel (cbn_affine_params).  stream: contiguous runs of y are written with
 * non-temporal stores (CBN_STREAM_ROWS). */
CBN_CLONES static void CBN_FN(cbn_group_affine)(const CBN_T *x, ptrdiff_t xa, ptrdiff_t xc, ptrdiff_t sx, CBN_T *y,
                                                ptrdiff_t ya, ptrdiff_t yc, ptrdiff_t sy, ptrdiff_t m, ptrdiff_t g,
                                                ptrdiff_t n, const CBN_T *p, ptrdiff_t ps, int act, CBN_T slope,
                                                int stream)
{
    for (ptrdiff_t r = 0; r < m; r++) {
        if (stream && sx == 1 && sy == 1) {
            CBN_STREAM_ROWS(y + r * ya, yc, g, n, 0, c,
                            CBN_FN(cbn_affine_span)(w, x + r * xa + c * xc + i0, k, p[c], p[ps + c], p[2 * ps + c],
                                                    act, slope));
            continue;
        }
        for (ptrdiff_t c = 0; c < g; c++) {
            const CBN_T *u = x + r * xa + c * xc;
            CBN_T *v = y + r * ya + c * yc;
            CBN_T mu_hi = p[c], scale = p[ps + c], shift = p[2 * ps + c];
            if (sx == 1 && sy == 1) {
                CBN_FN(cbn_affine_span)(v, u, n, mu_hi, scale, shift, act, slope);
                continue;
            }
            CBN_ACTIVATE_LOOPS(n, act, slope, v[i * sy], (u[i * sx] - mu_hi) * scale + shift);
        }
    }
    if (stream)
        cbn_stream_fence();
}

/* dz = dy * act'(z), z = (x - mu_hi) * scale + shift recomputed from x; p as for
 * cbn_group_affine */
CBN_CLONES static void CBN_FN(cbn_group_act_grad)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t dc, ptrdiff_t sd,
                                                  const CBN_T *x, ptrdiff_t xa, ptrdiff_t xc, ptrdiff_t sx, CBN_T *dz,
                                                  ptrdiff_t oa, ptrdiff_t oc, ptrdiff_t so, ptrdiff_t m, ptrdiff_t g,
                                                  ptrdiff_t n, const CBN_T *p, ptrdiff_t ps, int act, CBN_T slope)
{
    for (ptrdiff_t r = 0; r < m; r++)
        for (ptrdiff_t c = 0; c < g; c++) {
            const CBN_T *q = dy + r * da + c * dc, *u = x + r * xa + c * xc;
            CBN_T *v = dz + r * oa + c * oc;
            CBN_T mu_hi = p[c], scale = p[ps + c], shift = p[2 * ps + c];
            if (sd == 1 && sx == 1 && so == 1)
                CBN_ACT_GRAD_LOOPS(n, act, slope, q[i], (u[i] - mu_hi) * scale + shift, v[i]);
            else
                CBN_ACT_GRAD_LOOPS(n, act, slope, q[i * sd], (u[i * sx] - mu_hi) * scale + shift,
                                   v[i * so]);
        }
}

/* sum_dy_xmu[c] += sum(dz * (x - mu[c])) and sum_dy[c] += sum(dz), in double, where dz = dy * act'(z)
 * (z recomputed from x; p as for cbn_group_affine) goes to dz run by run and is summed from L1; act
 * CBN_IDENTITY: dz is dy itself, and dz and p are not used.  dz NULL: ReLU or leaky ReLU on
 * contiguous runs, the sums only, in one loop (cbn_relu_sums_run; cbn_group_grad recomputes dz in
 * the dx pass). */
CBN_CLONES static void CBN_FN(cbn_group_act_grad_sums)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t dc, ptrdiff_t sd,
                                                       const CBN_T *x, ptrdiff_t xa, ptrdiff_t xc, ptrdiff_t sx,
                                                       CBN_T *dz, ptrdiff_t oa, ptrdiff_t oc, ptrdiff_t so,
                                                       ptrdiff_t m, ptrdiff_t g, ptrdiff_t n, const CBN_T *p,
                                                       ptrdiff_t ps, int act, CBN_T slope, const double *mu,
                                                       double *sum_dy, double *sum_dy_xmu)
{
    const int contiguous = sd == 1 && sx == 1 && so == 1;
    const CBN_T low = act == CBN_RELU ? (CBN_T)0 : slope;  /* ReLU's and leaky ReLU's slope below 0 */
    /* several rows' runs per call where one loop takes a run (storing dz takes two) */
    const ptrdiff_t most = act == CBN_IDENTITY || dz == NULL ? cbn_runs_at_once(n, sizeof(CBN_T)) : 1;
    for (ptrdiff_t c0 = 0; c0 < g; c0 += CBN_CHANNELS) {
        const ptrdiff_t w = g - c0 < CBN_CHANNELS ? g - c0 : CBN_CHANNELS;
        cbn_acc acc_dy[CBN_CHANNELS], acc_dy_xmu[CBN_CHANNELS];
        memset(acc_dy, 0, sizeof acc_dy);
        memset(acc_dy_xmu, 0, sizeof acc_dy_xmu);
        for (ptrdiff_t r = 0; r < m; r += most) {
            const ptrdiff_t k = m - r < most ? m - r : most;
            for (ptrdiff_t c = c0; c < c0 + w; c++) {
                const CBN_T *q = dy + r * da + c * dc, *u = x + r * xa + c * xc;
                cbn_acc *a_dy = &acc_dy[c - c0], *a_dy_xmu = &acc_dy_xmu[c - c0];
                if (act == CBN_IDENTITY) {
                    CBN_FN(cbn_grad_run)(q, sd, u, sx, n, k, da, xa, mu[c], a_dy, a_dy_xmu);
                    continue;
                }
                CBN_T mu_hi = p[c], scale = p[ps + c], shift = p[2 * ps + c];
                if (dz == NULL) {
                    CBN_FN(cbn_relu_sums_run)(q, u, n, k, da, xa, mu_hi, scale, shift, low, mu[c], a_dy, a_dy_xmu);
                    continue;
                }
                CBN_T *v = dz + r * oa + c * oc;
                if (contiguous)  /* k == 1 from here */
                    CBN_ACT_GRAD_LOOPS(n, act, slope, q[i], (u[i] - mu_hi) * scale + shift, v[i]);
                else
                    CBN_ACT_GRAD_LOOPS(n, act, slope, q[i * sd], (u[i * sx] - mu_hi) * scale + shift,
                                       v[i * so]);
                CBN_FN(cbn_grad_run)(v, so, u, sx, n, 1, 0, 0, mu[c], a_dy, a_dy_xmu);
            }
        }
        cbn_add_totals(acc_dy, acc_dy_xmu, w, sum_dy + c0, sum_dy_xmu + c0);
    }
}

/* sum_dy_xmu[c] += sum(dy * (x - mu[c])) and sum_dy[c] += sum(dy), in double */
CBN_CLONES static void CBN_FN(cbn_group_grad_sums)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t dc, ptrdiff_t sd,
                                                   const CBN_T *x, ptrdiff_t xa, ptrdiff_t xc, ptrdiff_t sx,
                                                   ptrdiff_t m, ptrdiff_t g, ptrdiff_t n, const double *mu,
                                                   double *sum_dy, double *sum_dy_xmu)
{
    CBN_FN(cbn_group_act_grad_sums)(dy, da, dc, sd, x, xa, xc, sx, NULL, 0, 0, 1, m, g, n, NULL, 0, CBN_IDENTITY, 0,
                                    mu, sum_dy, sum_dy_xmu);
}

/* w[0:k] = ((q - dy_mean) - (u - mu_hi) * c_xmu) * k_dy: differences first, so a gradient
 * that the mean and xhat absorb cancels before it is scaled */
CBN_INLINE void CBN_FN(cbn_grad_span)(CBN_T *w, const CBN_T *q, const CBN_T *u, ptrdiff_t k, CBN_T mu_hi,
                                         CBN_T dy_mean, CBN_T c_xmu, CBN_T k_dy)
{
    for (ptrdiff_t i = 0; i < k; i++)
        w[i] = ((q[i] - dy_mean) - (u[i] - mu_hi) * c_xmu) * k_dy;
}

/* One run of dx: cbn_grad_span of channel p's coefficients (rows ps apart), or with relu set its
 * gradient through ReLU or leaky ReLU (slope `low` below 0, p then holding 6 rows: the affine scale
 * and shift after the 4): dz = dy * relu'(z) recomputed from x (CBN_RELU_GRAD_LOOP) rather than
 * stored by the sums pass and read back, so that dx can stream where a stored dz would have dirtied
 * its lines. */
CBN_INLINE void CBN_FN(cbn_run_grad_span)(CBN_T *w, const CBN_T *q, const CBN_T *u, ptrdiff_t k, const CBN_T *p,
                                             ptrdiff_t ps, int relu, CBN_T low)
{
    /* the coefficients in locals: read through p inside the loop, they could alias w */
    const CBN_T mu_hi = p[0], dy_mean = p[ps], c_xmu = p[2 * ps], k_dy = p[3 * ps];
    if (relu) {
        const CBN_T scale = p[4 * ps], shift = p[5 * ps];
        CBN_RELU_GRAD_LOOP(k, low, w[i], q[i], u[i], mu_hi, dy_mean, c_xmu, k_dy, scale, shift);
    } else {
        CBN_FN(cbn_grad_span)(w, q, u, k, mu_hi, dy_mean, c_xmu, k_dy);
    }
}

/* dx = ((dy - dy_mean) - (x - mu_hi) * c_xmu) * k_dy per channel; p holds 4 rows (cbn_grad_coefs:
 * mu_hi, dy_mean, c_xmu, k_dy) of ps values, one per channel, or 6 with relu set (contiguous runs
 * only: cbn_run_grad_span); stream as for cbn_group_affine. */
CBN_CLONES static void CBN_FN(cbn_group_grad)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t dc, ptrdiff_t sd,
                                              const CBN_T *x, ptrdiff_t xa, ptrdiff_t xc, ptrdiff_t sx, CBN_T *dx,
                                              ptrdiff_t oa, ptrdiff_t oc, ptrdiff_t so, ptrdiff_t m, ptrdiff_t g,
                                              ptrdiff_t n, const CBN_T *p, ptrdiff_t ps, int relu, CBN_T low,
                                              int stream)
{
    const int contiguous = sd == 1 && sx == 1 && so == 1;
    for (ptrdiff_t r = 0; r < m; r++) {
        if (stream && contiguous) {
            CBN_STREAM_ROWS(dx + r * oa, oc, g, n, 0, c,
                            CBN_FN(cbn_run_grad_span)(w, dy + r * da + c * dc + i0, x + r * xa + c * xc + i0, k,
                                                      p + c, ps, relu, low));
            continue;
        }
        for (ptrdiff_t c = 0; c < g; c++) {
            const CBN_T *q = dy + r * da + c * dc, *u = x + r * xa + c * xc;
            CBN_T *v = dx + r * oa + c * oc;
            if (contiguous) {
                CBN_FN(cbn_run_grad_span)(v, q, u, n, p + c, ps, relu, low);
                continue;
            }
            const CBN_T mu_hi = p[c], dy_mean = p[ps + c], c_xmu = p[2 * ps + c], k_dy = p[3 * ps + c];
            for (ptrdiff_t i = 0; i < n; i++)
                v[i * so] = ((q[i * sd] - dy_mean) - (u[i * sx] - mu_hi) * c_xmu) * k_dy;
        }
    }
    if (stream)
        cbn_stream_fence();
}

/* The column loops walk m rows of n channels: row r of x starts at x + r * xa,
 * channel i of a row is at i * sx.  Rows are read in memory order; the
 * per-channel accumulators (CBN_COLS channels at a time) stay in L1. */

/* dev[i] += x - k[i] and sq[i] += (x - k[i])**2 over `rows` rows of w channels (rows xa apart, channels
 * sx apart), in row order, each accumulator loaded and stored once (CBN_ROWS) */
CBN_INLINE void CBN_FN(cbn_cols_dev_rows)(double *dev, double *sq, const CBN_T *x, ptrdiff_t xa, ptrdiff_t sx,
                                          const double *k, ptrdiff_t w, int rows)
{
    for (ptrdiff_t i = 0; i < w; i++) {
        double a = dev[i], s = sq[i];
        for (int q = 0; q < rows; q++) {
            double d = x[q * xa + i * sx] - k[i];
            a += d;
            s += d * d;
        }
        dev[i] = a;
        sq[i] = s;
    }
}

/* Per channel: mean and M2 = sum((x - mean)**2) of the m rows, written to mean[i] and m2[i]: as
 * cbn_group_stats, one pass of deviations from the first row, and a second from the mean for the
 * channels where that could cancel (the rows are small enough to stay in cache).  cached: the
 * caller's arrays are small enough to be in cache, where CBN_ROWS rows at a time pay whatever
 * their distance (cbn_rows_at_once judges rows read from memory). */
CBN_CLONES static void CBN_FN(cbn_cols_stats)(const CBN_T *x, ptrdiff_t xa, ptrdiff_t sx, ptrdiff_t m, ptrdiff_t n,
                                              int cached, double *mean, double *m2)
{
    for (ptrdiff_t c0 = 0; c0 < n; c0 += CBN_COLS) {
        const CBN_T *xc = x + c0 * sx;
        const ptrdiff_t w = n - c0 < CBN_COLS ? n - c0 : CBN_COLS;
        double k[CBN_COLS], dev[CBN_COLS], sq[CBN_COLS];
        ptrdiff_t again[CBN_COLS], n_again = 0;
        for (ptrdiff_t i = 0; i < w; i++) {
            k[i] = xc[i * sx];
            dev[i] = sq[i] = 0;
        }
        ptrdiff_t r = 0;
        if (sx == 1 && (cached || cbn_rows_at_once(xa, xa, sizeof(CBN_T))))
            for (; r + CBN_ROWS <= m; r += CBN_ROWS)
                CBN_FN(cbn_cols_dev_rows)(dev, sq, xc + r * xa, xa, 1, k, w, CBN_ROWS);
        for (; r < m; r++)
            if (sx == 1)  /* a unit stride as a constant: the loop vectorizes */
                CBN_FN(cbn_cols_dev_rows)(dev, sq, xc + r * xa, xa, 1, k, w, 1);
            else
                CBN_FN(cbn_cols_dev_rows)(dev, sq, xc + r * xa, xa, sx, k, w, 1);
        for (ptrdiff_t i = 0; i < w; i++)
            if (!cbn_shift_holds((double)m, dev[i], sq[i])) {
                k[i] += dev[i] / m;
                dev[i] = sq[i] = 0;
                again[n_again++] = i;
            }
        for (ptrdiff_t r = 0; n_again && r < m; r++)
            for (ptrdiff_t j = 0; j < n_again; j++) {
                const ptrdiff_t i = again[j];
                double d = xc[r * xa + i * sx] - k[i];
                dev[i] += d;
                sq[i] += d * d;
            }
        for (ptrdiff_t i = 0; i < w; i++)
            cbn_centre((double)m, k[i], dev[i], sq[i], &mean[c0 + i], &m2[c0 + i]);
    }
}

/* acc_dy[i] += g and acc_dy_xmu[i] += g * (v - mu[i]) over `rows` rows of w channels (rows ga and va
 * apart, channels sg and sv apart), in row order, each accumulator loaded and stored once (CBN_ROWS) */
CBN_INLINE void CBN_FN(cbn_cols_acc_rows)(double *acc_dy, double *acc_dy_xmu, const CBN_T *g, ptrdiff_t ga,
                                          ptrdiff_t sg, const CBN_T *v, ptrdiff_t va, ptrdiff_t sv, const double *mu,
                                          ptrdiff_t w, int rows)
{
    for (ptrdiff_t i = 0; i < w; i++) {
        double a = acc_dy[i], b = acc_dy_xmu[i];
        for (int q = 0; q < rows; q++) {
            a += g[q * ga + i * sg];
            b += g[q * ga + i * sg] * (v[q * va + i * sv] - mu[i]);
        }
        acc_dy[i] = a;
        acc_dy_xmu[i] = b;
    }
}

/* cbn_cols_acc_rows of dz = dy * relu'(z) (slope `low` below 0), z = (x - mu_hi) * scale + shift
 * recomputed from x, on contiguous rows */
CBN_INLINE void CBN_FN(cbn_cols_relu_acc_rows)(double *acc_dy, double *acc_dy_xmu, const CBN_T *g, ptrdiff_t ga,
                                               const CBN_T *v, ptrdiff_t va, const CBN_T *mu_hi,
                                               const CBN_T *scale, const CBN_T *shift, CBN_T low, const double *mu,
                                               ptrdiff_t w, int rows)
{
    for (ptrdiff_t i = 0; i < w; i++) {
        double a = acc_dy[i], b = acc_dy_xmu[i];
        for (int q = 0; q < rows; q++) {
            const CBN_T u = v[q * va + i], z = (u - mu_hi[i]) * scale[i] + shift[i];
            CBN_T d = g[q * ga + i] * CBN_RELU_SLOPE(z, low);
            a += d;
            b += d * (u - mu[i]);
        }
        acc_dy[i] = a;
        acc_dy_xmu[i] = b;
    }
}

/* Per channel: sum_dy[i] = sum(dy), sum_dy_xmu[i] = sum(dy * (x - mu[i])) over the m rows (cached
 * as for cbn_cols_stats). */
CBN_CLONES static void CBN_FN(cbn_cols_grad_sums)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x,
                                                  ptrdiff_t xa, ptrdiff_t sx, ptrdiff_t m, ptrdiff_t n, int cached,
                                                  const double *mu, double *sum_dy, double *sum_dy_xmu)
{
    for (ptrdiff_t c0 = 0; c0 < n; c0 += CBN_COLS) {
        ptrdiff_t w = n - c0 < CBN_COLS ? n - c0 : CBN_COLS;
        double acc_dy[CBN_COLS], acc_dy_xmu[CBN_COLS];
        for (ptrdiff_t i = 0; i < w; i++)
            acc_dy[i] = acc_dy_xmu[i] = 0;
        ptrdiff_t r = 0;
        if (sd == 1 && sx == 1 && (cached || cbn_rows_at_once(da, xa, sizeof(CBN_T))))
            for (; r + CBN_ROWS <= m; r += CBN_ROWS)
                CBN_FN(cbn_cols_acc_rows)(acc_dy, acc_dy_xmu, dy + r * da + c0, da, 1, x + r * xa + c0, xa, 1,
                                          mu + c0, w, CBN_ROWS);
        for (; r < m; r++) {
            const CBN_T *g = dy + r * da + c0 * sd, *v = x + r * xa + c0 * sx;
            if (sd == 1 && sx == 1)  /* unit strides as constants: the loop vectorizes */
                CBN_FN(cbn_cols_acc_rows)(acc_dy, acc_dy_xmu, g, da, 1, v, xa, 1, mu + c0, w, 1);
            else
                CBN_FN(cbn_cols_acc_rows)(acc_dy, acc_dy_xmu, g, da, sd, v, xa, sx, mu + c0, w, 1);
        }
        for (ptrdiff_t i = 0; i < w; i++) {
            sum_dy[c0 + i] = acc_dy[i];
            sum_dy_xmu[c0 + i] = acc_dy_xmu[i];
        }
    }
}

/* Through an activation: row by row, dz = dy * act'(z) (p as for cbn_cols_affine) goes to dz, then
 * its sums as cbn_cols_grad_sums, from L1.  dz NULL: ReLU or leaky ReLU on contiguous rows, the
 * sums only, in one loop (cbn_cols_relu_grad recomputes dz in the dx pass). */
CBN_CLONES static void CBN_FN(cbn_cols_act_grad_sums)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x,
                                                      ptrdiff_t xa, ptrdiff_t sx, CBN_T *dz, ptrdiff_t oa,
                                                      ptrdiff_t so, ptrdiff_t m, ptrdiff_t n, int cached,
                                                      const CBN_T *p, ptrdiff_t ps, int act, CBN_T slope,
                                                      const double *mu, double *sum_dy, double *sum_dy_xmu)
{
    for (ptrdiff_t c0 = 0; c0 < n; c0 += CBN_COLS) {
        ptrdiff_t w = n - c0 < CBN_COLS ? n - c0 : CBN_COLS;
        const CBN_T *mu_hi = p + c0, *scale = p + ps + c0, *shift = p + 2 * ps + c0;
        const CBN_T low = act == CBN_RELU ? (CBN_T)0 : slope;  /* ReLU's and leaky ReLU's slope below 0 */
        double acc_dy[CBN_COLS], acc_dy_xmu[CBN_COLS];
        for (ptrdiff_t i = 0; i < w; i++)
            acc_dy[i] = acc_dy_xmu[i] = 0;
        ptrdiff_t r = 0;
        if (dz == NULL && (cached || cbn_rows_at_once(da, xa, sizeof(CBN_T))))
            for (; r + CBN_ROWS <= m; r += CBN_ROWS)
                CBN_FN(cbn_cols_relu_acc_rows)(acc_dy, acc_dy_xmu, dy + r * da + c0, da, x + r * xa + c0, xa, mu_hi,
                                               scale, shift, low, mu + c0, w, CBN_ROWS);
        for (; r < m; r++) {
            const CBN_T *g = dy + r * da + c0 * sd, *v = x + r * xa + c0 * sx;
            CBN_T *o = dz ? dz + r * oa + c0 * so : NULL;
            if (dz == NULL) {
                CBN_FN(cbn_cols_relu_acc_rows)(acc_dy, acc_dy_xmu, g, da, v, xa, mu_hi, scale, shift, low, mu + c0,
                                               w, 1);
            } else if (sd == 1 && sx == 1 && so == 1) {
                CBN_ACT_GRAD_LOOPS(w, act, slope, g[i], (v[i] - mu_hi[i]) * scale[i] + shift[i], o[i]);
                CBN_FN(cbn_cols_acc_rows)(acc_dy, acc_dy_xmu, o, oa, 1, v, xa, 1, mu + c0, w, 1);
            } else {
                CBN_ACT_GRAD_LOOPS(w, act, slope, g[i * sd],
                                   (v[i * sx] - mu_hi[i]) * scale[i] + shift[i], o[i * so]);
                CBN_FN(cbn_cols_acc_rows)(acc_dy, acc_dy_xmu, o, oa, so, v, xa, sx, mu + c0, w, 1);
            }
        }
        for (ptrdiff_t i = 0; i < w; i++) {
            sum_dy[c0 + i] = acc_dy[i];
            sum_dy_xmu[c0 + i] = acc_dy_xmu[i];
        }
    }
}

/* w[0:k] = act((u - mu_hi) * scale + shift), a parameter per value: p holds 3 rows
 * (mu_hi, scale, shift), ps apart */
CBN_INLINE void CBN_FN(cbn_cols_affine_span)(CBN_T *w, const CBN_T *u, ptrdiff_t k, const CBN_T *p, ptrdiff_t ps,
                                                int act, CBN_T slope)
{
    const CBN_T *mu_hi = p, *scale = p + ps, *shift = p + 2 * ps;
    CBN_ACTIVATE_LOOPS(k, act, slope, w[i], (u[i] - mu_hi[i]) * scale[i] + shift[i]);
}

/* y = act((x - mu_hi) * scale + shift) per channel; p holds 3 rows (mu_hi, scale, shift) of ps
 * values; stream: contiguous rows of y are written with non-temporal stores. */
CBN_CLONES static void CBN_FN(cbn_cols_affine)(const CBN_T *x, ptrdiff_t xa, ptrdiff_t sx, CBN_T *y, ptrdiff_t ya,
                                               ptrdiff_t sy, ptrdiff_t m, ptrdiff_t n, const CBN_T *p, ptrdiff_t ps,
                                               int act, CBN_T slope, int stream)
{
    const CBN_T *mu_hi = p, *scale = p + ps, *shift = p + 2 * ps;
    if (sx == 1 && sy == 1 && xa == n && ya == n && n <= CBN_NARROW_ROW) {
        CBN_FLAT_CHUNKS(y, m, n, p, ps, 3, stream, pp,
                        CBN_FN(cbn_cols_affine_span)(w, x + f, k, pp + i0, CBN_FLAT_LEN, act, slope));
        cbn_stream_fence();
        return;
    }
    if (stream && sx == 1 && sy == 1) {
        CBN_STREAM_ROWS(y, ya, m, n, 1, r,
                        CBN_FN(cbn_cols_affine_span)(w, x + r * xa + i0, k, p + i0, ps, act, slope));
        cbn_stream_fence();
        return;
    }
    for (ptrdiff_t r = 0; r < m; r++, x += xa, y += ya) {
        if (sx == 1 && sy == 1) {
            CBN_FN(cbn_cols_affine_span)(y, x, n, p, ps, act, slope);
            continue;
        }
        CBN_ACTIVATE_LOOPS(n, act, slope, y[i * sy], (x[i * sx] - mu_hi[i]) * scale[i] + shift[i]);
    }
}

/* dz = dy * act'(z) per channel, z recomputed from x; p as for cbn_cols_affine */
CBN_CLONES static void CBN_FN(cbn_cols_act_grad)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x,
                                                 ptrdiff_t xa, ptrdiff_t sx, CBN_T *dz, ptrdiff_t oa, ptrdiff_t so,
                                                 ptrdiff_t m, ptrdiff_t n, const CBN_T *p, ptrdiff_t ps, int act,
                                                 CBN_T slope)
{
    const CBN_T *mu_hi = p, *scale = p + ps, *shift = p + 2 * ps;
    for (ptrdiff_t r = 0; r < m; r++, dy += da, x += xa, dz += oa) {
        if (sd == 1 && sx == 1 && so == 1)
            CBN_ACT_GRAD_LOOPS(n, act, slope, dy[i], (x[i] - mu_hi[i]) * scale[i] + shift[i], dz[i]);
        else
            CBN_ACT_GRAD_LOOPS(n, act, slope, dy[i * sd], (x[i * sx] - mu_hi[i]) * scale[i] + shift[i],
                               dz[i * so]);
    }
}

/* w[0:k] = ((q - dy_mean) - (u - mu_hi) * c_xmu) * k_dy, a parameter per value: p holds 4 rows
 * (mu_hi, dy_mean, c_xmu, k_dy), ps apart */
CBN_INLINE void CBN_FN(cbn_cols_grad_span)(CBN_T *w, const CBN_T *q, const CBN_T *u, ptrdiff_t k, const CBN_T *p,
                                              ptrdiff_t ps)
{
    const CBN_T *mu_hi = p, *dy_mean = p + ps, *c_xmu = p + 2 * ps, *k_dy = p + 3 * ps;
    for (ptrdiff_t i = 0; i < k; i++)
        w[i] = ((q[i] - dy_mean[i]) - (u[i] - mu_hi[i]) * c_xmu[i]) * k_dy[i];
}

/* dx = ((dy - dy_mean) - (x - mu_hi) * c_xmu) * k_dy per channel; p holds 4 rows (mu_hi, dy_mean,
 * c_xmu, k_dy) of ps values; stream as for cbn_cols_affine */
CBN_CLONES static void CBN_FN(cbn_cols_grad)(const CBN_T *dy, ptrdiff_t da, ptrdiff_t sd, const CBN_T *x, ptrdiff_t xa,
                                             ptrdiff_t sx, CBN_T *dx, ptrdiff_t oa, ptrdiff_t so, ptrdiff_t m,
                                             ptrdiff_t n, const CBN_T *p, ptrdiff_t ps, int stream)
{
    const CBN_T *mu_hi = p, *dy_mean = p + ps, *c_xmu = p + 2 * ps, *k_dy = p + 3 * ps;
    const int contiguous = sd == 1 && sx == 1 && so == 1;
    if (contiguous && da == n && xa == n && oa == n && n <= CBN_NARROW_ROW) {
        CBN_FLAT_CHUNKS(dx, m, n, p, ps, 4, stream, pp,
                        CBN_FN(cbn_cols_grad_span)(w, dy + f, x + f, k, pp + i0, CBN_FLAT_LEN));
        cbn_stream_fence();
        return;
    }
    if (stream && contiguous) {
        CBN_STREAM_ROWS(dx, oa, m, n, 1, r,
                        CBN_FN(cbn_cols_grad_span)(w, dy + r * da + i0, x + r * xa + i0, k, p + i0, ps));
        cbn_stream_fence();
        return;
    }
    for (ptrdiff_t r = 0; r < m; r++, dy += da, x += xa, dx += oa) {
        if (contiguous)
            CBN_FN(cbn_cols_grad_span)(dx, dy, x, n, p, ps);
        else
            for (ptrdiff_t i = 0; i < n; i++)
                dx[i * so] = ((dy[i * sd] - dy_mean[i]) - (x[i * sx] - mu_hi[i]) * c_xmu[i]) * k_dy[i];
    }
}

/* cbn_cols_grad_span of dz = dy * relu'(z) (low = 0) or leaky ReLU's (low = slope), the slope
 * recomputed from x rather than dz stored and read back; p holds 6 rows (mu_hi, dy_mean, c_xmu,
 * k_dy, and the affine scale and shift) of ps values, from index i0: z = (x - mu_hi) * scale +
 * shift as in the forward.  The same dz, so the same bits as storing it. */
CBN_INLINE void CBN_FN(cbn_cols_relu_grad_span)(CBN_T *w, const CBN_T *q, const CBN_T *u, ptrdiff_t k,
                                                   const CBN_T *p, ptrdiff_t ps, CBN_T low)
{
    const CBN_T *mu_hi = p, *dy_mean = p + ps, *c_xmu = p + 2 * ps, *k_dy = p + 3 * ps;
    const CBN_T *scale = p + 4 * ps, *shift = p + 5 * ps;
    CBN_RELU_GRAD_LOOP(k, low, w[i], q[i], u[i], mu_hi[i], dy_mean[i], c_xmu[i], k_dy[i], scale[i], shift[i]);
}

/* cbn_cols_grad through ReLU or leaky ReLU (cbn_cols_relu_grad_span), contiguous rows */
CBN_CLONES static void CBN_FN(cbn_cols_relu_grad)(const CBN_T *dy, ptrdiff_t da, const CBN_T *x, ptrdiff_t xa,
                                                  CBN_T *dx, ptrdiff_t oa, ptrdiff_t m, ptrdiff_t n, const CBN_T *p,
                                                  ptrdiff_t ps, CBN_T low, int stream)
{
    if (da == n && xa == n && oa == n && n <= CBN_NARROW_ROW) {
        CBN_FLAT_CHUNKS(dx, m, n, p, ps, 6, stream, pp,
                        CBN_FN(cbn_cols_relu_grad_span)(w, dy + f, x + f, k, pp + i0, CBN_FLAT_LEN, low));
        cbn_stream_fence();
        return;
    }
    if (stream) {
        CBN_STREAM_ROWS(dx, oa, m, n, 1, r,
                        CBN_FN(cbn_cols_relu_grad_span)(w, dy + r * da + i0, x + r * xa + i0, k, p + i0, ps, low));
        cbn_stream_fence();
        return;
    }
    for (ptrdiff_t r = 0; r < m; r++)
        CBN_FN(cbn_cols_relu_grad_span)(dx + r * oa, dy + r * da, x + r * xa, n, p, ps, low);
}

#undef CBN_FN
