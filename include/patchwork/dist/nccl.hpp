#pragma once
// NCCL transport of dist::Communicator: one process per GPU, gradients of a
// device model reduced in device memory over NVLink / PCIe / the network.
// Needs <nccl.h> and the NCCL library (shipped with the CUDA Toolkit on these
// machines; meson option -Dnccl), the CUDA runtime, and MPI for the start:
//
//     dist::MpiEnvironment env(argc, argv);
//     dist::MpiCommunicator mpi;                          // bootstrap and host-side collectives
//     cuda::Context gpu(mpi.rank() % cuda::device_count()); // one GPU per rank
//     cuda::ContextScope on_gpu(gpu);                     // its device and stream current from here on
//     dist::NcclCommunicator comm(mpi);                   // an NCCL communicator over the same ranks
//     auto model = ...;                                   // a device model (Device = Cuda)
//     dist::synchronize_model(comm, model);
//     BasicAdamW<float, Cuda> inner{trainable_parameters(model), {.lr = 1e-3}};
//     dist::DataParallel opt(comm, inner);                 // gradients all-reduced by NCCL
//
// Rank 0 creates the NCCL id and MPI broadcasts it; every rank then joins
// with ncclCommInitRank on its current device. Collectives on device memory
// (start_device_allreduce_sum / allgather / broadcast: what DataParallel uses
// for a device model's buckets and synchronize_model for its values) are NCCL
// calls queued on the current context's stream, after the kernels that wrote
// the gradients; an event recorded behind each one is what test() polls, so
// Communicator::wait keeps its timeout: a dead or stuck peer leaves the
// collective pending and the wait throws TimeoutError instead of hanging.
// NCCL's asynchronous errors (a failed peer connection) are checked at every
// poll and become DistError. Collectives on host memory (the model checks,
// checksums, on_root's status, barriers) go through the MPI communicator.
// abort() aborts the NCCL communicator, then the MPI job.
//
// NCCL sums in an order of its choosing (ring or tree): results can differ
// from one process's sum in the last bits. DataParallel's exact_order option
// gathers the buckets instead and sums them in rank order on the device.
#include <nccl.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/cuda/context.hpp"
#include "patchwork/dist/communicator.hpp"
#include "patchwork/dist/mpi.hpp"

namespace patchwork::dist {

namespace detail {
inline void nccl_check(ncclResult_t rc, std::string_view call, int rank) {
    if (rc == ncclSuccess) return;
    throw DistError(patchwork::detail::concat("dist: rank ", rank, ": ", call, " failed: ", ncclGetErrorString(rc),
                                              " (ncclResult_t ", int(rc), ")"));
}
inline void nccl_cuda_check(cudaError_t rc, std::string_view call, int rank) {
    if (rc == cudaSuccess) return;
    throw DistError(patchwork::detail::concat("dist: rank ", rank, ": ", call, " failed: ", cudaGetErrorName(rc), ": ",
                                              cudaGetErrorString(rc)));
}
}  // namespace detail

class NcclCommunicator final : public Communicator {
public:
    /// An NCCL communicator over the ranks of `host` (collective: every rank
    /// calls it), on each rank's current CUDA device. `host` must outlive it.
    explicit NcclCommunicator(MpiCommunicator& host) : host_(host) {
        ncclUniqueId id{};
        if (host_.rank() == 0) detail::nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId", 0);
        host_.broadcast(&id, sizeof id, 0, "the broadcast of the NCCL id");
        detail::nccl_cuda_check(cudaGetDevice(&device_), "cudaGetDevice", host_.rank());
        detail::nccl_check(ncclCommInitRank(&comm_, host_.size(), id, host_.rank()), "ncclCommInitRank",
                           host_.rank());
    }
    ~NcclCommunicator() override {
        for (auto& e : requests_)
            if (e.event != nullptr) cudaEventDestroy(e.event);
        for (auto ev : events_) cudaEventDestroy(ev);
        if (comm_ != nullptr) ncclCommDestroy(comm_);
    }

    [[nodiscard]] int rank() const noexcept override { return host_.rank(); }
    [[nodiscard]] int size() const noexcept override { return host_.size(); }
    [[nodiscard]] std::string_view backend() const noexcept override { return "nccl"; }
    [[nodiscard]] bool device_collectives() const noexcept override { return true; }
    /// The CUDA device this rank's NCCL communicator runs on.
    [[nodiscard]] int device() const noexcept { return device_; }
    [[nodiscard]] ncclComm_t handle() const noexcept { return comm_; }

    // Host memory: through MPI.
    Request start_allreduce_sum(void* data, std::size_t count, DataType t) override {
        ++stats_.reductions;
        stats_.bytes_reduced += count * element_size(t);
        return host_request(host_.start_allreduce_sum(data, count, t));
    }
    Request start_allgather(const void* send, void* recv, std::size_t bytes) override {
        ++stats_.gathers;
        stats_.bytes_gathered += bytes;
        return host_request(host_.start_allgather(send, recv, bytes));
    }
    Request start_broadcast(void* data, std::size_t bytes, int root) override {
        ++stats_.broadcasts;
        stats_.bytes_broadcast += bytes;
        return host_request(host_.start_broadcast(data, bytes, root));
    }
    Request start_barrier() override { return host_request(host_.start_barrier()); }

    // Device memory: NCCL on the current context's stream.
    Request start_device_allreduce_sum(void* data, std::size_t count, DataType t) override {
        const cudaStream_t s = stream();
        detail::nccl_check(ncclAllReduce(data, data, count, t == DataType::f32 ? ncclFloat : ncclDouble, ncclSum, comm_,
                                         s),
                           "ncclAllReduce", rank());
        ++stats_.reductions;
        stats_.bytes_reduced += count * element_size(t);
        ++stats_.device_collectives;
        return device_request(s, "ncclAllReduce");
    }
    Request start_device_allgather(const void* send, void* recv, std::size_t bytes) override {
        const cudaStream_t s = stream();
        detail::nccl_check(ncclAllGather(send, recv, bytes, ncclUint8, comm_, s), "ncclAllGather", rank());
        ++stats_.gathers;
        stats_.bytes_gathered += bytes;
        ++stats_.device_collectives;
        return device_request(s, "ncclAllGather");
    }
    Request start_device_broadcast(void* data, std::size_t bytes, int root) override {
        check_root(root, "ncclBroadcast");
        const cudaStream_t s = stream();
        detail::nccl_check(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, s), "ncclBroadcast", rank());
        ++stats_.broadcasts;
        stats_.bytes_broadcast += bytes;
        ++stats_.device_collectives;
        return device_request(s, "ncclBroadcast");
    }

    bool test(Request r) override {
        if (r >= requests_.size() || !requests_[r].live)
            throw DistError(patchwork::detail::concat("dist: rank ", rank(), ": unknown request ", r));
        Entry& e = requests_[r];
        bool done = false;
        if (e.event == nullptr) {
            done = host_.test(e.host);
        } else {
            const cudaError_t q = cudaEventQuery(e.event);
            if (q != cudaErrorNotReady) detail::nccl_cuda_check(q, "cudaEventQuery after an NCCL collective", rank());
            done = q == cudaSuccess;
            if (!done) {  // a peer that failed shows here, not as a completed event
                ncclResult_t async = ncclSuccess;
                detail::nccl_check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", rank());
                detail::nccl_check(async, "an NCCL collective (asynchronous error)", rank());
            }
        }
        if (done) e.live = false;
        return done;
    }

    [[noreturn]] void abort(int code, std::string_view why) noexcept override {
        if (comm_ != nullptr) ncclCommAbort(comm_);
        comm_ = nullptr;
        host_.abort(code, why);
    }

private:
    struct Entry {
        bool live = false;
        Request host = 0;              ///< the MPI request (host collectives)
        cudaEvent_t event = nullptr;   ///< recorded behind an NCCL collective (device collectives)
    };

    static cudaStream_t stream() { return cuda::context().stream(); }

    Request slot() {
        for (Request i = 0; i < requests_.size(); ++i)
            if (!requests_[i].live) return i;
        requests_.emplace_back();
        return requests_.size() - 1;
    }
    Request host_request(Request h) {
        const Request r = slot();
        Entry& e = requests_[r];
        if (e.event != nullptr) {  // a slot used by a device collective before: keep its event for reuse
            events_.push_back(e.event);
            e.event = nullptr;
        }
        e.live = true;
        e.host = h;
        return r;
    }
    Request device_request(cudaStream_t s, std::string_view call) {
        const Request r = slot();
        Entry& e = requests_[r];
        if (e.event == nullptr) {
            if (!events_.empty()) {
                e.event = events_.back();
                events_.pop_back();
            } else {
                detail::nccl_cuda_check(cudaEventCreateWithFlags(&e.event, cudaEventDisableTiming), "cudaEventCreate",
                                        rank());
            }
        }
        detail::nccl_cuda_check(cudaEventRecord(e.event, s),
                                patchwork::detail::concat("cudaEventRecord after ", call), rank());
        e.live = true;
        return r;
    }

    MpiCommunicator& host_;
    ncclComm_t comm_ = nullptr;
    int device_ = 0;
    std::vector<Entry> requests_;
    std::vector<cudaEvent_t> events_;  ///< spare events of slots now used by host collectives
};

}  // namespace patchwork::dist
