// cbn's CUDA kernels, compiled at first use by cbn/_gpu.py (cupy.RawModule,
// one module per device and element type, kernels named by template).
//
// Every bulk array is viewed as A rows of Q = C * B values, channel c owning
// the B consecutive values at c * B of each row: NCHW is (N, C, H*W), NC and
// NHWC are (rows, C, 1).  cbn/_cuda_plan.py chooses the launch shapes from
// the array's shape only, so results never depend on the device.
//
// Element types T: float, double, cbn_half (float16, computed in float).
// W is the elementwise work type: float for float16/float32, double for
// float64.  Reductions accumulate in double, so float32 statistics keep
// float64 accuracy; partial sums are combined in a fixed order (bitwise
// reproducible).
//
// Per-channel inputs (mean, var or invstd, gamma, beta) come as a pointer and
// a type code (CH_*: float16, float32, float64, or absent: the default), so
// any float dtype is read without a conversion on the host.  Each thread
// derives its channel's parameters once, in double, then works in W: the
// mean split in two (mu_hi, mu_lo: x - mu_hi is exact for x near the mean,
// so large offsets cost nothing and a constant channel gives exactly the
// shift), scale = gamma * invstd, shift = beta.  The same formulas as the CPU
// kernels (src_c/cbn_loops_t.h).

struct cbn_half {
    unsigned short bits;
};

enum { CH_ABSENT, CH_HALF, CH_FLOAT, CH_DOUBLE };  // per-channel type codes of cbn/_gpu.py
enum { ACT_NONE, ACT_RELU, ACT_LEAKY_RELU, ACT_SIGMOID, ACT_TANH };  // codes of cbn/_args.py

__device__ __forceinline__ long long cbn_min(long long a, long long b) { return a < b ? a : b; }

template <typename T> struct cbn_work { typedef float type; };
template <> struct cbn_work<double> { typedef double type; };

__device__ __forceinline__ float cbn_load(const float *p) { return *p; }
__device__ __forceinline__ double cbn_load(const double *p) { return *p; }
__device__ __forceinline__ float cbn_load(const cbn_half *p)
{
    unsigned short h = p->bits;
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ void cbn_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void cbn_store(double *p, double v) { *p = v; }
__device__ __forceinline__ void cbn_store(cbn_half *p, float v)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
}

__device__ __forceinline__ float cbn_exp(float v) { return expf(v); }
__device__ __forceinline__ double cbn_exp(double v) { return exp(v); }
__device__ __forceinline__ float cbn_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double cbn_tanh(double v) { return tanh(v); }

template <typename W> __device__ __forceinline__ W cbn_activate(W z, int act, W slope)
{
    switch (act) {
    case ACT_RELU: return z < W(0) ? W(0) : z;  // NaN stays NaN, as in the CPU kernels
    case ACT_LEAKY_RELU: return z > W(0) ? z : z * slope;
    case ACT_SIGMOID: return W(1) / (W(1) + cbn_exp(-z));
    case ACT_TANH: return cbn_tanh(z);
    default: return z;
    }
}

// dy * act'(z), z the pre-activation
template <typename W> __device__ __forceinline__ W cbn_activation_grad(W dy, W z, int act, W slope)
{
    switch (act) {
    case ACT_RELU: return dy * (z > W(0) ? W(1) : W(0));  // dy * relu'(z), as the reference and the CPU kernels
    case ACT_LEAKY_RELU: return dy * (z > W(0) ? W(1) : slope);
    case ACT_SIGMOID: {
        W a = W(1) / (W(1) + cbn_exp(-z));
        return dy * a * (W(1) - a);
    }
    case ACT_TANH: {
        W a = cbn_tanh(z);
        return dy * (W(1) - a * a);
    }
    default: return dy;
    }
}

// Value c of a per-channel input, or ``missing`` when it is absent.
__device__ __forceinline__ double cbn_channel(const void *p, int type, long long c, double missing)
{
    switch (type) {
    case CH_HALF: return (double)cbn_load((const cbn_half *)p + c);
    case CH_FLOAT: return (double)((const float *)p)[c];
    case CH_DOUBLE: return ((const double *)p)[c];
    default: return missing;
    }
}

// The per-channel inputs of a kernel: mean, spread (invstd, or var when spread_is_var), gamma, beta.
struct cbn_channels {
    const void *mean, *spread, *gamma, *beta;
    int mean_t, spread_t, gamma_t, beta_t, spread_is_var;
    double eps;

    __device__ __forceinline__ double mean_at(long long c) const { return cbn_channel(mean, mean_t, c, 0.0); }
    __device__ __forceinline__ double invstd_at(long long c) const
    {
        double s = cbn_channel(spread, spread_t, c, 1.0);
        return spread_is_var ? 1.0 / sqrt(s + eps) : s;
    }
    __device__ __forceinline__ double gamma_at(long long c) const { return cbn_channel(gamma, gamma_t, c, 1.0); }
    __device__ __forceinline__ double beta_at(long long c) const { return cbn_channel(beta, beta_t, c, 0.0); }
};

#define CBN_CHANNEL_PARAMS                                                                                          \
    const void *mean, int mean_t, const void *spread, int spread_t, int spread_is_var, double eps,                 \
        const void *gamma, int gamma_t, const void *beta, int beta_t
#define CBN_CHANNEL_ARGS {mean, spread, gamma, beta, mean_t, spread_t, gamma_t, beta_t, spread_is_var, eps}

// y's parameters for channel c: z = ((x - mu_hi) - mu_lo) * scale + shift.
template <typename W> struct cbn_affine {
    W mu_hi, mu_lo, scale, shift;

    __device__ __forceinline__ cbn_affine(const cbn_channels &ch, long long c)
    {
        const double mean = ch.mean_at(c);
        mu_hi = (W)mean;
        mu_lo = (W)(mean - (double)mu_hi);
        scale = (W)(ch.gamma_at(c) * ch.invstd_at(c));
        shift = (W)ch.beta_at(c);
    }
    __device__ __forceinline__ W centred(W v) const { return (v - mu_hi) - mu_lo; }
};

// One element's contribution (s1, s2) to a channel's sums.
// MODE 0, statistics: d = x - pivot, (d, d*d), the pivot the channel's first value.
// MODE 1, gradient: dz = dy * act'(z), (dz, dz * (x - mean)).
template <typename T, int MODE> struct cbn_term {
    typedef typename cbn_work<T>::type W;
    double pivot;  // MODE 0: the pivot; MODE 1: the mean
    cbn_affine<W> affine;
    W slope;
    int act;

    __device__ __forceinline__ cbn_term(const T *x, const cbn_channels &ch, long long c, long long B, int act_,
                                        double slope_)
        : affine(ch, c), slope((W)slope_), act(act_)
    {
        pivot = MODE == 0 ? (double)cbn_load(x + c * B) : ch.mean_at(c);  // x + c * B: row 0, b 0 of channel c
    }

    __device__ __forceinline__ void add(const T *x, const T *dy, long long i, double &s1, double &s2) const
    {
        W v = cbn_load(x + i);
        if (MODE == 0) {
            double d = (double)v - pivot;
            s1 += d;
            s2 += d * d;
        } else {
            W g = cbn_load(dy + i);
            if (act != ACT_NONE)
                g = cbn_activation_grad(g, affine.centred(v) * affine.scale + affine.shift, act, slope);
            s1 += (double)g;
            s2 += (double)g * ((double)v - pivot);
        }
    }
};

// Sum (s1, s2) over a 1-D block of whole warps, in a fixed order; the result is in thread 0.
__device__ __forceinline__ void cbn_block_sum(double &s1, double &s2)
{
    __shared__ double shared[2][32];
    for (int offset = 16; offset > 0; offset >>= 1) {
        s1 += __shfl_down_sync(0xffffffffu, s1, offset);
        s2 += __shfl_down_sync(0xffffffffu, s2, offset);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        shared[0][warp] = s1;
        shared[1][warp] = s2;
    }
    __syncthreads();
    if (warp == 0) {
        s1 = lane < warps ? shared[0][lane] : 0.0;
        s2 = lane < warps ? shared[1][lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) {
            s1 += __shfl_down_sync(0xffffffffu, s1, offset);
            s2 += __shfl_down_sync(0xffffffffu, s2, offset);
        }
    }
}

// The channel's result from its n_part partial sums, by one whole warp, in a
// fixed order (so it does not matter which block finishes the channel):
// MODE 0: out rows (mean, invstd, biased var) in double, out_w the same in W;
// MODE 1: out rows (sum dz, sum dz * (x - mean)), out_w rows (dgamma, dbeta).
template <typename T, int MODE>
__device__ __forceinline__ void cbn_finish(const double *part, long long n_part, const T *x, const cbn_channels &ch,
                                           long long c, long long C, long long B, double count, double *out,
                                           typename cbn_work<T>::type *out_w, int lane)
{
    typedef typename cbn_work<T>::type W;
    const double *pc = part + 2 * c * n_part;
    double s1 = 0.0, s2 = 0.0;
    for (long long p = lane; p < n_part; p += 32) {
        s1 += __ldcg(pc + 2 * p);  // written by other blocks: read from L2, not a stale L1 line
        s2 += __ldcg(pc + 2 * p + 1);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        s1 += __shfl_down_sync(0xffffffffu, s1, offset);
        s2 += __shfl_down_sync(0xffffffffu, s2, offset);
    }
    if (lane != 0)
        return;
    if (MODE == 0) {
        const double d = s1 / count;  // mean - pivot
        const double mean = (double)cbn_load(x + c * B) + d;
        const double var = fmax((s2 - s1 * d) / count, 0.0);
        const double invstd = 1.0 / sqrt(var + ch.eps);
        out[c] = mean;
        out[C + c] = invstd;
        out[2 * C + c] = var;
        out_w[c] = (W)mean;
        out_w[C + c] = (W)invstd;
        out_w[2 * C + c] = (W)var;
    } else {
        out[c] = s1;
        out[C + c] = s2;
        out_w[c] = (W)(s2 * ch.invstd_at(c));
        out_w[C + c] = (W)s1;
    }
}

#define CBN_REDUCE_RESULTS                                                                                          \
    double *__restrict__ part, unsigned int *__restrict__ counter, double count, double *__restrict__ out,           \
        typename cbn_work<T>::type *__restrict__ out_w

// Per-channel sums when a channel's values come in runs of B >= 32: block k
// of channel c sums values [k * chunk, (k + 1) * chunk) of the channel (index
// j = a * B + b) into part[c * n_chunks + k]; the channel's last block to
// finish (counter: zero at launch, left at zero) turns its partials into the
// results.
// Grid: C * n_chunks blocks of whole warps.
template <typename T, int MODE>
__global__ void cbn_reduce_rows(const T *__restrict__ x, const T *__restrict__ dy, CBN_CHANNEL_PARAMS, long long A,
                                long long C, long long B, long long chunk, int n_chunks, int act, double slope,
                                CBN_REDUCE_RESULTS)
{
    __shared__ bool last;
    const long long c = blockIdx.x / n_chunks;
    const long long k = blockIdx.x - c * n_chunks;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    const cbn_term<T, MODE> term(x, ch, c, B, act, slope);
    const long long Q = C * B, end = cbn_min(A * B, (k + 1) * chunk), step = blockDim.x;
    const T *xc = x + c * B, *dyc = MODE == 1 ? dy + c * B : dy;
    // (a, b) of index j, advanced by step without a division per value
    long long j = k * chunk + threadIdx.x;
    long long a = j / B, b = j - a * B;
    const long long step_a = step / B, step_b = step - step_a * B;
    double s1 = 0.0, s2 = 0.0;
    for (; j + 3 * step < end; j += 4 * step) {  // four loads in flight
        long long offset[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            offset[u] = a * Q + b;
            a += step_a;
            b += step_b;
            if (b >= B) {
                b -= B;
                a++;
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++)
            term.add(xc, dyc, offset[u], s1, s2);
    }
    for (; j < end; j += step) {
        term.add(xc, dyc, a * Q + b, s1, s2);
        a += step_a;
        b += step_b;
        if (b >= B) {
            b -= B;
            a++;
        }
    }
    cbn_block_sum(s1, s2);
    if (threadIdx.x == 0) {
        part[2 * blockIdx.x] = s1;
        part[2 * blockIdx.x + 1] = s2;
        __threadfence();  // the partial is visible to every block before the count says so
        last = atomicAdd(counter + c, 1u) == (unsigned int)(n_chunks - 1);
        if (last)
            counter[c] = 0;  // every block of the channel has counted: ready for the next launch
    }
    __syncthreads();
    if (last && threadIdx.x < 32)
        cbn_finish<T, MODE>(part, n_chunks, x, ch, c, C, B, count, out, out_w, threadIdx.x);
}

// Per-column sums, for channels whose values come in short runs (B < 32;
// B == 1 for NC and NHWC): a (32, 8) block sums 32 columns q over rows
// [k * rows, (k + 1) * rows); column q = c * B + b of chunk k goes to
// partial (b * n_chunks + k) of channel c.  The last block to finish its
// part of a channel (counter: zero at launch, left at zero) turns the channel's
// partials into the results.  Grid: (ceil(Q / 32), n_chunks), blocks of (32, 8).
template <typename T, int MODE>
__global__ void cbn_reduce_cols(const T *__restrict__ x, const T *__restrict__ dy, CBN_CHANNEL_PARAMS, long long A,
                                long long C, long long B, long long rows, int n_chunks, int act, double slope,
                                CBN_REDUCE_RESULTS)
{
    __shared__ double shared[2][8][33];
    __shared__ long long finish[32];
    __shared__ int n_finish;
    const long long Q = C * B;
    const long long q = (long long)blockIdx.x * 32 + threadIdx.x;
    const bool active = q < Q;
    const long long c = active ? q / B : 0, b = q - c * B;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    double s1 = 0.0, s2 = 0.0;
    if (threadIdx.x == 0 && threadIdx.y == 0)
        n_finish = 0;
    if (active) {
        const cbn_term<T, MODE> term(x, ch, c, B, act, slope);
        const long long end = cbn_min(A, (blockIdx.y + 1) * rows);
        long long r = blockIdx.y * rows + threadIdx.y;
        for (; r + 24 < end; r += 32) {  // four loads in flight
#pragma unroll
            for (int u = 0; u < 4; u++)
                term.add(x, dy, (r + 8 * u) * Q + q, s1, s2);
        }
        for (; r < end; r += 8)
            term.add(x, dy, r * Q + q, s1, s2);
    }
    shared[0][threadIdx.y][threadIdx.x] = s1;
    shared[1][threadIdx.y][threadIdx.x] = s2;
    __syncthreads();
    if (threadIdx.y == 0 && active) {
        for (int i = 1; i < 8; i++) {
            s1 += shared[0][i][threadIdx.x];
            s2 += shared[1][i][threadIdx.x];
        }
        const long long p = (c * B + b) * n_chunks + blockIdx.y;  // = c * (B * n_chunks) + b * n_chunks + k
        part[2 * p] = s1;
        part[2 * p + 1] = s2;
        __threadfence();  // the partial is visible to every block before the count says so
    }
    __syncthreads();
    // one count per (channel, block), by the channel's first column in this block's tile
    if (threadIdx.y == 0 && active && (b == 0 || threadIdx.x == 0)) {
        const long long tiles = (c * B + B - 1) / 32 - c * B / 32 + 1;  // tiles holding channel c
        if (atomicAdd(counter + c, 1u) == (unsigned int)(tiles * n_chunks - 1)) {
            counter[c] = 0;  // every block of the channel has counted: ready for the next launch
            finish[atomicAdd(&n_finish, 1)] = c;
        }
    }
    __syncthreads();
    for (int i = threadIdx.y; i < n_finish; i += 8)  // one warp per finished channel
        cbn_finish<T, MODE>(part, B * n_chunks, x, ch, finish[i], C, B, count, out, out_w, threadIdx.x);
}

// Position of value j = a * B + b of a channel, advanced by a fixed step without a division per value;
// 32-bit (the one-block-per-channel kernels take arrays of fewer than 2**31 values): fewer registers.
struct cbn_walk {
    unsigned int a, b, step_a, step_b, B;

    __device__ __forceinline__ cbn_walk(unsigned int j, unsigned int step, unsigned int B_) : B(B_)
    {
        a = j / B;
        b = j - a * B;
        step_a = step / B;
        step_b = step - step_a * B;
    }
    __device__ __forceinline__ unsigned int offset(unsigned int Q) const { return a * Q + b; }
    __device__ __forceinline__ void next()
    {
        a += step_a;
        b += step_b;
        if (b >= B) {
            b -= B;
            a++;
        }
    }
};

// Sum (s1, s2) over the block and give every thread the result (cbn_block_sum, then a broadcast).
__device__ __forceinline__ void cbn_block_allsum(double &s1, double &s2)
{
    __shared__ double total[2];
    cbn_block_sum(s1, s2);
    if (threadIdx.x == 0) {
        total[0] = s1;
        total[1] = s2;
    }
    __syncthreads();
    s1 = total[0];
    s2 = total[1];
    __syncthreads();  // the shared sums may be reused
}

// Training forward of small channels, one block per channel holding its m <= blockDim.x * VALS values
// in registers: one read of x, the statistics two-pass from the registers (the mean from deviations
// from the pivot, then the variance from the centred values y is made of), y written; stats and out_w
// as cbn_finish (MODE 0).  y may be x.
#define CBN_CHANNEL_THREADS 512  // the block of the one-block-per-channel kernels (CHANNEL_THREADS in _cuda_plan.py)

template <typename T, int VALS>
__global__ void __launch_bounds__(CBN_CHANNEL_THREADS, 1) cbn_train_channel(const T *x, T *y, CBN_CHANNEL_PARAMS, long long A, long long C, long long B,
                                  int act, double slope, double *__restrict__ stats,
                                  typename cbn_work<T>::type *__restrict__ out_w)
{
    typedef typename cbn_work<T>::type W;
    const long long c = blockIdx.x, m = A * B;
    const unsigned int Q = (unsigned int)(C * B);
    const T *xc = x + c * B;
    const double pivot = (double)cbn_load(xc);
    W v[VALS];
    double s1 = 0.0, s2 = 0.0;
    cbn_walk w(threadIdx.x, blockDim.x, (unsigned int)B);
#pragma unroll
    for (int i = 0; i < VALS; i++) {
        if (threadIdx.x + (long long)i * blockDim.x < m) {
            v[i] = cbn_load(xc + w.offset(Q));
            s1 += (double)v[i] - pivot;
        }
        w.next();
    }
    cbn_block_allsum(s1, s2);
    const double mu = pivot + s1 / (double)m;
    const W mu_hi = (W)mu, mu_lo = (W)(mu - (double)mu_hi);
    s1 = 0.0;
#pragma unroll
    for (int i = 0; i < VALS; i++) {
        v[i] = (v[i] - mu_hi) - mu_lo;  // centred in place, as y needs it (exact near the mean)
        if (threadIdx.x + (long long)i * blockDim.x < m)
            s2 += (double)v[i] * (double)v[i];
    }
    cbn_block_allsum(s1, s2);
    const double var = s2 / (double)m;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    const double invstd = 1.0 / sqrt(var + ch.eps);
    if (threadIdx.x == 0) {
        stats[c] = mu;
        stats[C + c] = invstd;
        stats[2 * C + c] = var;
        out_w[c] = (W)mu;
        out_w[C + c] = (W)invstd;
        out_w[2 * C + c] = (W)var;
    }
    const W scale = (W)(ch.gamma_at(c) * invstd), shift = (W)ch.beta_at(c), w_slope = (W)slope;
    T *yc = y + c * B;
#pragma unroll
    for (int i = 0; i < VALS; i++) {
        const unsigned int j = threadIdx.x + i * blockDim.x, a = j / (unsigned int)B;  // recomputed: fewer
        if (j < m)                                                                    // registers held
            cbn_store(yc + (a * Q + (j - a * (unsigned int)B)), cbn_activate(v[i] * scale + shift, act, w_slope));
    }
}

// Backward of small channels, one block per channel with its dy and x in registers: the sums and dx
// in one launch (sums and out_w as cbn_finish, MODE 1).  dx may be dy or x.
template <typename T, int VALS>
__global__ void __launch_bounds__(CBN_CHANNEL_THREADS, 1) cbn_backward_channel(const T *dy, const T *x, T *dx, CBN_CHANNEL_PARAMS, long long A, long long C,
                                     long long B, int act, double slope, double *__restrict__ sums,
                                     typename cbn_work<T>::type *__restrict__ out_w)
{
    typedef typename cbn_work<T>::type W;
    const long long c = blockIdx.x, m = A * B;
    const unsigned int Q = (unsigned int)(C * B);
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    const cbn_affine<W> p(ch, c);
    const double mu = ch.mean_at(c), invstd = ch.invstd_at(c);
    const W w_slope = (W)slope;
    W g[VALS], xm[VALS];
    double s1 = 0.0, s2 = 0.0;
    cbn_walk w(threadIdx.x, blockDim.x, (unsigned int)B);
#pragma unroll
    for (int i = 0; i < VALS; i++) {
        if (threadIdx.x + (long long)i * blockDim.x < m) {
            const long long at = c * B + w.offset(Q);
            const W v = cbn_load(x + at);
            g[i] = cbn_load(dy + at);
            xm[i] = p.centred(v);
            if (act != ACT_NONE)
                g[i] = cbn_activation_grad(g[i], xm[i] * p.scale + p.shift, act, w_slope);
            s1 += (double)g[i];
            s2 += (double)g[i] * ((double)v - mu);
        }
        w.next();
    }
    cbn_block_allsum(s1, s2);
    if (threadIdx.x == 0) {
        sums[c] = s1;
        sums[C + c] = s2;
        out_w[c] = (W)(s2 * invstd);
        out_w[C + c] = (W)s1;
    }
    const W dy_mean = (W)(s1 / (double)m), c_xmu = (W)(invstd * invstd * s2 / (double)m);
    const W k_dy = (W)(ch.gamma_at(c) * invstd);
    cbn_walk out(threadIdx.x, blockDim.x, (unsigned int)B);
#pragma unroll
    for (int i = 0; i < VALS; i++) {
        if (threadIdx.x + (long long)i * blockDim.x < m)
            cbn_store(dx + c * B + out.offset(Q), ((g[i] - dy_mean) - xm[i] * c_xmu) * k_dy);
        out.next();
    }
}

// y = act(((x - mu_hi) - mu_lo) * scale + shift).  Thread (tx, ty) of block
// (bx, by) handles column q = bx * blockDim.x + tx, rows by * rows + ty + k *
// blockDim.y: one channel per thread, coalesced along q.  y may be x.
template <typename T>
__global__ void cbn_normalize(const T *x, T *y, CBN_CHANNEL_PARAMS, long long A, long long C, long long B,
                              long long rows, int act, double slope)
{
    typedef typename cbn_work<T>::type W;
    const long long Q = C * B;
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= Q)
        return;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    const cbn_affine<W> p(ch, q / B);
    const W w_slope = (W)slope;
    const long long end = cbn_min(A, (blockIdx.y + 1) * rows), step = blockDim.y;
    long long r = blockIdx.y * rows + threadIdx.y;
    for (; r + 7 * step < end; r += 8 * step) {  // eight loads in flight, then eight stores
        W v[8];
#pragma unroll
        for (int u = 0; u < 8; u++)
            v[u] = cbn_load(x + (r + u * step) * Q + q);
#pragma unroll
        for (int u = 0; u < 8; u++)
            cbn_store(y + (r + u * step) * Q + q, cbn_activate(p.centred(v[u]) * p.scale + p.shift, act, w_slope));
    }
    for (; r < end; r += step)
        cbn_store(y + r * Q + q, cbn_activate(p.centred(cbn_load(x + r * Q + q)) * p.scale + p.shift, act, w_slope));
}

// dx = ((dz - dy_mean) - ((x - mu_hi) - mu_lo) * c_xmu) * k_dy with dz = dy * act'(z), z recomputed
// from x, dy_mean = sum_dz / m, c_xmu = invstd^2 * sum_dz_xmu / m, k_dy = gamma * invstd (sums from
// the MODE 1 reduction).  Launched like cbn_normalize; dx may be dy or x.
template <typename T>
__global__ void cbn_backward_elemt(const T *dy, const T *x, T *dx, CBN_CHANNEL_PARAMS,
                                   const double *__restrict__ sums, double count, long long A, long long C,
                                   long long B, long long rows, int act, double slope)
{
    typedef typename cbn_work<T>::type W;
    const long long Q = C * B;
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= Q)
        return;
    const long long c = q / B;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    const cbn_affine<W> p(ch, c);
    const double invstd = ch.invstd_at(c);
    const W dy_mean = (W)(sums[c] / count), c_xmu = (W)(invstd * invstd * sums[C + c] / count);
    const W k_dy = (W)(ch.gamma_at(c) * invstd), w_slope = (W)slope;
    const long long end = cbn_min(A, (blockIdx.y + 1) * rows), step = blockDim.y;
    long long r = blockIdx.y * rows + threadIdx.y;
    for (; r < end; r += 4 * step) {  // four rows' loads in flight
        W g[4], xm[4];
        bool has[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            has[u] = r + u * step < end;
            if (has[u]) {
                const long long i = (r + u * step) * Q + q;
                g[u] = cbn_load(dy + i);
                xm[u] = p.centred(cbn_load(x + i));
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (has[u]) {
                W dz = act == ACT_NONE ? g[u] : cbn_activation_grad(g[u], xm[u] * p.scale + p.shift, act, w_slope);
                cbn_store(dx + (r + u * step) * Q + q, ((dz - dy_mean) - xm[u] * c_xmu) * k_dy);
            }
        }
    }
}
