// Host-side checks of the CUDA backend that run on any machine, GPU or not:
// every header of patchwork/cuda compiles in plain C++, errors name the call,
// the status and the module, and a missing device is reported clearly.
#include <string>

#include <doctest/doctest.h>

#include "patchwork/cuda/context.hpp"
#include "patchwork/cuda/error.hpp"
#include "patchwork/cuda/tensor.hpp"

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
