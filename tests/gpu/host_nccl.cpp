// The NCCL transport of patchwork::dist (dist/nccl.hpp) with the real nccl.h,
// CUDA runtime and MPI, in one process (an MPI singleton: one rank). Built when
// the CUDA backend, MPI and NCCL are found.
//
// Without a GPU: making the communicator is a DistError naming the failing
// call (no crash, no hang). With one (scripts/gpu-check): the single-GPU smoke
// test: the NCCL communicator starts, sums, gathers and broadcasts device
// buffers (cudaMalloc'd) on the context's stream, counts them as device
// collectives, and its host-memory collectives go through MPI. The multi-rank logic (DataParallel
// over NCCL against MPI) runs in every build on the CPU execution of the CUDA
// code: tests/dist/dist_check.cpp, mode nccl.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "patchwork/cuda/context.hpp"
#include "patchwork/cuda/cuda_error.hpp"
#include "patchwork/dist/mpi.hpp"
#include "patchwork/dist/nccl.hpp"

namespace pw = patchwork;
namespace dist = patchwork::dist;

namespace {
dist::MpiEnvironment& mpi_environment() {
    static dist::MpiEnvironment env;  // MPI_Init once, MPI_Finalize at exit
    return env;
}

struct DeviceBuffer {
    explicit DeviceBuffer(std::size_t n) { REQUIRE(cudaMalloc(&p, n * sizeof(double)) == cudaSuccess); }
    ~DeviceBuffer() { cudaFree(p); }
    void set(const std::vector<double>& v) {
        REQUIRE(cudaMemcpy(p, v.data(), v.size() * sizeof(double), cudaMemcpyHostToDevice) == cudaSuccess);
    }
    std::vector<double> get(std::size_t n) const {
        std::vector<double> v(n);
        REQUIRE(cudaMemcpy(v.data(), p, n * sizeof(double), cudaMemcpyDeviceToHost) == cudaSuccess);
        return v;
    }
    double* p = nullptr;
};
}  // namespace

TEST_CASE("NCCL communicator: without a GPU a clear error, with one the single-GPU collectives") {
    mpi_environment();
    dist::MpiCommunicator mpi;
    REQUIRE(mpi.size() == 1);
    if (pw::cuda::device_count() == 0) {
        try {
            dist::NcclCommunicator nccl(mpi);
            FAIL("an NCCL communicator started without a GPU");
        } catch (const dist::DistError& e) {
            const std::string m = e.what();
            CHECK(m.find("dist: rank 0: ") != std::string::npos);
            CHECK(m.find(" failed: ") != std::string::npos);
            MESSAGE("without a GPU: " << m);
        }
        return;
    }
    dist::NcclCommunicator nccl(mpi);
    CHECK(nccl.backend() == "nccl");
    CHECK(nccl.device_collectives());
    CHECK(nccl.rank() == 0);
    CHECK(nccl.size() == 1);

    DeviceBuffer a(4), b(4);
    a.set({1, 2, 3, 4});
    nccl.wait(nccl.start_device_allreduce_sum(a.p, 4, dist::DataType::f64), "smoke all-reduce");
    CHECK(a.get(4) == std::vector<double>{1, 2, 3, 4});  // one rank: the sum is itself
    nccl.wait(nccl.start_device_allgather(a.p, b.p, 4 * sizeof(double)), "smoke all-gather");
    CHECK(b.get(4) == std::vector<double>{1, 2, 3, 4});
    b.set({5, 6, 7, 8});
    nccl.wait(nccl.start_device_broadcast(b.p, 4 * sizeof(double), 0), "smoke broadcast");
    CHECK(b.get(4) == std::vector<double>{5, 6, 7, 8});
    CHECK(nccl.stats().device_collectives == 3);

    // Host memory goes through MPI.
    double host = 2.5;
    nccl.allreduce_sum(&host, 1, "smoke host all-reduce");
    CHECK(host == 2.5);
    nccl.barrier();
}
