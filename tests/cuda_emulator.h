// cbn's CUDA kernels compiled for the CPU, so that tests without a GPU run them
// (tests/test_cuda_emulated.py).  Include this, then cbn/cuda/batch_norm.cu,
// then one CBN_EMULATE_KERNEL(name, instance) per kernel instance; call
// cbn_emulate_launch with the arguments as cuLaunchKernel takes them.
//
// Each CUDA thread is a std::thread; the blocks of a launch run one after the
// other, so a __shared__ variable can be a plain static.  __syncthreads is a
// barrier of the block, __shfl_down_sync an exchange through a barrier of the
// warp (32 consecutive threads); a thread that returns leaves both barriers,
// as an exited thread leaves CUDA's.  Slow (a thread per value): for small
// arrays only.  It checks the kernels' logic and indexing, not their speed.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define CBN_CPU_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
    unsigned int x = 0, y = 0, z = 0;
};
struct uint4 {
    unsigned int x, y, z, w;
};

static uint3 blockDim, gridDim;
static thread_local uint3 threadIdx, blockIdx;

namespace cbn_emu {
using barrier = std::barrier<>;
static barrier *block_barrier;
static std::vector<std::unique_ptr<barrier>> warp_barriers;
static std::vector<unsigned long long> exchange;  // one 8-byte slot per thread, for the warp shuffles

inline unsigned int thread_id() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
}  // namespace cbn_emu

inline void __syncthreads() { cbn_emu::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int *p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).fetch_add(v); }
template <typename T> inline T __ldcg(const T *p) { return *p; }
inline double __dadd_rn(double a, double b) { return a + b; }  // g++ -ffp-contract=off: no fused multiply-add
inline double __dmul_rn(double a, double b) { return a * b; }

template <typename T> inline T __shfl_down_sync(unsigned int, T v, int offset)
{
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    const unsigned int id = cbn_emu::thread_id(), lane = id % 32;
    auto &warp = *cbn_emu::warp_barriers[id / 32];
    std::memcpy(&cbn_emu::exchange[id], &v, sizeof v);
    warp.arrive_and_wait();
    T r = v;
    if (lane + offset < 32)
        std::memcpy(&r, &cbn_emu::exchange[id + offset], sizeof r);
    warp.arrive_and_wait();  // the slots may be written again
    return r;
}

namespace cbn_emu {
using entry = std::function<void(void **)>;

// A kernel called with its arguments given as cuLaunchKernel takes them: args[i] points to argument i.
template <typename... A, std::size_t... I> void call(void (*f)(A...), void **args, std::index_sequence<I...>)
{
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>> *>(args[I])...);
}
template <typename... A> entry wrap(void (*f)(A...))
{
    return [f](void **args) { call(f, args, std::index_sequence_for<A...>{}); };
}

inline std::map<std::string, entry> &kernels()
{
    static std::map<std::string, entry> table;
    return table;
}

inline void launch(const entry &kernel, uint3 grid, uint3 block, void **args)
{
    gridDim = grid;
    blockDim = block;
    const unsigned int n = block.x * block.y * block.z;
    exchange.assign(n, 0);
    for (unsigned int bz = 0; bz < grid.z; bz++)
        for (unsigned int by = 0; by < grid.y; by++)
            for (unsigned int bx = 0; bx < grid.x; bx++) {
                barrier block_sync(n);
                block_barrier = &block_sync;
                warp_barriers.clear();
                for (unsigned int w = 0; w < n; w += 32)
                    warp_barriers.push_back(std::make_unique<barrier>(std::min(32u, n - w)));
                std::vector<std::thread> threads;
                for (unsigned int t = 0; t < n; t++)
                    threads.emplace_back([&, t] {
                        threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        kernel(args);
                        warp_barriers[t / 32]->arrive_and_drop();  // an exited thread waits on no barrier
                        block_barrier->arrive_and_drop();
                    });
                for (auto &thread : threads)
                    thread.join();
            }
}
}  // namespace cbn_emu

// cbn_emulate_launch(name, grid, block, args): 0, or -1 for an unknown kernel name.
extern "C" int cbn_emulate_launch(const char *name, const unsigned int *grid, const unsigned int *block, void **args)
{
    auto found = cbn_emu::kernels().find(name);
    if (found == cbn_emu::kernels().end())
        return -1;
    cbn_emu::launch(found->second, {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, args);
    return 0;
}

// CBN_EMULATE_KERNEL("name", instance): registers one kernel instance under its name expression.
#define CBN_EMU_CAT2(a, b) a##b
#define CBN_EMU_CAT(a, b) CBN_EMU_CAT2(a, b)
#define CBN_EMULATE_KERNEL(name, ...)                                                                                 \
    static const bool CBN_EMU_CAT(cbn_emu_registered_, __COUNTER__) =                                                 \
        (cbn_emu::kernels()[name] = cbn_emu::wrap(&__VA_ARGS__), true);
