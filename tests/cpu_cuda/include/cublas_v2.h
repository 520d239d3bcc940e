#pragma once
// The project's CPU execution of its CUDA code (tests only): see cpu_cuda/runtime.hpp.
#include "cpu_cuda/runtime.hpp"

// Strided-batched GEMMs: `batch` column-major products C_i = alpha op(A_i)
// op(B_i) + beta C_i with A_i = a + i stride_a (likewise B_i, C_i), each the
// single GEMM of runtime.hpp.
namespace cpu_cuda {
template <class T>
cublasStatus_t gemm_strided_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                    int k, const T* alpha, const T* a, int lda, long long stride_a, const T* b,
                                    int ldb, long long stride_b, const T* beta, T* c, int ldc, long long stride_c,
                                    int batch) {
    if (batch < 0 || stride_a < 0 || stride_b < 0 || stride_c < 0) return CUBLAS_STATUS_INVALID_VALUE;
    for (int i = 0; i < batch; ++i) {
        const cublasStatus_t s = gemm(h, ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta,
                                      c + i * stride_c, ldc);
        if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return CUBLAS_STATUS_SUCCESS;
}
}  // namespace cpu_cuda

inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const float* alpha, const float* a, int lda,
                                                long long stride_a, const float* b, int ldb, long long stride_b,
                                                const float* beta, float* c, int ldc, long long stride_c,
                                                int batch) {
    return cpu_cuda::gemm_strided_batched(h, ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c,
                                          ldc, stride_c, batch);
}
inline cublasStatus_t cublasDgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const double* alpha, const double* a, int lda,
                                                long long stride_a, const double* b, int ldb, long long stride_b,
                                                const double* beta, double* c, int ldc, long long stride_c,
                                                int batch) {
    return cpu_cuda::gemm_strided_batched(h, ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c,
                                          ldc, stride_c, batch);
}
