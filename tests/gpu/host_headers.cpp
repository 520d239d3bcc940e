// Host-side checks of the CUDA backend that run on any machine, GPU or not:
// every header of patchwork/cuda compiles in plain C++, errors name the call,
// the status and the module, and a missing device is reported clearly.
#include <algorithm>
#include <array>
#include <cmath>
#include <string>

#include <doctest/doctest.h>

#include "patchwork/cuda/context.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/cuda/cuda_error.hpp"
#include "patchwork/cuda/gemm_plan.hpp"
#include "patchwork/cuda/device_tensor.hpp"

namespace pw = patchwork;

TEST_CASE("cuda::check turns a failed runtime call into a CudaError naming the call, status and module") {
    try {
        pw::cuda::check(cudaErrorInvalidValue, "cudaMemcpyAsync", "stage0.linear1");
        FAIL("no exception");
    } catch (const pw::CudaError& e) {
        const std::string m = e.what();
        CHECK(m.find("stage0.linear1") == 0);
        CHECK(m.find("cudaMemcpyAsync") != std::string::npos);
        CHECK(m.find("cudaErrorInvalidValue") != std::string::npos);
        CHECK(e.status() == int(cudaErrorInvalidValue));
    }
    CHECK_NOTHROW(pw::cuda::check(cudaSuccess, "cudaMemcpyAsync", "x"));
}

TEST_CASE("cuda::check turns a failed cuBLAS call into a CudaError derived from patchwork::Error") {
    try {
        pw::cuda::check(CUBLAS_STATUS_INVALID_VALUE, "cublasSgemm", "");
        FAIL("no exception");
    } catch (const pw::Error& e) {
        const std::string m = e.what();
        CHECK(m.find("<root>: cublasSgemm failed") == 0);
        CHECK(m.find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
    }
}

TEST_CASE("without a device, a context is refused with a clear error; with one it works") {
    if (pw::cuda::device_count() == 0) {
        CHECK_THROWS_WITH_AS(pw::cuda::Context{}, doctest::Contains("no CUDA device"), pw::CudaError);
    } else {
        pw::cuda::Context ctx;
        CHECK(ctx.stream() != nullptr);
        CHECK_THROWS_AS(pw::cuda::Context{pw::cuda::device_count()}, pw::CudaError);
    }
}

namespace {
/// Column-major GEMM with exactly cuBLAS's argument conventions (op 'N' or 'T',
/// sizes m, n, k, leading dimensions), on host memory.
void column_major_gemm(bool ta, bool tb, std::size_t m, std::size_t n, std::size_t k, double alpha, const double* a,
                       std::size_t lda, const double* b, std::size_t ldb, double beta, double* c, std::size_t ldc) {
    for (std::size_t j = 0; j < n; ++j)
        for (std::size_t i = 0; i < m; ++i) {
            double s = 0;
            for (std::size_t l = 0; l < k; ++l) {
                const double x = ta ? a[l + i * lda] : a[i + l * lda];
                const double y = tb ? b[j + l * ldb] : b[l + j * ldb];
                s += x * y;
            }
            c[i + j * ldc] = alpha * s + beta * c[i + j * ldc];
        }
}
}  // namespace

TEST_CASE("the row-major to cuBLAS mapping computes op(A) op(B) for every transposition") {
    pw::Rng rng(11);
    for (auto [m, n, k] : {std::array<std::size_t, 3>{1, 1, 1}, {3, 5, 7}, {17, 4, 33}, {8, 29, 2}}) {
        for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb) {
                pw::Tensor<double> a(ta ? pw::Shape{k, m} : pw::Shape{m, k});
                pw::Tensor<double> b(tb ? pw::Shape{n, k} : pw::Shape{k, n});
                pw::Tensor<double> c(pw::Shape{m, n});
                for (auto* t : {&a, &b, &c})
                    for (auto& v : *t) v = rng.normal();
                pw::Tensor<double> want = c;
                const auto opa = ta ? pw::RowMatrix<double>(a.matrix().transpose()) : pw::RowMatrix<double>(a.matrix());
                const auto opb = tb ? pw::RowMatrix<double>(b.matrix().transpose()) : pw::RowMatrix<double>(b.matrix());
                want.matrix() = 0.5 * opa * opb + 0.25 * want.matrix();
                const auto p = pw::cuda::plan_row_major_gemm(bool(ta), bool(tb), a.rows(), a.cols(), b.rows(),
                                                             b.cols(), c.rows(), c.cols(), "test");
                column_major_gemm(p.transpose_first, p.transpose_second, p.m, p.n, p.k, 0.5, b.data(), p.ld_first,
                                  a.data(), p.ld_second, 0.25, c.data(), p.ld_c);
                double err = 0;
                for (std::size_t i = 0; i < c.size(); ++i) err = std::max(err, std::abs(c[i] - want[i]));
                INFO("m=" << m << " n=" << n << " k=" << k << " ta=" << ta << " tb=" << tb);
                CHECK(err < 1e-12);
            }
    }
    CHECK_THROWS_WITH_AS((void)pw::cuda::plan_row_major_gemm(false, true, 4, 5, 6, 7, 4, 6, "stage1.linear0"),
                         doctest::Contains("stage1.linear0: gemm shapes do not agree"), pw::ShapeError);
}
