#pragma once
// cuda::Context: one CUDA stream and one cuBLAS handle bound to it. Every
// device operation runs on the calling thread's current context, so work is
// ordered by that stream and host threads can drive separate streams.
//
//     patchwork::cuda::Context ctx;             // device 0, a new stream
//     patchwork::cuda::ContextScope use(ctx);   // current on this thread until scope end
//
// Without a scope, the thread's default context (device 0, created on first
// use) is current. cuBLAS runs in its default pedantic fp32 mode (no TF32),
// so fp32 results stay within 1e-5 of the CPU backend; set_tf32(true) allows
// TF32 tensor cores for Linear layers. bf16 GEMMs switch the handle to the
// default math mode for their call (BlasMathScope): tensor cores, whose bf16
// products are exact in fp32 and whose sums run in fp32 (CUBLAS_COMPUTE_32F),
// which the pedantic mode would keep from them.
#include <cstddef>
#include <string>
#include <string_view>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "patchwork/cuda/cuda_error.hpp"

namespace patchwork::cuda {

/// Sets a cuBLAS handle's math mode for a scope and restores the previous one
/// at its end (the bf16 GEMMs: CUBLAS_DEFAULT_MATH for tensor cores).
class BlasMathScope {
public:
    BlasMathScope(cublasHandle_t h, cublasMath_t mode, std::string_view where) : h_(h) {
        check(cublasGetMathMode(h_, &saved_), "cublasGetMathMode", where);
        check(cublasSetMathMode(h_, mode), "cublasSetMathMode", where);
    }
    ~BlasMathScope() { (void)cublasSetMathMode(h_, saved_); }
    BlasMathScope(const BlasMathScope&) = delete;
    BlasMathScope& operator=(const BlasMathScope&) = delete;

private:
    cublasHandle_t h_;
    cublasMath_t saved_ = CUBLAS_PEDANTIC_MATH;
};

class Context {
public:
    /// A new non-blocking stream and cuBLAS handle on `device`. The calling
    /// thread's current device is the same afterwards as before.
    explicit Context(int device = 0) : device_(device) {
        const int n = device_count();
        if (n == 0) throw CudaError("cuda::Context: no CUDA device is available", int(cudaErrorNoDevice));
        if (device < 0 || device >= n)
            throw CudaError(detail::concat("cuda::Context: device ", device, " does not exist (", n, " devices)"),
                            int(cudaErrorInvalidDevice));
        int previous = 0;
        check(cudaGetDevice(&previous), "cudaGetDevice", "cuda::Context");
        check(cudaSetDevice(device), "cudaSetDevice", "cuda::Context");
        try {
            check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
                  "cuda::Context");
            check(cublasCreate(&blas_), "cublasCreate", "cuda::Context");
            check(cublasSetStream(blas_, stream_), "cublasSetStream", "cuda::Context");
            check(cublasSetMathMode(blas_, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode", "cuda::Context");
        } catch (...) {
            release();  // the destructor does not run for a constructor that throws
            (void)cudaSetDevice(previous);
            throw;
        }
        check(cudaSetDevice(previous), "cudaSetDevice", "cuda::Context");
    }
    ~Context() { release(); }
    Context(const Context&) = delete;
    Context& operator=(const Context&) = delete;

    [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
    [[nodiscard]] cublasHandle_t blas() const noexcept { return blas_; }
    [[nodiscard]] int device() const noexcept { return device_; }

    /// Allow TF32 tensor cores in fp32 GEMMs (faster, about 1e-3 relative error).
    void set_tf32(bool on) {
        check(cublasSetMathMode(blas_, on ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_PEDANTIC_MATH), "cublasSetMathMode",
              "cuda::Context::set_tf32");
    }

    /// Wait for every operation queued on this context's stream.
    void synchronize(std::string_view where = "cuda::Context::synchronize") const {
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize", where);
    }

    /// This context's device scratch memory, at least `bytes` (256-byte
    /// aligned): the one workspace every kernel launcher and device operation
    /// uses when the caller passes none (backward partial sums, column-sum
    /// chunks, multi-pass accumulators). Operations on the context's stream
    /// run in order, so one operation's use ends before the next begins;
    /// another context (another stream) has its own. Growing it frees the old
    /// allocation with cudaFree, which waits for the device, so queued work
    /// still reading it finishes first. A pointer is valid until the next call.
    [[nodiscard]] void* workspace(std::size_t bytes, std::string_view where = "cuda::Context::workspace") {
        if (bytes <= workspace_bytes_) return workspace_;
        DeviceScope on(device_);
        if (workspace_ != nullptr) check(cudaFree(workspace_), "cudaFree(context workspace)", where);
        workspace_ = nullptr;
        workspace_bytes_ = 0;
        const std::size_t rounded = (bytes + 255) / 256 * 256;
        check(cudaMalloc(&workspace_, rounded), "cudaMalloc(context workspace)", where);
        workspace_bytes_ = rounded;
        return workspace_;
    }
    /// Bytes of the workspace allocated so far.
    [[nodiscard]] std::size_t workspace_bytes() const noexcept { return workspace_bytes_; }

    /// Makes a device current on this thread until scope end (restoring the previous one).
    class DeviceScope {
    public:
        explicit DeviceScope(int device) {
            check(cudaGetDevice(&saved_), "cudaGetDevice", "cuda::DeviceScope");
            if (saved_ != device) check(cudaSetDevice(device), "cudaSetDevice", "cuda::DeviceScope");
        }
        ~DeviceScope() {
            int now = saved_;
            if (cudaGetDevice(&now) == cudaSuccess && now != saved_) (void)cudaSetDevice(saved_);
        }
        DeviceScope(const DeviceScope&) = delete;
        DeviceScope& operator=(const DeviceScope&) = delete;

    private:
        int saved_ = 0;
    };

private:
    void release() noexcept {
        if (workspace_ != nullptr) (void)cudaFree(workspace_);
        if (blas_ != nullptr) (void)cublasDestroy(blas_);
        if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
        workspace_ = nullptr;
        blas_ = nullptr;
        stream_ = nullptr;
    }

    int device_;
    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
    void* workspace_ = nullptr;
    std::size_t workspace_bytes_ = 0;
};

namespace detail {
inline Context*& current_context() noexcept {
    thread_local Context* current = nullptr;
    return current;
}
}  // namespace detail

/// The calling thread's current context (its default one, created on first use, unless a ContextScope is active).
[[nodiscard]] inline Context& context() {
    if (Context* c = detail::current_context()) return *c;
    thread_local Context fallback(0);
    return fallback;
}

/// Makes `ctx` the current context of this thread, and its device the
/// thread's current CUDA device (so allocations land on it), until the scope
/// ends; both are restored then.
class ContextScope {
public:
    explicit ContextScope(Context& ctx) : device_(ctx.device()), saved_(detail::current_context()) {
        detail::current_context() = &ctx;
    }
    ~ContextScope() { detail::current_context() = saved_; }
    ContextScope(const ContextScope&) = delete;
    ContextScope& operator=(const ContextScope&) = delete;

private:
    Context::DeviceScope device_;
    Context* saved_;
};

/// Wait for the current context's stream.
inline void synchronize(std::string_view where = "cuda::synchronize") { context().synchronize(where); }

}  // namespace patchwork::cuda
