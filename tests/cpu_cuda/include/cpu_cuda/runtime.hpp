#pragma once
// The project's CPU execution of its CUDA code: a test facility, never
// installed. With tests/cpu_cuda/include ahead on the include path and
// PATCHWORK_CPU_CUDA defined, the kernels of patchwork/kernels/ and the
// device modules compile with the host C++ compiler and run on the CPU:
//
//   - kernels::launch (common.cuh) hands a kernel to cpu_cuda::launch, which
//     checks the configuration as the driver does (at most 1024 threads per
//     block, grid y and z at most 65535; a bad one is reported by the next
//     cudaGetLastError) and runs the blocks one after another, the threads of
//     a block concurrently: as fibers on the launching thread (switched at
//     every barrier and warp exchange by a hand-written stack switch on
//     x86-64, by ucontext elsewhere; AddressSanitizer is told of each stack
//     switch), or, under ThreadSanitizer (or with
//     PATCHWORK_CPU_CUDA_THREADS=1), as real threads of a pool reused from
//     block to block, so that a missing __syncthreads is a data race that
//     ThreadSanitizer reports;
//   - threadIdx, blockIdx, blockDim, gridDim are thread-local variables set
//     for each thread; __syncthreads is a barrier of the block; __shared__
//     variables are function statics (one instance, and blocks run one at a
//     time: a global lock serialises launches);
//   - warp shuffles, ballots and __syncwarp exchange values among the 32
//     lanes of a warp through per-warp slot arrays and a warp barrier;
//   - atomics are std::atomic_ref operations;
//   - device memory is host memory (256-byte aligned, so AddressSanitizer
//     sees every out-of-bounds access); copies, memsets and kernels run when
//     queued, so every stream is always complete and events record host time;
//   - two devices are reported (so multi-device code paths run), each thread
//     has its current device, and cudaMalloc remembers the device;
//   - cuBLAS GEMMs are plain column-major loops written from cuBLAS's
//     definition (C = alpha op(A) op(B) + beta C, C not read when beta = 0),
//     independent of patchwork/cuda/gemm_plan.hpp, so the row-major mapping
//     is tested;
//   - __nv_bfloat16 is 16-bit storage with round-to-nearest-even conversion.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <math.h>  // the float overloads of erff, expf, ... in the global namespace, as CUDA has them
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// The fibers switch stacks with a few lines of assembly on x86-64 (see
// switch_stack), with ucontext elsewhere (or where CPU_CUDA_UCONTEXT is defined).
#if defined(__x86_64__) && !defined(CPU_CUDA_UCONTEXT)
#define CPU_CUDA_FIBER_ASM 1
#else
#define CPU_CUDA_FIBER_ASM 0
#include <ucontext.h>
#endif

// Which sanitizer is on: g++ defines __SANITIZE_ADDRESS__ and
// __SANITIZE_THREAD__, clang answers __has_feature.
#if defined(__SANITIZE_ADDRESS__)
#define CPU_CUDA_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define CPU_CUDA_TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) && !defined(CPU_CUDA_ASAN)
#define CPU_CUDA_ASAN 1
#endif
#if __has_feature(thread_sanitizer) && !defined(CPU_CUDA_TSAN)
#define CPU_CUDA_TSAN 1
#endif
#endif

#ifdef CPU_CUDA_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static

// ---- types -----------------------------------------------------------------

struct uint3 {
    unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
inline constexpr int warpSize = 32;

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
inline constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;

struct CUstream_st {
    int device = 0;
};
struct CUevent_st {
    std::chrono::steady_clock::time_point at{};
    bool recorded = false;
};
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;

struct cudaDeviceProp {
    char name[256] = {};
    std::size_t totalGlobalMem = 0;
    std::size_t sharedMemPerBlock = 0;
    int regsPerBlock = 0, warpSize = 32, maxThreadsPerBlock = 1024;
    int maxThreadsDim[3] = {1024, 1024, 64};
    int maxGridSize[3] = {2147483647, 65535, 65535};
    int multiProcessorCount = 1, major = 0, minor = 0;
    int clockRate = 0, memoryClockRate = 0, memoryBusWidth = 0, l2CacheSize = 0;
};

// ---- bf16 storage ------------------------------------------------------------

struct __nv_bfloat16 {
    std::uint16_t bits = 0;
};
using nv_bfloat16 = __nv_bfloat16;

inline float __bfloat162float(__nv_bfloat16 h) {
    const std::uint32_t u = std::uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
/// Round to nearest, ties to even (NaN stays a quiet NaN).
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) return {std::uint16_t((u >> 16) | 0x0040u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {std::uint16_t(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---- the executor --------------------------------------------------------------

namespace cpu_cuda {

/// Set while a block's threads run as fibers on the calling thread.
inline thread_local bool in_fiber = false;
/// Switch from the running fiber back to the scheduler (defined with FiberPool).
inline void fiber_yield();

/// A reusable barrier for `count` threads that threads can leave (arrive_and_drop).
/// Arrivals are counted under a mutex; waiters sleep on an atomic generation
/// (a futex, no mutex to re-acquire on wake-up), released by the last arrival.
/// Both give the happens-before edges ThreadSanitizer needs.
class Barrier {
public:
    void reset(int count) {
        std::lock_guard lock(m_);
        count_ = count;
        waiting_ = 0;
    }
    void arrive_and_wait() {
        if (in_fiber) {  // one OS thread: no lock; the others run while this fiber yields
            const std::uint64_t gen = generation_.load(std::memory_order_relaxed);
            if (++waiting_ >= count_) {
                waiting_ = 0;
                generation_.store(gen + 1, std::memory_order_relaxed);
                return;
            }
            while (generation_.load(std::memory_order_relaxed) == gen) fiber_yield();
            return;
        }
        std::uint64_t gen;
        {
            std::lock_guard lock(m_);
            gen = generation_.load(std::memory_order_relaxed);
            if (++waiting_ >= count_) {
                release();
                return;
            }
        }
        while (generation_.load(std::memory_order_acquire) == gen) generation_.wait(gen, std::memory_order_acquire);
    }
    void arrive_and_drop() {
        std::lock_guard lock(m_);
        --count_;
        if (count_ > 0 && waiting_ >= count_) release();
    }

private:
    void release() {
        waiting_ = 0;
        generation_.fetch_add(1, std::memory_order_acq_rel);
        generation_.notify_all();
    }
    std::mutex m_;
    int count_ = 0, waiting_ = 0;
    std::atomic<std::uint64_t> generation_{0};
};

/// The lanes of one warp: the warp's barrier and two sets of value slots, used
/// in turn by successive exchanges. One barrier per exchange suffices: a lane
/// writing set s for exchange i + 2 has passed the barrier of exchange i + 1,
/// which every lane reaches only after reading set s for exchange i.
struct Warp {
    Barrier bar;
    std::uint64_t slot[2][32] = {};
    int turn[32] = {};  ///< per lane: the set its next exchange uses
};

/// What the threads of the running block share.
struct Block {
    Barrier bar;
    std::vector<std::unique_ptr<Warp>> warps;
    dim3 block, grid;
    uint3 index;
    int threads = 0;
};

inline thread_local Block* current_block = nullptr;

[[nodiscard]] inline int linear_thread() {
    return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
[[nodiscard]] inline Warp& this_warp() { return *current_block->warps[std::size_t(linear_thread() / 32)]; }

/// A pool of worker threads, grown to the largest block seen and reused. The
/// workers of each warp-sized group sleep on their group's atomic generation
/// (a futex); a block wakes the groups it needs only, and ends when the last
/// of its workers counts down.
class Pool {
public:
    ~Pool() {
        stop_.store(true, std::memory_order_release);
        for (auto& g : generation_) {
            g.fetch_add(1, std::memory_order_acq_rel);
            g.notify_all();
        }
        for (auto& t : workers_) t.join();
    }

    /// Runs body() on block.threads workers (thread i gets threadIdx from i) and waits for all.
    void run_block(Block& block, const std::function<void()>& body) {
        while (int(workers_.size()) < block.threads) {
            const int id = int(workers_.size());
            workers_.emplace_back([this, id, seen = generation_[std::size_t(id / 32)].load()] { work(id, seen); });
        }
        block_ = &block;
        body_ = &body;
        // Every woken worker counts down, also the idle ones of a partly used
        // group: none may still read block_ when the next block is set up.
        const int groups = (block.threads + 31) / 32;
        remaining_.store(std::min(int(workers_.size()), groups * 32), std::memory_order_relaxed);
        for (int g = 0; g < groups; ++g) {
            generation_[std::size_t(g)].fetch_add(1, std::memory_order_acq_rel);
            generation_[std::size_t(g)].notify_all();
        }
        for (int left = remaining_.load(std::memory_order_acquire); left != 0;
             left = remaining_.load(std::memory_order_acquire))
            remaining_.wait(left, std::memory_order_acquire);
        std::exception_ptr e;
        {
            std::lock_guard lock(error_mutex_);
            e = std::exchange(error_, nullptr);
        }
        if (e) std::rethrow_exception(e);
    }

private:
    void work(int id, std::uint64_t seen) {
        std::atomic<std::uint64_t>& generation = generation_[std::size_t(id / 32)];
        for (;;) {
            std::uint64_t gen = generation.load(std::memory_order_acquire);
            while (gen == seen) {
                generation.wait(gen, std::memory_order_acquire);
                gen = generation.load(std::memory_order_acquire);
            }
            seen = gen;
            if (stop_.load(std::memory_order_acquire)) return;
            Block* block = block_;
            if (id >= block->threads) {  // the group's last warp is partly idle
                if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining_.notify_all();
                continue;
            }
            const unsigned bx = block->block.x, by = block->block.y;
            threadIdx = {unsigned(id) % bx, (unsigned(id) / bx) % by, unsigned(id) / (bx * by)};
            blockIdx = block->index;
            blockDim = block->block;
            gridDim = block->grid;
            current_block = block;
            try {
                (*body_)();
            } catch (...) {
                std::lock_guard lock(error_mutex_);
                if (!error_) error_ = std::current_exception();
            }
            // A thread that has finished no longer takes part in barriers (as an exited GPU thread).
            block->warps[std::size_t(id / 32)]->bar.arrive_and_drop();
            block->bar.arrive_and_drop();
            current_block = nullptr;
            if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) remaining_.notify_all();
        }
    }

    std::vector<std::thread> workers_;
    std::atomic<std::uint64_t> generation_[32] = {};  ///< one per group of 32 workers (1024 threads at most)
    std::atomic<int> remaining_{0};
    std::atomic<bool> stop_{false};
    Block* block_ = nullptr;
    const std::function<void()>* body_ = nullptr;
    std::mutex error_mutex_;
    std::exception_ptr error_;
};

#if CPU_CUDA_FIBER_ASM
// ---- fiber stack switching (x86-64) ---------------------------------------------
//
// glibc's swapcontext saves and restores the signal mask with a system call
// (rt_sigprocmask) at every switch, which made the switches most of the
// device tests' time. A fiber switch only has to preserve what the SysV ABI
// says a called function preserves: the callee-saved registers rbx, rbp and
// r12-r15, the stack pointer, and the control bits of MXCSR and of the x87
// FPU (rounding modes, exception masks). switch_stack is an ordinary
// function call for its caller, so the compiler already keeps everything else
// safe around it (caller-saved registers are spilt; nothing is kept below the
// stack pointer across a call). Unlike swapcontext, it leaves the signal mask
// alone (all fibers share their thread's, which nothing here changes). It
// pushes the callee-saved state on the current stack, stores the stack
// pointer, loads the other one and pops that stack's state, in the reverse
// order:
//
//   higher addresses    return address   (where `ret` resumes the other side)
//                       rbp
//                       rbx
//                       r12
//                       r13
//                       r14
//                       r15
//   saved sp ->         MXCSR (4 bytes), x87 control word (2 bytes), padding
//
// A fiber that has not run yet gets the same 64-byte frame written at the top
// of its stack (make_frame): its `return address` is fiber_start, which calls
// r12(r13) (the entry function and its argument, placed in the frame's r12
// and r13 slots). The entry function never returns: it switches away for the
// last time itself, and the frame is written again before the stack's next
// use.

/// Saves the running side's callee-saved state on its stack and its stack
/// pointer in *save_sp, then resumes the side whose stack pointer is load_sp
/// (saved by an earlier switch_stack, or prepared by make_frame). Naked: the
/// body is exactly this code, no prologue; inline: one copy in the program.
[[gnu::naked, gnu::noinline]] inline void switch_stack(void** /*save_sp: rdi*/, void* /*load_sp: rsi*/) {
    asm(R"(
        pushq %rbp
        pushq %rbx
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        subq $8, %rsp
        stmxcsr (%rsp)
        fnstcw 4(%rsp)
        movq %rsp, (%rdi)
        movq %rsi, %rsp
        ldmxcsr (%rsp)
        fldcw 4(%rsp)
        addq $8, %rsp
        popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %rbx
        popq %rbp
        ret
    )");
}

/// Where a new fiber's first switch_stack returns to, with rsp 16-byte
/// aligned (make_frame): calls r12 with r13 as its argument, so that the
/// entry function starts with rsp = 8 mod 16 as after any call. rbp is 0
/// (the end of frame-pointer chains), and the return address is marked
/// undefined (the end of DWARF unwinding).
[[gnu::naked, gnu::noinline]] inline void fiber_start() {
    asm(R"(
        .cfi_undefined rip
        movq %r13, %rdi
        callq *%r12
        ud2
    )");
}

/// Writes the initial frame of a fiber that is to run entry(arg) on the stack
/// [stack, stack + bytes), and returns the stack pointer to switch to. The
/// fiber starts with the calling thread's MXCSR and x87 control word.
inline void* make_frame(char* stack, std::size_t bytes, void (*entry)(void*), void* arg) {
    std::uint32_t mxcsr;
    std::uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    // fiber_start runs with rsp = top: a multiple of 16, as a call needs.
    const std::uintptr_t top = (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t(15);
    auto* frame = reinterpret_cast<std::uint64_t*>(top) - 8;
    frame[0] = mxcsr | std::uint64_t(fpucw) << 32;
    frame[1] = 0;                                         // r15
    frame[2] = 0;                                         // r14
    frame[3] = reinterpret_cast<std::uintptr_t>(arg);     // r13
    frame[4] = reinterpret_cast<std::uintptr_t>(entry);   // r12
    frame[5] = 0;                                         // rbx
    frame[6] = 0;                                         // rbp
    frame[7] = reinterpret_cast<std::uintptr_t>(&fiber_start);  // return address
    return frame;
}
#endif

/// The threads of a block as fibers on the launching thread, run round-robin:
/// a fiber runs until it waits at a barrier (and yields) or returns. Far
/// cheaper than waking 256 OS threads per barrier; the ThreadSanitizer build
/// uses the threaded Pool instead, so that a missing barrier is a data race
/// between real threads. AddressSanitizer is told of every stack switch: on
/// leaving a stack (__sanitizer_start_switch_fiber, naming the stack entered)
/// and on arriving (__sanitizer_finish_switch_fiber), including a fiber's
/// first arrival (entry) and its last departure, which frees its fake stack.
class FiberPool {
public:
    static constexpr std::size_t kStackBytes = 256 * 1024;

    void run_block(Block& block, const std::function<void()>& body) {
        while (int(fibers_.size()) < block.threads) fibers_.push_back(std::make_unique<Fiber>());
        block_ = &block;
        body_ = &body;
        error_ = nullptr;
        const unsigned bx = block.block.x, by = block.block.y;
        for (int i = 0; i < block.threads; ++i) {
            Fiber& f = *fibers_[std::size_t(i)];
            if (!f.stack) f.stack.reset(new char[kStackBytes]);  // untouched until used
            f.idx = {unsigned(i) % bx, (unsigned(i) / bx) % by, unsigned(i) / (bx * by)};
            f.done = false;
            start(f);
        }
        FiberPool* saved = running;
        running = this;
        in_fiber = true;
        blockIdx = block.index;
        blockDim = block.block;
        gridDim = block.grid;
        current_block = &block;
        for (int live = block.threads; live > 0;) {
            for (int i = 0; i < block.threads; ++i) {
                Fiber& f = *fibers_[std::size_t(i)];
                if (f.done) continue;
                current_ = i;
                threadIdx = f.idx;
                switch_to(f);
                if (f.done) --live;
            }
        }
        in_fiber = false;
        current_block = nullptr;
        running = saved;
        if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    }

    static inline thread_local FiberPool* running = nullptr;

    /// From the running fiber back to the scheduler; returns when it is resumed.
    void yield() {
        Fiber& f = *fibers_[std::size_t(current_)];
#ifdef CPU_CUDA_ASAN
        void* fake = nullptr;
        __sanitizer_start_switch_fiber(&fake, main_bottom_, main_size_);
        jump(f.ctx, main_);
        __sanitizer_finish_switch_fiber(fake, &main_bottom_, &main_size_);
#else
        jump(f.ctx, main_);
#endif
    }

private:
    /// What a switch saves of the side it leaves (a fiber or the scheduler).
    struct Context {
#if CPU_CUDA_FIBER_ASM
        void* sp = nullptr;  ///< its stack pointer; switch_stack leaves the rest on that stack
#else
        ucontext_t uc{};
#endif
    };

    struct Fiber {
        Context ctx;
        std::unique_ptr<char[]> stack;
        uint3 idx;
        bool done = false;
    };

    /// Leaves `from` (saving its state there) for `to`; returns when `from` is resumed.
    static void jump(Context& from, Context& to) {
#if CPU_CUDA_FIBER_ASM
        switch_stack(&from.sp, to.sp);
#else
        swapcontext(&from.uc, &to.uc);
#endif
    }

    /// Makes f start afresh, at entry(this) on its own stack, when next
    /// switched to. With switch_stack that only writes a 64-byte frame.
    void start(Fiber& f) {
#if CPU_CUDA_FIBER_ASM
        f.ctx.sp = make_frame(f.stack.get(), kStackBytes, &FiberPool::entry, this);
#else
        getcontext(&f.ctx.uc);
        f.ctx.uc.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc.uc_stack.ss_size = kStackBytes;
        f.ctx.uc.uc_link = nullptr;  // entry never returns
        makecontext(&f.ctx.uc, [] { entry(running); }, 0);
#endif
    }

    void switch_to(Fiber& f) {
#ifdef CPU_CUDA_ASAN
        void* fake = nullptr;
        __sanitizer_start_switch_fiber(&fake, f.stack.get(), kStackBytes);
        jump(main_, f.ctx);
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
        jump(main_, f.ctx);
#endif
    }

    /// The bottom of every fiber's stack: runs the thread, then leaves for
    /// the scheduler for good (start() sets the stack up afresh for the next
    /// block), as the fiber's end.
    [[noreturn]] static void entry(void* pool) {
        FiberPool& p = *static_cast<FiberPool*>(pool);
#ifdef CPU_CUDA_ASAN
        __sanitizer_finish_switch_fiber(nullptr, &p.main_bottom_, &p.main_size_);  // first arrival on this stack
#endif
        p.run_thread();
        Fiber& f = *p.fibers_[std::size_t(p.current_)];
#ifdef CPU_CUDA_ASAN
        __sanitizer_start_switch_fiber(nullptr, p.main_bottom_, p.main_size_);  // this fiber ends
#endif
        jump(f.ctx, p.main_);
        std::abort();  // never resumed
    }

    /// One thread of the block: the kernel body (its exception kept for
    /// run_block to rethrow), then it leaves the block's barriers. A function
    /// of its own (noinline), so that its frame is returned from (and its
    /// locals' sanitizer state cleared), unlike entry's.
    [[gnu::noinline]] void run_thread() {
        try {
            (*body_)();
        } catch (...) {
            if (!error_) error_ = std::current_exception();
        }
        const int id = current_;
        block_->warps[std::size_t(id / 32)]->bar.arrive_and_drop();
        block_->bar.arrive_and_drop();
        fibers_[std::size_t(id)]->done = true;
    }

    std::vector<std::unique_ptr<Fiber>> fibers_;
    Context main_;  ///< the scheduler (run_block) while a fiber runs
    Block* block_ = nullptr;
    const std::function<void()>* body_ = nullptr;
    std::exception_ptr error_;
    int current_ = 0;
#ifdef CPU_CUDA_ASAN
    const void* main_bottom_ = nullptr;  ///< the scheduler's stack, as AddressSanitizer reports it
    std::size_t main_size_ = 0;
#endif
};

inline void fiber_yield() { FiberPool::running->yield(); }

/// Threads of a block as real threads under ThreadSanitizer (or with
/// PATCHWORK_CPU_CUDA_THREADS=1 in the environment), as fibers otherwise.
[[nodiscard]] inline bool use_threads() {
#ifdef CPU_CUDA_TSAN
    return true;
#else
    static const bool threads = [] {
        const char* e = std::getenv("PATCHWORK_CPU_CUDA_THREADS");
        return e != nullptr && e[0] == '1';
    }();
    return threads;
#endif
}

/// Process-wide state of the emulated runtime.
struct Runtime {
    std::mutex launch_mutex;  ///< one launch (and so one block) runs at a time
    std::mutex alloc_mutex;
    std::map<const void*, std::pair<std::size_t, int>> allocations;  ///< pointer -> (bytes, device)
    Pool pool;
    FiberPool fibers;
};
inline Runtime& runtime() {
    static Runtime r;
    return r;
}

inline constexpr int kDevices = 2;
inline thread_local int current_device = 0;
inline thread_local cudaError_t last_error = cudaSuccess;

inline cudaError_t record(cudaError_t e) {
    if (e != cudaSuccess) last_error = e;
    return e;
}

/// Launch a kernel: `body` is the kernel applied to its (copied) arguments.
inline void launch(dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t, const std::function<void()>& body) {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || shared_bytes > 48 * 1024) {
        record(cudaErrorInvalidConfiguration);
        return;
    }
    Runtime& rt = runtime();
    std::lock_guard lock(rt.launch_mutex);
    Block b;
    b.block = block;
    b.grid = grid;
    b.threads = int(threads);
    for (int w = 0; w * 32 < b.threads; ++w) b.warps.push_back(std::make_unique<Warp>());
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                b.index = {x, y, z};
                b.bar.reset(b.threads);
                for (std::size_t w = 0; w < b.warps.size(); ++w) {
                    b.warps[w]->bar.reset(std::min(32, b.threads - int(w) * 32));
                    std::fill(std::begin(b.warps[w]->turn), std::end(b.warps[w]->turn), 0);
                }
                if (use_threads()) rt.pool.run_block(b, body);
                else rt.fibers.run_block(b, body);
            }
}

/// Exchange one value per lane among the lanes of the warp: every lane writes
/// `v`, then reads what lane `src(lane)` wrote.
template <class T, class Src>
T exchange(T v, Src src) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<T>);
    Warp& w = this_warp();
    const int lane = linear_thread() & 31;
    const int set = w.turn[lane];
    w.turn[lane] = set ^ 1;
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    w.slot[set][lane] = bits;
    w.bar.arrive_and_wait();
    T out;
    const std::uint64_t got = w.slot[set][src(lane) & 31];
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

}  // namespace cpu_cuda

// ---- device built-ins -----------------------------------------------------------

inline void __syncthreads() { cpu_cuda::current_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cpu_cuda::this_warp().bar.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
    return cpu_cuda::exchange(v, [&](int lane) { return (lane & ~(width - 1)) + (src & (width - 1)); });
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    return cpu_cuda::exchange(v, [&](int lane) {
        const int s = lane ^ mask;
        return (s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane;
    });
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    return cpu_cuda::exchange(v, [&](int lane) {
        const int s = lane + int(delta);
        return (s & (width - 1)) >= (lane & (width - 1)) && s < ((lane & ~(width - 1)) + width) ? s : lane;
    });
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    return cpu_cuda::exchange(v, [&](int lane) {
        const int s = lane - int(delta);
        return s >= (lane & ~(width - 1)) ? s : lane;
    });
}
/// Bit i set when lane i's predicate is true (lanes outside `mask` count as false).
inline unsigned __ballot_sync(unsigned mask, int pred) {
    cpu_cuda::Warp& w = cpu_cuda::this_warp();
    const int lane = cpu_cuda::linear_thread() & 31;
    const int set = w.turn[lane];
    w.turn[lane] = set ^ 1;
    w.slot[set][lane] = pred != 0 ? 1 : 0;
    w.bar.arrive_and_wait();
    unsigned bits = 0;
    const int lanes = std::min(32, cpu_cuda::current_block->threads - (cpu_cuda::linear_thread() & ~31));
    for (int i = 0; i < lanes; ++i)
        if (w.slot[set][i] != 0) bits |= 1u << i;
    return bits & mask;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    const int lanes = std::min(32, cpu_cuda::current_block->threads - (cpu_cuda::linear_thread() & ~31));
    const unsigned all = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    return __ballot_sync(mask, pred) == (all & mask);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }

template <class T>
T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}
template <class T>
T atomicSub(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_sub(v);
}
template <class T>
T atomicExch(T* p, T v) {
    return std::atomic_ref<T>(*p).exchange(v);
}
template <class T>
T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;
}
template <class T>
T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
template <class T>
T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

// ---- runtime API ------------------------------------------------------------------

inline const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInitializationError: return "cudaErrorInitializationError";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorNotReady: return "cudaErrorNotReady";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevicePointer: return "invalid device pointer";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        default: return "unspecified error";
    }
}
inline cudaError_t cudaGetLastError() { return std::exchange(cpu_cuda::last_error, cudaSuccess); }
inline cudaError_t cudaPeekAtLastError() { return cpu_cuda::last_error; }

inline cudaError_t cudaGetDeviceCount(int* n) {
    if (n == nullptr) return cpu_cuda::record(cudaErrorInvalidValue);
    *n = cpu_cuda::kDevices;
    return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
    if (d < 0 || d >= cpu_cuda::kDevices) return cpu_cuda::record(cudaErrorInvalidDevice);
    cpu_cuda::current_device = d;
    return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
    if (d == nullptr) return cpu_cuda::record(cudaErrorInvalidValue);
    *d = cpu_cuda::current_device;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (p == nullptr) return cpu_cuda::record(cudaErrorInvalidValue);
    if (d < 0 || d >= cpu_cuda::kDevices) return cpu_cuda::record(cudaErrorInvalidDevice);
    *p = cudaDeviceProp{};
    std::snprintf(p->name, sizeof p->name, "CPU execution of CUDA code (device %d)", d);
    p->totalGlobalMem = std::size_t(1) << 32;
    p->sharedMemPerBlock = 48 * 1024;
    p->major = 9;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

inline cudaError_t cudaMalloc(void** p, std::size_t bytes) {
    if (p == nullptr) return cpu_cuda::record(cudaErrorInvalidValue);
    void* q = std::aligned_alloc(256, (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256);
    if (q == nullptr) return cpu_cuda::record(cudaErrorMemoryAllocation);
    std::lock_guard lock(cpu_cuda::runtime().alloc_mutex);
    cpu_cuda::runtime().allocations[q] = {bytes, cpu_cuda::current_device};
    *p = q;
    return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
    if (p == nullptr) return cudaSuccess;
    {
        std::lock_guard lock(cpu_cuda::runtime().alloc_mutex);
        auto& a = cpu_cuda::runtime().allocations;
        const auto it = a.find(p);
        if (it == a.end()) return cpu_cuda::record(cudaErrorInvalidDevicePointer);
        a.erase(it);
    }
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, std::size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
template <class T>
cudaError_t cudaMallocAsync(T** p, std::size_t bytes, cudaStream_t s) {
    return cudaMallocAsync(reinterpret_cast<void**>(p), bytes, s);
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }

namespace cpu_cuda {
/// The device an allocation was made on (-1: not device memory).
inline int device_of(const void* p) {
    std::lock_guard lock(runtime().alloc_mutex);
    auto& a = runtime().allocations;
    auto it = a.upper_bound(p);
    if (it == a.begin()) return -1;
    --it;
    const char* base = static_cast<const char*>(it->first);
    return static_cast<const char*>(p) < base + std::max<std::size_t>(it->second.first, 1) ? it->second.second : -1;
}
}  // namespace cpu_cuda

inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return cudaSuccess;
    if (dst == nullptr || src == nullptr) return cpu_cuda::record(cudaErrorInvalidValue);
    const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if ((dst_dev && cpu_cuda::device_of(dst) < 0) || (src_dev && cpu_cuda::device_of(src) < 0))
        return cpu_cuda::record(cudaErrorInvalidValue);
    std::memmove(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
    return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemset(void* p, int byte, std::size_t bytes) {
    if (bytes == 0) return cudaSuccess;
    if (cpu_cuda::device_of(p) < 0) return cpu_cuda::record(cudaErrorInvalidValue);
    std::memset(p, byte, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int byte, std::size_t bytes, cudaStream_t = nullptr) {
    return cudaMemset(p, byte, bytes);
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
    if (s == nullptr) return cpu_cuda::record(cudaErrorInvalidValue);
    *s = new CUstream_st{cpu_cuda::current_device};
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (s == nullptr) return cpu_cuda::record(cudaErrorInvalidResourceHandle);
    delete s;
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
    if (e == nullptr) return cpu_cuda::record(cudaErrorInvalidValue);
    *e = new CUevent_st{};
    return cudaSuccess;
}
inline constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
/// Work is done when it is queued here: a recorded event is always complete.
inline cudaError_t cudaEventQuery(cudaEvent_t e) {
    return e == nullptr ? cpu_cuda::record(cudaErrorInvalidResourceHandle) : cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
    if (e == nullptr) return cpu_cuda::record(cudaErrorInvalidResourceHandle);
    e->at = std::chrono::steady_clock::now();
    e->recorded = true;
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    return e == nullptr ? cpu_cuda::record(cudaErrorInvalidResourceHandle) : cudaSuccess;
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
    if (ms == nullptr || a == nullptr || b == nullptr || !a->recorded || !b->recorded)
        return cpu_cuda::record(cudaErrorInvalidResourceHandle);
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return cudaSuccess;
}

// ---- cuBLAS -----------------------------------------------------------------------

enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasMath_t {
    CUBLAS_DEFAULT_MATH = 0,
    CUBLAS_TENSOR_OP_MATH = 1,
    CUBLAS_PEDANTIC_MATH = 2,
    CUBLAS_TF32_TENSOR_OP_MATH = 3,
};
struct cublasContext {
    cudaStream_t stream = nullptr;
    cublasMath_t math = CUBLAS_DEFAULT_MATH;
    /// The math mode of the last cublasGemmEx / cublasGemmStridedBatchedEx call (for tests: a bf16 GEMM
    /// under CUBLAS_PEDANTIC_MATH would run without tensor cores on a GPU).
    cublasMath_t last_gemm_ex_math = CUBLAS_DEFAULT_MATH;
};
using cublasHandle_t = cublasContext*;

inline const char* cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
    if (h == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *h = new cublasContext{};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math = m;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetMathMode(cublasHandle_t h, cublasMath_t* m) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *m = h->math;
    return CUBLAS_STATUS_SUCCESS;
}

namespace cpu_cuda {
/// Column-major C [m, n] = alpha op(A) op(B) + beta C, op(A) [m, k], op(B) [k, n];
/// A is stored [lda, *] (op N: m x k, op T: k x m), likewise B. C is not read when beta = 0.
template <class T>
cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                    const T* alpha, const T* a, int lda, const T* b, int ldb, const T* beta, T* c, int ldc) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    const int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
    if (m < 0 || n < 0 || k < 0 || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m) ||
        alpha == nullptr || beta == nullptr)
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            T s = T(0);
            for (int l = 0; l < k; ++l) {
                const T av = ta == CUBLAS_OP_N ? a[i + std::size_t(l) * lda] : a[l + std::size_t(i) * lda];
                const T bv = tb == CUBLAS_OP_N ? b[l + std::size_t(j) * ldb] : b[j + std::size_t(l) * ldb];
                s += av * bv;
            }
            T& out = c[i + std::size_t(j) * ldc];
            out = *beta == T(0) ? *alpha * s : *alpha * s + *beta * out;
        }
    return CUBLAS_STATUS_SUCCESS;
}
}  // namespace cpu_cuda

// cublasGemmEx and cublasGemmStridedBatchedEx for the types the library uses:
// bf16 A and B with a bf16 or fp32 C, computed in fp32 (CUBLAS_COMPUTE_32F):
// the loop of cpu_cuda::gemm on the operands loaded as float, C (when read)
// and the result converted once. Anything else is CUBLAS_STATUS_NOT_SUPPORTED.
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_PEDANTIC = 69, CUBLAS_COMPUTE_64F = 70 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };

namespace cpu_cuda {
inline float bf16_value(const void* p, std::size_t i) { return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]); }

inline cublasStatus_t gemm_ex(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              const void* alpha, const void* a, cudaDataType_t at, int lda, long long stride_a,
                              const void* b, cudaDataType_t bt, int ldb, long long stride_b, const void* beta,
                              void* c, cudaDataType_t ct, int ldc, long long stride_c, int batch,
                              cublasComputeType_t compute) {
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->last_gemm_ex_math = h->math;
    if (at != CUDA_R_16BF || bt != CUDA_R_16BF || (ct != CUDA_R_16BF && ct != CUDA_R_32F) ||
        compute != CUBLAS_COMPUTE_32F)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
    if (m < 0 || n < 0 || k < 0 || batch < 0 || lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) ||
        ldc < std::max(1, m) || alpha == nullptr || beta == nullptr)
        return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    for (int q = 0; q < batch; ++q) {
        const std::size_t oa = std::size_t(q) * std::size_t(stride_a), ob = std::size_t(q) * std::size_t(stride_b);
        const std::size_t oc = std::size_t(q) * std::size_t(stride_c);
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                float sum = 0;
                for (int l = 0; l < k; ++l) {
                    const float av = bf16_value(a, oa + (ta == CUBLAS_OP_N ? i + std::size_t(l) * lda
                                                                            : l + std::size_t(i) * lda));
                    const float bv = bf16_value(b, ob + (tb == CUBLAS_OP_N ? l + std::size_t(j) * ldb
                                                                            : j + std::size_t(l) * ldb));
                    sum += av * bv;
                }
                const std::size_t ci = oc + i + std::size_t(j) * ldc;
                if (ct == CUDA_R_32F) {
                    float& out = static_cast<float*>(c)[ci];
                    out = be == 0.0f ? al * sum : al * sum + be * out;
                } else {
                    __nv_bfloat16& out = static_cast<__nv_bfloat16*>(c)[ci];
                    out = __float2bfloat16_rn(be == 0.0f ? al * sum : al * sum + be * __bfloat162float(out));
                }
            }
    }
    return CUBLAS_STATUS_SUCCESS;
}
}  // namespace cpu_cuda

inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* a, cudaDataType_t at, int lda, const void* b,
                                   cudaDataType_t bt, int ldb, const void* beta, void* c, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
    return cpu_cuda::gemm_ex(h, ta, tb, m, n, k, alpha, a, at, lda, 0, b, bt, ldb, 0, beta, c, ct, ldc, 0, 1, compute);
}
inline cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                 int n, int k, const void* alpha, const void* a, cudaDataType_t at,
                                                 int lda, long long stride_a, const void* b, cudaDataType_t bt,
                                                 int ldb, long long stride_b, const void* beta, void* c,
                                                 cudaDataType_t ct, int ldc, long long stride_c, int batch,
                                                 cublasComputeType_t compute, cublasGemmAlgo_t) {
    if (stride_a < 0 || stride_b < 0 || stride_c < 0) return CUBLAS_STATUS_INVALID_VALUE;
    return cpu_cuda::gemm_ex(h, ta, tb, m, n, k, alpha, a, at, lda, stride_a, b, bt, ldb, stride_b, beta, c, ct, ldc,
                             stride_c, batch, compute);
}

inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* a, int lda, const float* b, int ldb,
                                  const float* beta, float* c, int ldc) {
    return cpu_cuda::gemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const double* alpha, const double* a, int lda, const double* b, int ldb,
                                  const double* beta, double* c, int ldc) {
    return cpu_cuda::gemm(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
