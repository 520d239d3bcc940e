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
// TF32 tensor cores for Linear layers.
#include <string>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "patchwork/cuda/error.hpp"

namespace patchwork::cuda {

class Context {
public:
    /// A new non-blocking stream and cuBLAS handle on `device`.
    explicit Context(int device = 0) : device_(device) {
        const int n = device_count();
        if (n == 0) throw CudaError("cuda::Context: no CUDA device is available", int(cudaErrorNoDevice));
        if (device < 0 || device >= n)
            throw CudaError(detail::concat("cuda::Context: device ", device, " does not exist (", n, " devices)"),
                            int(cudaErrorInvalidDevice));
        check(cudaSetDevice(device), "cudaSetDevice", "cuda::Context");
        check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
              "cuda::Context");
        if (const auto s = cublasCreate(&blas_); s != CUBLAS_STATUS_SUCCESS) {
            cudaStreamDestroy(stream_);
            check(s, "cublasCreate", "cuda::Context");
        }
        check(cublasSetStream(blas_, stream_), "cublasSetStream", "cuda::Context");
        check(cublasSetMathMode(blas_, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode", "cuda::Context");
    }
    ~Context() {
        if (blas_ != nullptr) cublasDestroy(blas_);
        if (stream_ != nullptr) cudaStreamDestroy(stream_);
    }
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

private:
    int device_;
    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
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

/// Makes `ctx` the current context of this thread until the scope ends.
class ContextScope {
public:
    explicit ContextScope(Context& ctx) noexcept : saved_(detail::current_context()) {
        detail::current_context() = &ctx;
    }
    ~ContextScope() { detail::current_context() = saved_; }
    ContextScope(const ContextScope&) = delete;
    ContextScope& operator=(const ContextScope&) = delete;

private:
    Context* saved_;
};

/// Wait for the current context's stream.
inline void synchronize(std::string_view where = "cuda::synchronize") { context().synchronize(where); }

}  // namespace patchwork::cuda
