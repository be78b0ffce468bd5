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
#ifndef CBN_CPU_EMULATION
    unsigned short h = p->bits;
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else  // the kernels compiled for the CPU (tests/cuda_emulator.h): the same conversion in software
    return (float)*reinterpret_cast<const _Float16 *>(&p->bits);
#endif
}

__device__ __forceinline__ void cbn_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void cbn_store(double *p, double v) { *p = v; }
__device__ __forceinline__ void cbn_store(cbn_half *p, float v)
{
#ifndef CBN_CPU_EMULATION
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(p->bits) : "f"(v));
#else
    *reinterpret_cast<_Float16 *>(&p->bits) = (_Float16)v;  // round to nearest even, as cvt.rn
#endif
}
__device__ __forceinline__ void cbn_store(cbn_half *p, double v)  // one rounding from double, as NumPy's cast
{
#ifndef CBN_CPU_EMULATION
    asm("cvt.rn.f16.f64 %0, %1;" : "=h"(p->bits) : "d"(v));
#else
    *reinterpret_cast<_Float16 *>(&p->bits) = (_Float16)v;
#endif
}

__device__ __forceinline__ float cbn_exp(float v) { return expf(v); }
__device__ __forceinline__ double cbn_exp(double v) { return exp(v); }
__device__ __forceinline__ float cbn_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double cbn_tanh(double v) { return tanh(v); }

template <typename W> __device__ __forceinline__ W cbn_sigmoid(W z) { return W(1) / (W(1) + cbn_exp(-z)); }
template <typename W> __device__ __forceinline__ W cbn_tanh_out(W z) { return cbn_tanh(z); }

template <typename W> __device__ __forceinline__ W cbn_activate(W z, int act, W slope)
{
    switch (act) {
    case ACT_RELU: return z < W(0) ? W(0) : z;  // NaN stays NaN, as in the CPU kernels
    case ACT_LEAKY_RELU: return z > W(0) ? z : z * slope;
    case ACT_SIGMOID: return cbn_sigmoid(z);
    case ACT_TANH: return cbn_tanh_out(z);
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
        W a = cbn_sigmoid(z);
        return dy * a * (W(1) - a);
    }
    case ACT_TANH: {
        W a = cbn_tanh_out(z);
        return dy * (W(1) - a * a);
    }
    default: return dy;
    }
}

// The same on N values in registers: one choice of activation for the batch, not a branch per value.
template <int ACT, int N, typename W> __device__ __forceinline__ void cbn_activate_each(W *v, W slope)
{
#pragma unroll
    for (int i = 0; i < N; i++)
        v[i] = cbn_activate(v[i], ACT, slope);
}

template <int N, typename W> __device__ __forceinline__ void cbn_activate_all(W *v, int act, W slope)
{
    switch (act) {
    case ACT_RELU: cbn_activate_each<ACT_RELU, N>(v, slope); break;
    case ACT_LEAKY_RELU: cbn_activate_each<ACT_LEAKY_RELU, N>(v, slope); break;
    case ACT_SIGMOID: cbn_activate_each<ACT_SIGMOID, N>(v, slope); break;
    case ACT_TANH: cbn_activate_each<ACT_TANH, N>(v, slope); break;
    }
}

// g[i] = g[i] * act'(z[i])
template <int ACT, int N, typename W>
__device__ __forceinline__ void cbn_activation_grad_each(W *g, const W *z, W slope)
{
#pragma unroll
    for (int i = 0; i < N; i++)
        g[i] = cbn_activation_grad(g[i], z[i], ACT, slope);
}

template <int N, typename W> __device__ __forceinline__ void cbn_activation_grad_all(W *g, const W *z, int act, W slope)
{
    switch (act) {
    case ACT_RELU: cbn_activation_grad_each<ACT_RELU, N>(g, z, slope); break;
    case ACT_LEAKY_RELU: cbn_activation_grad_each<ACT_LEAKY_RELU, N>(g, z, slope); break;
    case ACT_SIGMOID: cbn_activation_grad_each<ACT_SIGMOID, N>(g, z, slope); break;
    case ACT_TANH: cbn_activation_grad_each<ACT_TANH, N>(g, z, slope); break;
    }
}

// Values of a per-channel input at channels c[0], ..., c[N - 1], or ``missing`` where it is absent:
// one type switch for the N reads, so that they are in flight together (a thread reads its channels'
// inputs before anything else; reads one after the other would each wait a memory latency).
template <int N>
__device__ __forceinline__ void cbn_channel(const void *p, int type, const long long *c, double missing, double *v)
{
    switch (type) {
    case CH_HALF:
#pragma unroll
        for (int i = 0; i < N; i++)
            v[i] = (double)cbn_load((const cbn_half *)p + c[i]);
        break;
    case CH_FLOAT:
#pragma unroll
        for (int i = 0; i < N; i++)
            v[i] = (double)((const float *)p)[c[i]];
        break;
    case CH_DOUBLE:
#pragma unroll
        for (int i = 0; i < N; i++)
            v[i] = ((const double *)p)[c[i]];
        break;
    default:
#pragma unroll
        for (int i = 0; i < N; i++)
            v[i] = missing;
    }
}

// The per-channel inputs of a kernel: mean, spread (invstd, or var when spread_is_var), gamma, beta;
// read for N channels at once (means<N>, ...) or for one (mean_at, ...).
struct cbn_channels {
    const void *mean, *spread, *gamma, *beta;
    int mean_t, spread_t, gamma_t, beta_t, spread_is_var;
    double eps;

    template <int N> __device__ __forceinline__ void means(const long long *c, double *v) const
    {
        cbn_channel<N>(mean, mean_t, c, 0.0, v);
    }
    template <int N> __device__ __forceinline__ void invstds(const long long *c, double *v) const
    {
        cbn_channel<N>(spread, spread_t, c, 1.0, v);
        if (spread_is_var) {
#pragma unroll
            for (int i = 0; i < N; i++)
                v[i] = 1.0 / sqrt(v[i] + eps);
        }
    }
    template <int N> __device__ __forceinline__ void gammas(const long long *c, double *v) const
    {
        cbn_channel<N>(gamma, gamma_t, c, 1.0, v);
    }
    template <int N> __device__ __forceinline__ void betas(const long long *c, double *v) const
    {
        cbn_channel<N>(beta, beta_t, c, 0.0, v);
    }
    __device__ __forceinline__ double mean_at(long long c) const { double v; means<1>(&c, &v); return v; }
    __device__ __forceinline__ double invstd_at(long long c) const { double v; invstds<1>(&c, &v); return v; }
    __device__ __forceinline__ double gamma_at(long long c) const { double v; gammas<1>(&c, &v); return v; }
    __device__ __forceinline__ double beta_at(long long c) const { double v; betas<1>(&c, &v); return v; }
};

#define CBN_CHANNEL_PARAMS                                                                                          \
    const void *mean, int mean_t, const void *spread, int spread_t, int spread_is_var, double eps,                 \
        const void *gamma, int gamma_t, const void *beta, int beta_t
#define CBN_CHANNEL_ARGS {mean, spread, gamma, beta, mean_t, spread_t, gamma_t, beta_t, spread_is_var, eps}

// r = (1 - momentum) r + momentum b for value c of a per-channel array (CH_* type), in double
// without contraction into a fused multiply-add: update_running's bits (cbn/_compute.py).
__device__ __forceinline__ void cbn_update(void *p, int type, long long c, double b, double momentum)
{
    double r;
    cbn_channel<1>(p, type, &c, 0.0, &r);
    r = __dadd_rn(__dmul_rn(1.0 - momentum, r), __dmul_rn(momentum, b));
    switch (type) {
    case CH_HALF: cbn_store((cbn_half *)p + c, r); break;
    case CH_FLOAT: ((float *)p)[c] = (float)r; break;
    case CH_DOUBLE: ((double *)p)[c] = r; break;
    }
}

// The running statistics a training forward updates in place (CH_ABSENT: none), by the thread that
// finishes a channel's statistics: the mean, and the variance unbiased (count / (count - 1)).
struct cbn_running {
    void *mean, *var;
    int mean_t, var_t;
    double momentum;

    __device__ __forceinline__ void update(long long c, double batch_mean, double batch_var, double count) const
    {
        if (mean_t == CH_ABSENT)
            return;
        cbn_update(mean, mean_t, c, batch_mean, momentum);
        cbn_update(var, var_t, c, __dmul_rn(batch_var, count / (count - 1.0)), momentum);
    }
};

#define CBN_RUNNING_PARAMS void *run_mean, int run_mean_t, void *run_var, int run_var_t, double momentum
#define CBN_RUNNING_ARGS {run_mean, run_var, run_mean_t, run_var_t, momentum}

// y's parameters for channel c: z = ((x - mu_hi) - mu_lo) * scale + shift.
template <typename W> struct cbn_affine {
    W mu_hi, mu_lo, scale, shift;

    __device__ __forceinline__ cbn_affine() : mu_hi(0), mu_lo(0), scale(0), shift(0) {}
    __device__ __forceinline__ cbn_affine(const cbn_channels &ch, long long c) { of<1>(ch, &c, this); }

    // the parameters of channels c[0..N) into out[0..N)
    template <int N>
    __device__ __forceinline__ static void of(const cbn_channels &ch, const long long *c, cbn_affine *out)
    {
        double mean[N], invstd[N], gamma[N], beta[N];
        ch.means<N>(c, mean);
        ch.invstds<N>(c, invstd);
        ch.gammas<N>(c, gamma);
        ch.betas<N>(c, beta);
#pragma unroll
        for (int i = 0; i < N; i++) {
            out[i].mu_hi = (W)mean[i];
            out[i].mu_lo = (W)(mean[i] - (double)out[i].mu_hi);
            out[i].scale = (W)(gamma[i] * invstd[i]);
            out[i].shift = (W)beta[i];
        }
    }
    __device__ __forceinline__ W centred(W v) const { return (v - mu_hi) - mu_lo; }
};

// The channels of columns q, q + 1, ..., q + N - 1 of a row.
template <int N> __device__ __forceinline__ void cbn_column_channels(long long q, long long B, long long *c)
{
#pragma unroll
    for (int i = 0; i < N; i++)
        c[i] = (q + i) / B;
}

// Vectors of VEC consecutive elements (VEC = 1, or 16 bytes' worth): one 16-byte access when the
// call's arrays are 16-byte aligned, else VEC element accesses.  Either way each thread gets the same
// values in the same order, so results do not depend on alignment.
template <typename T, int VEC>
__device__ __forceinline__ void cbn_load_vec(const T *p, typename cbn_work<T>::type *v, bool aligned)
{
    if (VEC * sizeof(T) == 16 && aligned) {
        union {
            uint4 bits;
            T t[VEC];
        } u;
        u.bits = *reinterpret_cast<const uint4 *>(p);
#pragma unroll
        for (int i = 0; i < VEC; i++)
            v[i] = cbn_load(&u.t[i]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++)
            v[i] = cbn_load(p + i);
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void cbn_store_vec(T *p, const typename cbn_work<T>::type *v, bool aligned)
{
    if (VEC * sizeof(T) == 16 && aligned) {
        union {
            uint4 bits;
            T t[VEC];
        } u;
#pragma unroll
        for (int i = 0; i < VEC; i++)
            cbn_store(&u.t[i], v[i]);
        *reinterpret_cast<uint4 *>(p) = u.bits;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++)
            cbn_store(p + i, v[i]);
    }
}

// One element's contribution (s1, s2) to a channel's sums.
// MODE 0, statistics: d = x - pivot, (d, d*d), the pivot the channel's first value.
// MODE 1, gradient: dz = dy * act'(z), (dz, dz * (x - mean)).
template <typename T, int MODE> struct cbn_term {
    typedef typename cbn_work<T>::type W;
    double pivot;  // MODE 0: the pivot; MODE 1: the mean
    cbn_affine<W> affine;
    W slope;
    int act;

    __device__ __forceinline__ cbn_term() {}
    __device__ __forceinline__ cbn_term(const T *x, const cbn_channels &ch, long long c, long long B, int act,
                                        double slope)
    {
        of<1>(x, ch, &c, B, act, slope, this);
    }

    // the terms of channels c[0..N) into out[0..N)
    template <int N>
    __device__ __forceinline__ static void of(const T *x, const cbn_channels &ch, const long long *c, long long B,
                                              int act, double slope, cbn_term *out)
    {
        double pivot[N];
        cbn_affine<W> affine[N];
        if (MODE == 0) {
#pragma unroll
            for (int i = 0; i < N; i++)
                pivot[i] = (double)cbn_load(x + c[i] * B);  // x + c * B: row 0, b 0 of channel c
        } else {
            ch.means<N>(c, pivot);
            if (act != ACT_NONE)  // z is needed only for the activation's gradient
                cbn_affine<W>::template of<N>(ch, c, affine);
        }
#pragma unroll
        for (int i = 0; i < N; i++) {
            out[i].pivot = pivot[i];
            out[i].affine = affine[i];
            out[i].slope = (W)slope;
            out[i].act = act;
        }
    }

    // v: x's value; g: dy's (MODE 1)
    __device__ __forceinline__ void add(W v, W g, double &s1, double &s2) const
    {
        if (MODE == 0) {
            double d = (double)v - pivot;
            s1 += d;
            s2 += d * d;
        } else {
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

// Channel c's result from its n_part partial sums (pairs at part + 2 * c * n_part), by a whole 1-D
// block, in a fixed order (so it does not matter which block finishes the channel):
// MODE 0: out rows (mean, invstd, biased var) in double, out_w the same in W, the running statistics
// updated; MODE 1: out rows (sum dz, sum dz * (x - mean)), out_w rows (dgamma, dbeta).
template <typename T, int MODE>
__device__ __forceinline__ void cbn_finish(const double *part, long long n_part, const T *x, const cbn_channels &ch,
                                           long long c, long long C, long long B, double count, double *out,
                                           typename cbn_work<T>::type *out_w, const cbn_running &running)
{
    typedef typename cbn_work<T>::type W;
    const double *pc = part + 2 * c * n_part;
    double s1 = 0.0, s2 = 0.0;
#pragma unroll 4
    for (long long p = threadIdx.x; p < n_part; p += blockDim.x) {
        s1 += __ldcg(pc + 2 * p);  // written by other blocks: read from L2, not a stale L1 line
        s2 += __ldcg(pc + 2 * p + 1);
    }
    cbn_block_sum(s1, s2);
    if (threadIdx.x != 0)
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
        running.update(c, mean, var, count);
    } else {
        out[c] = s1;
        out[C + c] = s2;
        out_w[c] = (W)(s2 * ch.invstd_at(c));
        out_w[C + c] = (W)s1;
    }
}

#define CBN_REDUCE_RESULTS                                                                                          \
    double count, double *__restrict__ out, typename cbn_work<T>::type *__restrict__ out_w, CBN_RUNNING_PARAMS

// Per-channel sums when a channel's values come in runs of B >= 32, in vectors of VEC values (B a
// multiple of VEC): block k of channel c sums the channel's vectors [k * span, (k + 1) * span)
// (vector j = a * (B / VEC) + b / VEC) into part[c * n_chunks + k]; the channel's last block to finish
// (counter: zero at launch, left at zero) turns its partials into the results (cbn_finish).
// Grid: C * n_chunks blocks of whole warps.
template <typename T, int MODE, int VEC>
__global__ void cbn_reduce_rows(const T *__restrict__ x, const T *__restrict__ dy, CBN_CHANNEL_PARAMS, long long A,
                                long long C, long long B, long long span, int n_chunks, int aligned, int act,
                                double slope, double *__restrict__ part, unsigned int *__restrict__ counter,
                                CBN_REDUCE_RESULTS)
{
    typedef typename cbn_work<T>::type W;
    enum { U = 4 };  // vectors in flight per thread
    __shared__ bool last;
    const long long c = blockIdx.x / n_chunks;
    const long long k = blockIdx.x - c * n_chunks;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    const cbn_term<T, MODE> term(x, ch, c, B, act, slope);
    const long long Q = C * B, BV = B / VEC, end = cbn_min(A * BV, (k + 1) * span), step = blockDim.x;
    const T *xc = x + c * B, *dyc = MODE == 1 ? dy + c * B : dy;
    // (a, b) of vector j, b in values, advanced by step vectors without a division per vector
    long long j = k * span + threadIdx.x;
    long long a = j / BV, b = (j - a * BV) * VEC;
    const long long step_a = step / BV, step_b = (step - step_a * BV) * VEC;
    double s1 = 0.0, s2 = 0.0;
    W v[U][VEC], g[U][VEC];
    for (; j < end; j += U * step) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (j + u * step < end) {
                cbn_load_vec<T, VEC>(xc + (a * Q + b), v[u], aligned);
                if (MODE == 1)
                    cbn_load_vec<T, VEC>(dyc + (a * Q + b), g[u], aligned);
            }
            a += step_a;
            b += step_b;
            if (b >= B) {
                b -= B;
                a++;
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (j + u * step < end) {
#pragma unroll
                for (int i = 0; i < VEC; i++)
                    term.add(v[u][i], MODE == 1 ? g[u][i] : W(0), s1, s2);
            }
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
    if (last)
        cbn_finish<T, MODE>(part, n_chunks, x, ch, c, C, B, count, out, out_w, CBN_RUNNING_ARGS);
}

#define CBN_SPLIT_THREADS 256  // the block of the split kernels (THREADS in _cuda_plan.py)

// Per-column sums, for channels whose values come in short runs (B < 32; B == 1 for NC and NHWC), an
// element access per value (16-byte columns measured slower: see reduce_plan in _cuda_plan.py):
// thread (tx, ty) of block (gx, gy), blocks of (BX, BY) threads, sums column q = gx * BX + tx over
// rows gy * rows + ty, + BY, ... below (gy + 1) * rows, into partial q * n_chunks + gy: channel c's
// B * n_chunks partials follow each other from c * B * n_chunks, for cbn_finish_channels.
// Grid: (ceil(C * B / BX), n_chunks).
template <typename T, int MODE>
__global__ void __launch_bounds__(CBN_SPLIT_THREADS)
    cbn_reduce_cols(const T *__restrict__ x, const T *__restrict__ dy, CBN_CHANNEL_PARAMS, long long A, long long C,
                    long long B, long long rows, int n_chunks, int act, double slope, double *__restrict__ part)
{
    typedef typename cbn_work<T>::type W;
    enum { U = 4 };  // rows in flight per thread
    __shared__ double shared[2][CBN_SPLIT_THREADS];
    const long long Q = C * B;
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = q < Q;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    double s1 = 0.0, s2 = 0.0;
    if (active) {
        const cbn_term<T, MODE> term(x, ch, q / B, B, act, slope);
        const long long end = cbn_min(A, (blockIdx.y + 1) * rows), step = blockDim.y;
        W v[U], g[U];
        for (long long r = blockIdx.y * rows + threadIdx.y; r < end; r += U * step) {
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (r + u * step < end) {
                    v[u] = cbn_load(x + (r + u * step) * Q + q);
                    if (MODE == 1)
                        g[u] = cbn_load(dy + (r + u * step) * Q + q);
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (r + u * step < end)
                    term.add(v[u], MODE == 1 ? g[u] : W(0), s1, s2);
            }
        }
    }
    // the block's rows summed in a fixed tree order; shared[.][ty * BX + tx]
    const int at = threadIdx.y * blockDim.x + threadIdx.x;
    shared[0][at] = s1;
    shared[1][at] = s2;
    __syncthreads();
    for (int half = blockDim.y >> 1; half > 0; half >>= 1) {
        if ((int)threadIdx.y < half) {
            shared[0][at] += shared[0][at + half * blockDim.x];
            shared[1][at] += shared[1][at + half * blockDim.x];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && active) {
        const long long p = q * n_chunks + blockIdx.y;
        part[2 * p] = shared[0][at];
        part[2 * p + 1] = shared[1][at];
    }
}

// The results of cbn_reduce_cols' partials: block c finishes channel c (cbn_finish).  Grid: C blocks.
template <typename T, int MODE>
__global__ void cbn_finish_channels(const T *__restrict__ x, CBN_CHANNEL_PARAMS, long long C, long long B,
                                    long long n_part, const double *__restrict__ part, CBN_REDUCE_RESULTS)
{
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    cbn_finish<T, MODE>(part, n_part, x, ch, blockIdx.x, C, B, count, out, out_w, CBN_RUNNING_ARGS);
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
// as cbn_finish (MODE 0), the running statistics updated.  y may be x.
#define CBN_CHANNEL_THREADS 512  // the block of the one-block-per-channel kernels (CHANNEL_THREADS in _cuda_plan.py)

template <typename T, int VALS>
__global__ void __launch_bounds__(CBN_CHANNEL_THREADS, 1)
    cbn_train_channel(const T *x, T *y, CBN_CHANNEL_PARAMS, long long A, long long C, long long B, int act,
                      double slope, double *__restrict__ stats, typename cbn_work<T>::type *__restrict__ out_w,
                      CBN_RUNNING_PARAMS)
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
        const cbn_running running = CBN_RUNNING_ARGS;
        running.update(c, mu, var, (double)m);
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
__global__ void __launch_bounds__(CBN_CHANNEL_THREADS, 1)
    cbn_backward_channel(const T *dy, const T *x, T *dx, CBN_CHANNEL_PARAMS, long long A, long long C, long long B,
                         int act, double slope, double *__restrict__ sums,
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

// The elementwise kernels' threads: thread (tx, ty) of block (bx, by) handles the VEC columns
// q = (bx * blockDim.x + tx) * VEC + i, i < VEC (Q a multiple of VEC; the columns' channels may
// differ), rows by * rows + ty + k * blockDim.y: coalesced along q.

// y = act(((x - mu_hi) - mu_lo) * scale + shift).  y may be x.
template <typename T, int VEC>
__global__ void cbn_normalize(const T *x, T *y, CBN_CHANNEL_PARAMS, long long A, long long C, long long B,
                              long long rows, int aligned, int act, double slope)
{
    typedef typename cbn_work<T>::type W;
    enum { U = VEC == 1 ? 8 : 4 };  // rows in flight per thread
    const long long Q = C * B;
    const long long q = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (q >= Q)
        return;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    long long c[VEC];
    cbn_column_channels<VEC>(q, B, c);
    cbn_affine<W> p[VEC];
    cbn_affine<W>::template of<VEC>(ch, c, p);
    const W w_slope = (W)slope;
    const long long end = cbn_min(A, (blockIdx.y + 1) * rows), step = blockDim.y;
    for (long long r = blockIdx.y * rows + threadIdx.y; r < end; r += U * step) {
        W v[U][VEC];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (r + u * step < end)
                cbn_load_vec<T, VEC>(x + (r + u * step) * Q + q, v[u], aligned);
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int i = 0; i < VEC; i++)
                v[u][i] = p[i].centred(v[u][i]) * p[i].scale + p[i].shift;
        if (act != ACT_NONE)
            cbn_activate_all<U * VEC>(&v[0][0], act, w_slope);
#pragma unroll
        for (int u = 0; u < U; u++)
            if (r + u * step < end)
                cbn_store_vec<T, VEC>(y + (r + u * step) * Q + q, v[u], aligned);
    }
}

// dx = ((dz - dy_mean) - ((x - mu_hi) - mu_lo) * c_xmu) * k_dy with dz = dy * act'(z), z recomputed
// from x, dy_mean = sum_dz / m, c_xmu = invstd^2 * sum_dz_xmu / m, k_dy = gamma * invstd (sums from
// the MODE 1 reduction).  Launched like cbn_normalize; dx may be dy or x.
template <typename T, int VEC>
__global__ void __launch_bounds__(CBN_SPLIT_THREADS, 2)
    cbn_backward_elemt(const T *dy, const T *x, T *dx, CBN_CHANNEL_PARAMS, const double *__restrict__ sums,
                       double count, long long A, long long C, long long B, long long rows, int aligned, int act,
                       double slope)
{
    typedef typename cbn_work<T>::type W;
    enum { U = sizeof(T) == 2 && VEC > 1 ? 2 : 4 };  // rows in flight per thread (float16 vectors widen to 8 floats)
    const long long Q = C * B;
    const long long q = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (q >= Q)
        return;
    const cbn_channels ch = CBN_CHANNEL_ARGS;
    long long c[VEC];
    cbn_column_channels<VEC>(q, B, c);
    cbn_affine<W> p[VEC];
    cbn_affine<W>::template of<VEC>(ch, c, p);
    double invstd_c[VEC], gamma_c[VEC];
    ch.invstds<VEC>(c, invstd_c);
    ch.gammas<VEC>(c, gamma_c);
    W dy_mean[VEC], c_xmu[VEC], k_dy[VEC];
#pragma unroll
    for (int i = 0; i < VEC; i++) {
        dy_mean[i] = (W)(sums[c[i]] / count);
        c_xmu[i] = (W)(invstd_c[i] * invstd_c[i] * sums[C + c[i]] / count);
        k_dy[i] = (W)(gamma_c[i] * invstd_c[i]);
    }
    const W w_slope = (W)slope;
    const long long end = cbn_min(A, (blockIdx.y + 1) * rows), step = blockDim.y;
    for (long long r = blockIdx.y * rows + threadIdx.y; r < end; r += U * step) {
        W g[U][VEC], v[U][VEC];
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (r + u * step < end) {
                const long long at = (r + u * step) * Q + q;
                cbn_load_vec<T, VEC>(dy + at, g[u], aligned);
                cbn_load_vec<T, VEC>(x + at, v[u], aligned);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int i = 0; i < VEC; i++)
                v[u][i] = p[i].centred(v[u][i]);  // x - mean
        if (act != ACT_NONE) {
            W z[U][VEC];
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int i = 0; i < VEC; i++)
                    z[u][i] = v[u][i] * p[i].scale + p[i].shift;
            cbn_activation_grad_all<U * VEC>(&g[0][0], &z[0][0], act, w_slope);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (r + u * step < end) {
#pragma unroll
                for (int i = 0; i < VEC; i++)
                    g[u][i] = ((g[u][i] - dy_mean[i]) - v[u][i] * c_xmu[i]) * k_dy[i];
                cbn_store_vec<T, VEC>(dx + (r + u * step) * Q + q, g[u], aligned);
            }
        }
    }
}
