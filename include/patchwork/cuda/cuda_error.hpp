#pragma once
// Error checking for the CUDA backend. Every CUDA runtime and cuBLAS call is
// checked, and every kernel launch is followed by check_launch(); a failure
// throws CudaError (a patchwork::Error) naming the call, the status (its
// number, name and description) and the module or function that made it.
//
//     cuda::check(cudaMemcpyAsync(...), "cudaMemcpyAsync", path_);
//     my_kernel<<<grid, block, 0, stream>>>(...);
//     cuda::check_launch("my_kernel", path_);
//
// Kernels run asynchronously, so an error inside a kernel surfaces at the next
// synchronising call (a copy to the host, cuda::synchronize); the message then
// names that call. Build with PATCHWORK_CUDA_SYNC_CHECKS defined to make
// check_launch synchronise, so each fault is reported by the launch that caused it.
#include <string>
#include <string_view>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "patchwork/core/error.hpp"

namespace patchwork {

/// A CUDA runtime or cuBLAS call failed, or a kernel could not be launched.
class CudaError : public Error {
public:
    CudaError(std::string message, int status) : Error(std::move(message)), status_(status) {}
    /// The cudaError_t or cublasStatus_t value.
    [[nodiscard]] int status() const noexcept { return status_; }

private:
    int status_;
};

namespace cuda {

/// Name of a cuBLAS status (cuBLAS has cublasGetStatusName since 11.4).
[[nodiscard]] inline std::string_view status_name(cublasStatus_t s) noexcept { return cublasGetStatusName(s); }

/// Throw CudaError unless `status` is cudaSuccess. `call` names the API call,
/// `where` the module path or function that made it.
inline void check(cudaError_t status, std::string_view call, std::string_view where) {
    if (status == cudaSuccess) return;
    (void)cudaGetLastError();  // clear a sticky-free error so later calls are not blamed for it
    throw CudaError(detail::concat(where.empty() ? std::string_view("<root>") : where, ": ", call, " failed: ",
                                   cudaGetErrorName(status), " (", int(status), "): ", cudaGetErrorString(status)),
                    int(status));
}

/// Throw CudaError unless `status` is CUBLAS_STATUS_SUCCESS.
inline void check(cublasStatus_t status, std::string_view call, std::string_view where) {
    if (status == CUBLAS_STATUS_SUCCESS) return;
    throw CudaError(detail::concat(where.empty() ? std::string_view("<root>") : where, ": ", call, " failed: ",
                                   status_name(status), " (", int(status), ")"),
                    int(status));
}

/// After a kernel launch: report a bad configuration (or, with
/// PATCHWORK_CUDA_SYNC_CHECKS, any fault of the kernel itself).
inline void check_launch(std::string_view kernel, std::string_view where) {
    check(cudaGetLastError(), detail::concat("launch of ", kernel), where);
#ifdef PATCHWORK_CUDA_SYNC_CHECKS
    check(cudaDeviceSynchronize(), detail::concat("kernel ", kernel), where);
#endif
}

/// Number of CUDA devices; 0 when there is none or no driver (the runtime
/// reports an error then, and leaves the count unset).
[[nodiscard]] inline int device_count() noexcept {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

}  // namespace cuda
}  // namespace patchwork
