#pragma once
// dist::Communicator: the collective operations data-parallel training needs,
// over a transport (MPI between processes: dist/mpi.hpp; one process alone:
// LocalCommunicator here).
//
// Every collective is started non-blocking and completed by wait(), which
// polls the transport until it completes or the communicator's timeout
// passes. A rank that died or stopped therefore never hangs the others: they
// throw TimeoutError naming the operation, and a guarded main
// (dist::run_guarded, dist/mpi.hpp) turns any exception into an abort of the
// whole job.
//
// Collectives must be called in the same order on every rank (MPI's rule).
// The communicator also carries this rank's share of the current global batch
// (set_local_share), which ShardedSource sets and DataParallel reads to
// weight the gradients it averages.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include "patchwork/core/error.hpp"

namespace patchwork::dist {

/// A collective failed, or the ranks disagree (models, trainable sets, checksums).
class DistError : public Error {
public:
    using Error::Error;
};

/// A collective did not complete within the communicator's timeout.
class TimeoutError : public DistError {
public:
    using DistError::DistError;
};

/// Element types the reductions know.
enum class DataType { f32, f64 };

template <class T>
constexpr DataType data_type_of() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "patchwork::dist: gradients are reduced as float or double");
    return std::is_same_v<T, float> ? DataType::f32 : DataType::f64;
}

/// Counters of what a communicator moved (this rank's contribution).
struct TrafficStats {
    std::size_t reductions = 0;        ///< all-reduce operations started
    std::size_t bytes_reduced = 0;     ///< bytes this rank contributed to all-reduces
    std::size_t gathers = 0;           ///< all-gather operations started
    std::size_t bytes_gathered = 0;    ///< bytes this rank contributed to all-gathers
    std::size_t broadcasts = 0;
    std::size_t bytes_broadcast = 0;
    std::size_t device_collectives = 0;  ///< of those, collectives on device memory (NCCL)
    double wait_seconds = 0;           ///< time spent in wait()
};

/// The collective operations of a group of ranks. Implementations provide the
/// non-blocking starts, test and abort; the blocking forms are built on them.
class Communicator {
public:
    /// Handle of a started collective.
    using Request = std::size_t;

    virtual ~Communicator() = default;

    [[nodiscard]] virtual int rank() const noexcept = 0;
    [[nodiscard]] virtual int size() const noexcept = 0;
    /// "mpi", "local", ...
    [[nodiscard]] virtual std::string_view backend() const noexcept = 0;

    /// In place: data <- sum over ranks of data (count elements of type t).
    virtual Request start_allreduce_sum(void* data, std::size_t count, DataType t) = 0;
    /// recv[r * bytes .. (r + 1) * bytes) <- rank r's send (bytes each).
    virtual Request start_allgather(const void* send, void* recv, std::size_t bytes) = 0;
    /// data <- root's data.
    virtual Request start_broadcast(void* data, std::size_t bytes, int root) = 0;
    virtual Request start_barrier() = 0;
    /// True once the collective is complete (the handle is then spent).
    virtual bool test(Request r) = 0;
    /// End every rank of the job now (after a failure on this rank), with exit code `code`.
    [[noreturn]] virtual void abort(int code, std::string_view why) noexcept = 0;

    // -- collectives on device memory (GPU buffers) -------------------------------
    // A communicator over a GPU transport (NCCL: dist/nccl.hpp) reduces device
    // buffers directly, ordered on the current CUDA stream after the work that
    // wrote them; test() completes when the stream has passed the collective.
    // The others have none: DataParallel then stages a device model's
    // gradients through host memory.

    /// Whether the start_device_* collectives below are available.
    [[nodiscard]] virtual bool device_collectives() const noexcept { return false; }
    /// In place on device memory: data <- sum over ranks.
    virtual Request start_device_allreduce_sum(void*, std::size_t, DataType) { no_device("all-reduce"); }
    /// recv[r * bytes .. (r + 1) * bytes) <- rank r's send, device memory.
    virtual Request start_device_allgather(const void*, void*, std::size_t) { no_device("all-gather"); }
    /// data <- root's data, device memory.
    virtual Request start_device_broadcast(void*, std::size_t, int) { no_device("broadcast"); }

    /// Seconds a wait() may take before it throws TimeoutError (default 300).
    void set_timeout(double seconds) {
        if (!(seconds > 0))
            throw ConfigError(detail::concat("dist::Communicator::set_timeout: the timeout must be positive, got ",
                                             seconds, " s"));
        timeout_ = seconds;
    }
    [[nodiscard]] double timeout() const noexcept { return timeout_; }

    /// Complete a started collective; `what` names it in a timeout error.
    void wait(Request r, std::string_view what) {
        using clock = std::chrono::steady_clock;
        const auto t0 = clock::now();
        const auto deadline = t0 + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_));
        // Every test() is also what moves the transfer forward (MPI makes
        // progress inside its calls), so polling never sleeps while data may
        // flow: spin, then yield the core to any other runnable process after
        // each few polls (ranks may outnumber cores). It never sleeps: a rank
        // waiting for a slower peer keeps one core busy, which costs nothing
        // while every rank has its own core.
        for (unsigned polls = 0; !test(r); ++polls) {
            if ((polls & 63) != 0) continue;
            const auto now = clock::now();
            if (now > deadline) {
                stats_.wait_seconds += std::chrono::duration<double>(now - t0).count();
                throw TimeoutError(detail::concat("dist: rank ", rank(), " of ", size(), ": ", what,
                                                  " did not complete within ", timeout_,
                                                  " s (a peer rank may have failed, died or stopped; "
                                                  "Communicator::set_timeout changes the limit)"));
            }
            if (polls > 4096) std::this_thread::yield();
        }
        stats_.wait_seconds += std::chrono::duration<double>(clock::now() - t0).count();
    }

    // -- blocking forms ---------------------------------------------------------

    template <class T>
    void allreduce_sum(T* data, std::size_t count, std::string_view what = "all-reduce") {
        wait(start_allreduce_sum(data, count, data_type_of<T>()), what);
    }
    void allgather(const void* send, void* recv, std::size_t bytes, std::string_view what = "all-gather") {
        wait(start_allgather(send, recv, bytes), what);
    }
    void broadcast(void* data, std::size_t bytes, int root = 0, std::string_view what = "broadcast") {
        check_root(root, what);
        wait(start_broadcast(data, bytes, root), what);
    }
    void barrier(std::string_view what = "barrier") { wait(start_barrier(), what); }

    /// Every rank's value, in rank order.
    std::vector<std::uint64_t> allgather_u64(std::uint64_t v, std::string_view what = "all-gather") {
        std::vector<std::uint64_t> out(static_cast<std::size_t>(size()));
        allgather(&v, out.data(), sizeof v, what);
        return out;
    }
    /// Every rank's string, in rank order.
    std::vector<std::string> allgather_strings(const std::string& s, std::string_view what = "all-gather") {
        const auto lengths = allgather_u64(s.size(), what);
        std::uint64_t longest = 0;
        for (auto n : lengths) longest = std::max(longest, n);
        std::string padded = s;
        padded.resize(std::size_t(longest), '\0');
        std::string all(std::size_t(longest) * std::size_t(size()), '\0');
        if (longest) allgather(padded.data(), all.data(), std::size_t(longest), what);
        std::vector<std::string> out;
        for (int r = 0; r < size(); ++r)
            out.push_back(all.substr(std::size_t(r) * std::size_t(longest), std::size_t(lengths[std::size_t(r)])));
        return out;
    }
    /// Root's string on every rank.
    std::string broadcast_string(std::string s, int root = 0, std::string_view what = "broadcast") {
        std::uint64_t n = s.size();
        broadcast(&n, sizeof n, root, what);
        s.resize(std::size_t(n));
        if (n) broadcast(s.data(), std::size_t(n), root, what);
        return s;
    }

    // -- this rank's share of the current global batch ----------------------------

    /// This rank holds `local` of the `global` samples of the current step;
    /// DataParallel weights its gradients by local / global. Until set (or
    /// after clear_local_share) every rank counts 1 / size.
    void set_local_share(std::size_t local, std::size_t global) {
        if (global == 0 || local > global)
            throw ConfigError(detail::concat("dist: rank ", rank(), ": invalid batch share ", local, " of ", global,
                                             " samples"));
        share_ = double(local) / double(global);
    }
    void clear_local_share() noexcept { share_ = -1; }
    /// The weight of this rank's gradients in the average.
    [[nodiscard]] double local_weight() const noexcept { return share_ >= 0 ? share_ : 1.0 / double(size()); }

    [[nodiscard]] const TrafficStats& stats() const noexcept { return stats_; }
    void reset_stats() noexcept { stats_ = {}; }

protected:
    Communicator() = default;
    Communicator(const Communicator&) = delete;
    Communicator& operator=(const Communicator&) = delete;

    void check_root(int root, std::string_view what) const {
        if (root < 0 || root >= size())
            throw ConfigError(detail::concat("dist: ", what, ": root rank ", root, " is not in [0, ", size(), ")"));
    }
    static std::size_t element_size(DataType t) noexcept { return t == DataType::f32 ? 4 : 8; }
    [[noreturn]] void no_device(std::string_view op) const {
        throw DistError(detail::concat("dist: the ", backend(), " communicator has no ", op,
                                       " on device memory (device_collectives() is false)"));
    }

    TrafficStats stats_{};

private:
    double timeout_ = 300;
    double share_ = -1;
};

/// One process alone: size 1, every collective completes at once. Code written
/// for data parallelism runs unchanged without MPI.
class LocalCommunicator final : public Communicator {
public:
    [[nodiscard]] int rank() const noexcept override { return 0; }
    [[nodiscard]] int size() const noexcept override { return 1; }
    [[nodiscard]] std::string_view backend() const noexcept override { return "local"; }

    Request start_allreduce_sum(void*, std::size_t count, DataType t) override {
        ++stats_.reductions;
        stats_.bytes_reduced += count * element_size(t);
        return 0;
    }
    Request start_allgather(const void* send, void* recv, std::size_t bytes) override {
        ++stats_.gathers;
        stats_.bytes_gathered += bytes;
        if (bytes && send != recv) std::memmove(recv, send, bytes);
        return 0;
    }
    Request start_broadcast(void*, std::size_t bytes, int) override {
        ++stats_.broadcasts;
        stats_.bytes_broadcast += bytes;
        return 0;
    }
    Request start_barrier() override { return 0; }
    bool test(Request) override { return true; }
    [[noreturn]] void abort(int code, std::string_view why) noexcept override {
        std::fprintf(stderr, "patchwork: aborting: %.*s\n", int(why.size()), why.data());
        std::fflush(stderr);
        std::_Exit(code);
    }
};

/// Run `body` (returning an int exit code); if it throws on this rank, print
/// the rank and the message and abort every rank of the job, so no peer waits
/// for a collective this rank will never join.
template <class Body>
int run_guarded(Communicator& comm, Body&& body) {
    try {
        return static_cast<Body&&>(body)();
    } catch (const std::exception& e) {
        comm.abort(1, e.what());
    } catch (...) {
        comm.abort(1, "an exception not derived from std::exception");
    }
    return 1;  // not reached: abort does not return
}

}  // namespace patchwork::dist
