#pragma once
// MPI transport of dist::Communicator (Open MPI, MPICH: any MPI-3 library).
// Needs <mpi.h> and the MPI library: build with the `mpi` dependency
// (meson: dependency('mpi', language: 'cpp'); by hand: mpicxx).
//
//     int main(int argc, char** argv) {
//         patchwork::dist::MpiEnvironment env(argc, argv);     // MPI_Init .. MPI_Finalize
//         patchwork::dist::MpiCommunicator comm;               // a duplicate of MPI_COMM_WORLD
//         return patchwork::dist::run_guarded(comm, [&] { ...; return 0; });
//     }
//
// Launch with `mpirun -np 2 ./program`. Collectives are MPI-3 non-blocking
// calls (MPI_Iallreduce, MPI_Iallgather, MPI_Ibcast, MPI_Ibarrier) completed
// by Communicator::wait, so a dead peer gives a TimeoutError, not a hang. MPI
// errors are returned (MPI_ERRORS_RETURN), not fatal, and become DistError
// with MPI's own message. run_guarded turns an exception on any rank into
// MPI_Abort of the whole job, after printing which rank failed and why.
// The C API only: the deprecated C++ bindings some MPI headers pull in are not used.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/dist/communicator.hpp"

namespace patchwork::dist {

namespace detail {
inline void mpi_check(int rc, std::string_view call, int rank) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING] = {};
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw DistError(patchwork::detail::concat("dist: rank ", rank, ": ", call, " failed: ",
                                              std::string_view(text, std::size_t(len))));
}
}  // namespace detail

/// MPI_Init_thread (funneled: MPI is called from the thread that trains) and,
/// at scope exit, MPI_Finalize; both only if MPI was not already set up.
class MpiEnvironment {
public:
    MpiEnvironment(int& argc, char**& argv) {
        int up = 0;
        MPI_Initialized(&up);
        if (up) return;
        int provided = 0;
        detail::mpi_check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread", -1);
        owner_ = true;
    }
    MpiEnvironment() {
        int up = 0;
        MPI_Initialized(&up);
        if (up) return;
        int provided = 0;
        detail::mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread", -1);
        owner_ = true;
    }
    ~MpiEnvironment() {
        int down = 0;
        MPI_Finalized(&down);
        if (owner_ && !down) MPI_Finalize();
    }
    MpiEnvironment(const MpiEnvironment&) = delete;
    MpiEnvironment& operator=(const MpiEnvironment&) = delete;

private:
    bool owner_ = false;
};

/// The ranks of an MPI communicator (by default every process of the job).
/// Holds its own duplicate, so its collectives never mix with the caller's.
class MpiCommunicator final : public Communicator {
public:
    explicit MpiCommunicator(MPI_Comm base = MPI_COMM_WORLD) {
        int up = 0;
        MPI_Initialized(&up);
        if (!up) throw DistError("dist::MpiCommunicator: MPI is not initialised (create a dist::MpiEnvironment first)");
        detail::mpi_check(MPI_Comm_dup(base, &comm_), "MPI_Comm_dup", -1);
        MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
        MPI_Comm_rank(comm_, &rank_);
        MPI_Comm_size(comm_, &size_);
    }
    ~MpiCommunicator() override {
        int down = 0;
        MPI_Finalized(&down);
        if (!down && comm_ != MPI_COMM_NULL) {
            // Requests still in flight belong to an aborted step; they cannot be
            // cancelled portably, so they are left to MPI_Finalize.
            MPI_Comm_free(&comm_);
        }
    }

    [[nodiscard]] int rank() const noexcept override { return rank_; }
    [[nodiscard]] int size() const noexcept override { return size_; }
    [[nodiscard]] std::string_view backend() const noexcept override { return "mpi"; }
    [[nodiscard]] MPI_Comm handle() const noexcept { return comm_; }

    Request start_allreduce_sum(void* data, std::size_t count, DataType t) override {
        const Request r = slot();
        check_count(count, "MPI_Iallreduce");
        detail::mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data, int(count), t == DataType::f32 ? MPI_FLOAT : MPI_DOUBLE,
                                         MPI_SUM, comm_, &requests_[r]),
                          "MPI_Iallreduce", rank_);
        ++stats_.reductions;
        stats_.bytes_reduced += count * element_size(t);
        return r;
    }
    Request start_allgather(const void* send, void* recv, std::size_t bytes) override {
        const Request r = slot();
        check_count(bytes, "MPI_Iallgather");
        detail::mpi_check(MPI_Iallgather(send, int(bytes), MPI_BYTE, recv, int(bytes), MPI_BYTE, comm_, &requests_[r]),
                          "MPI_Iallgather", rank_);
        ++stats_.gathers;
        stats_.bytes_gathered += bytes;
        return r;
    }
    Request start_broadcast(void* data, std::size_t bytes, int root) override {
        check_root(root, "MPI_Ibcast");
        const Request r = slot();
        check_count(bytes, "MPI_Ibcast");
        detail::mpi_check(MPI_Ibcast(data, int(bytes), MPI_BYTE, root, comm_, &requests_[r]), "MPI_Ibcast", rank_);
        ++stats_.broadcasts;
        stats_.bytes_broadcast += bytes;
        return r;
    }
    Request start_barrier() override {
        const Request r = slot();
        detail::mpi_check(MPI_Ibarrier(comm_, &requests_[r]), "MPI_Ibarrier", rank_);
        return r;
    }
    bool test(Request r) override {
        if (r >= requests_.size())
            throw DistError(patchwork::detail::concat("dist: rank ", rank_, ": unknown request ", r));
        if (requests_[r] == MPI_REQUEST_NULL) return true;
        int done = 0;
        detail::mpi_check(MPI_Test(&requests_[r], &done, MPI_STATUS_IGNORE), "MPI_Test", rank_);
        return done != 0;  // MPI_Test sets a completed request to MPI_REQUEST_NULL: the slot is free again
    }
    [[noreturn]] void abort(int code, std::string_view why) noexcept override {
        std::fprintf(stderr, "patchwork: rank %d of %d aborts the job: %.*s\n", rank_, size_, int(why.size()),
                     why.data());
        std::fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, code);
        std::_Exit(code);  // MPI_Abort does not return; this keeps [[noreturn]] honest
    }

private:
    Request slot() {
        for (Request i = 0; i < requests_.size(); ++i)
            if (requests_[i] == MPI_REQUEST_NULL) return i;
        requests_.push_back(MPI_REQUEST_NULL);
        return requests_.size() - 1;
    }
    void check_count(std::size_t n, std::string_view call) const {
        if (n > std::size_t(2147483647))
            throw DistError(patchwork::detail::concat("dist: rank ", rank_, ": ", call, " of ", n,
                                                      " elements exceeds MPI's int count; use smaller buckets"));
    }

    MPI_Comm comm_ = MPI_COMM_NULL;
    int rank_ = 0;
    int size_ = 1;
    std::vector<MPI_Request> requests_;
};

}  // namespace patchwork::dist
