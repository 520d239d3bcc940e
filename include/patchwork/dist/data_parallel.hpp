#pragma once
// Data-parallel training: every rank holds the whole model, trains on its
// part of each global batch, and the ranks average the gradients of the
// trainable parameters only. With a parameter-efficient policy that is often
// under 1 % of the model, so communication nearly vanishes.
//
//     dist::MpiEnvironment env(argc, argv);
//     dist::MpiCommunicator comm;
//     auto model = ...;                               // same code on every rank
//     dist::synchronize_model(comm, model);           // same architecture, rank 0's values everywhere
//     AdamW inner{trainable_parameters(model), {.lr = 1e-3}};
//     dist::DataParallel opt(comm, inner);            // an Optimizer: fit, fit_multitask, search::run take it
//     opt.sync_buffers(model);                        // with BatchNorm: running statistics kept equal
//     Batcher<float> global(train, 64, seed);         // the same global batches on every rank
//     dist::ShardedSource shard(comm, global);        // this rank's rows of each
//     fit(model, opt, shard, {.epochs = 3});
//     dist::on_root(comm, [&] { save_parameters(model, "model.safetensors"); });
//
// The average. A rank holding n_r of the N rows of a global batch computes
// g_r, the gradient of its mean loss; the gradient of the global mean loss is
//     g = sum_r (n_r / N) g_r,
// so each rank scales its gradients by its share w_r = n_r / N (set by
// ShardedSource through Communicator::set_local_share; 1/P when unset) and the
// ranks sum. Losses that are means over rows (cross-entropy, MSE) average
// exactly; a loss summed over rows would need w_r = 1.
//
// Buckets. The trainable gradients are packed into flat buckets of about
// bucket_bytes, filled in reverse parameter order (the order backward
// produces them). With `overlap` on (off by default), within a step announced by begin_step()
// (optimizer_step calls it before the forward), chains report each child's parameters
// when its backward returns (core/gradient_ready.hpp) and a bucket whose
// parameters are all reported starts its all-reduce at once, while earlier
// layers still run backward; buckets always start in index order, so every
// rank issues the same collectives in the same order. reduce_gradients()
// starts the rest, waits for all, and writes the averages back. A bucket sent
// early is checked against the gradients at the end (a second backward in the
// same step may have added to them); if any rank finds a change, the ranks
// agree on it (one small all-reduce) and resend that bucket, so the result is
// always the reduction of the final gradients.
//
// Reduction order. An MPI all-reduce sums in an order of the library's
// choosing, so results can differ in the last bits from one process's sum.
// With `exact_order` the ranks instead gather every rank's bucket and each
// sums them in rank order, 0 first: the result is bit-identical on every rank
// and from run to run, and equals one process adding the same shard gradients
// in the same order (the test suite checks this in double). It moves P times
// the bytes; use it to debug or to reproduce.
//
// Device models. An optimiser over device parameters (BasicAdamW<float,
// Cuda>, ...) keeps its buckets in device memory: packing (w * g) and, with
// exact_order, the rank-order sum are kernels. With a communicator that has
// device collectives (NCCL, dist/nccl.hpp) the buckets are reduced where they
// are; with any other (MPI) each bucket is staged through host memory (one
// copy down before and one up after its collective). The checks, checksums and
// broadcasts of synchronize_model read device values through host copies.
//
// Clipping and the step. optimizer_step (train/step.hpp) calls
// reduce_gradients() after backward and before clipping, so the global norm
// is the norm of the averaged gradient on every rank; step() reduces first if
// that has not happened in this step, then runs the wrapped optimiser.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "patchwork/core/error.hpp"
#include "patchwork/core/gradient_ready.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/tensor.hpp"
#include "patchwork/dist/communicator.hpp"
#include "patchwork/ops/cuda_ops.hpp"
#include "patchwork/layers/embedding.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/optimizer.hpp"

namespace patchwork::dist {

namespace detail {
using patchwork::detail::concat;

/// 64-bit FNV-1a over bytes, continued from `h`.
inline std::uint64_t fnv1a(const void* data, std::size_t bytes, std::uint64_t h = 1469598103934665603ull) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < bytes; ++i) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/// One line per parameter and buffer: what must agree across ranks.
template <class M>
std::vector<std::string> describe_state(M& model) {
    std::vector<std::string> lines;
    model.visit([&](auto& p) {
        std::ostringstream os;
        os << "parameter '" << p.name() << "' " << p.value.shape() << " " << role_name(p.role())
           << (p.trainable() ? " trainable" : " frozen");
        if (p.task() != shared_task) os << " task " << p.task();
        lines.push_back(os.str());
    });
    for_each_module(model, [&](auto& m) {
        if constexpr (requires {
                          m.running_mean.shape();
                          m.running_var.shape();
                      }) {
            const std::string at = patchwork::detail::display_path(m.path());
            lines.push_back(concat("buffer '", at, ".running_mean' ", m.running_mean.shape()));
            lines.push_back(concat("buffer '", at, ".running_var' ", m.running_var.shape()));
        }
    });
    return lines;
}

/// Calls f(data, bytes, label, on_device) for every parameter value and buffer, in a fixed
/// order; on_device is std::true_type for device memory, std::false_type for host memory.
template <class M, class F>
void for_each_state_tensor(M& model, F&& f) {
    model.visit([&](auto& p) {
        using V = std::remove_cvref_t<decltype(p.value)>;
        using E = std::remove_cvref_t<decltype(*p.value.data())>;
        f(static_cast<void*>(p.value.data()), p.value.size() * sizeof(E), p.name(),
          std::bool_constant<!std::is_same_v<V, Tensor<E>>>{});
    });
    for_each_module(model, [&](auto& m) {
        if constexpr (requires {
                          m.running_mean.data();
                          m.running_var.data();
                      }) {
            const std::string at = patchwork::detail::display_path(m.path());
            using E = std::remove_cvref_t<decltype(*m.running_mean.data())>;
            // A device BatchNorm2d keeps its statistics in device memory.
            using on_device = std::bool_constant<!std::is_same_v<std::remove_cvref_t<decltype(m.running_mean)>, Tensor<E>>>;
            f(static_cast<void*>(m.running_mean.data()), m.running_mean.size() * sizeof(E), at + ".running_mean",
              on_device{});
            f(static_cast<void*>(m.running_var.data()), m.running_var.size() * sizeof(E), at + ".running_var",
              on_device{});
        }
    });
}

/// Every rank's `lines` must equal rank 0's; otherwise a DistError on every
/// rank naming the first rank and the first line that differ.
inline void check_same_lines(Communicator& comm, const std::vector<std::string>& lines, const char* what) {
    std::string joined;
    for (const auto& l : lines) joined += l + '\n';
    const auto hashes = comm.allgather_u64(fnv1a(joined.data(), joined.size()), "the model check's all-gather");
    if (std::all_of(hashes.begin(), hashes.end(), [&](auto h) { return h == hashes[0]; })) return;
    const auto all = comm.allgather_strings(joined, "the model check's all-gather");
    const auto split = [](const std::string& s) {
        std::vector<std::string> out;
        std::size_t b = 0;
        for (std::size_t e; (e = s.find('\n', b)) != std::string::npos; b = e + 1) out.push_back(s.substr(b, e - b));
        return out;
    };
    const auto ref = split(all[0]);
    for (int r = 1; r < comm.size(); ++r) {
        const auto other = split(all[std::size_t(r)]);
        if (other == ref) continue;
        std::size_t i = 0;
        while (i < ref.size() && i < other.size() && ref[i] == other[i]) ++i;
        const std::string mine = i < ref.size() ? ref[i] : std::string("nothing (rank 0 has ") +
                                                              std::to_string(ref.size()) + " entries)";
        const std::string theirs = i < other.size() ? other[i] : std::string("nothing (rank ") + std::to_string(r) +
                                                                   " has " + std::to_string(other.size()) + " entries)";
        throw DistError(concat("dist: the ", what, " differ across ranks (seen on rank ", comm.rank(), "): entry ", i,
                               " is ", mine, " on rank 0 but ", theirs, " on rank ", r));
    }
}

/// The bytes of a state tensor on the host (device memory read back).
template <class OnDevice>
std::vector<unsigned char> host_bytes(const void* data, std::size_t bytes, OnDevice) {
    std::vector<unsigned char> out(bytes);
    if (bytes == 0) return out;
    if constexpr (OnDevice::value)
        cuda::copy_elements(out.data(), static_cast<const unsigned char*>(data), bytes, cuda::CopyKind::device_to_host,
                            "dist: reading a device tensor");
    else
        std::memcpy(out.data(), data, bytes);
    return out;
}

}  // namespace detail

/// The model's parameters (names, shapes, roles, trainable flags, tasks) and
/// buffers must be the same on every rank; a DistError naming the first
/// difference otherwise (thrown on every rank, so none is left waiting).
template <class M>
void check_same_model(Communicator& comm, M& model) {
    detail::check_same_lines(comm, detail::describe_state(model), "models");
}

/// A 64-bit checksum of every parameter value and buffer (BatchNorm running statistics).
template <class M>
[[nodiscard]] std::uint64_t state_checksum(M& model) {
    std::uint64_t h = 1469598103934665603ull;
    detail::for_each_state_tensor(model, [&](void* data, std::size_t bytes, const std::string&, auto dev) {
        if constexpr (decltype(dev)::value) {
            const auto host = detail::host_bytes(data, bytes, dev);
            h = detail::fnv1a(host.data(), bytes, h);
        } else {
            h = detail::fnv1a(data, bytes, h);
        }
    });
    return h;
}

/// Rank `root`'s parameter values and buffers copied to every rank.
template <class M>
void broadcast_state(Communicator& comm, M& model, int root = 0) {
    detail::for_each_state_tensor(model, [&](void* data, std::size_t bytes, const std::string& name, auto dev) {
        if (!bytes) return;
        const std::string what = "the broadcast of '" + name + "'";
        if constexpr (!decltype(dev)::value) {
            comm.broadcast(data, bytes, root, what);
        } else if (comm.device_collectives()) {
            comm.wait(comm.start_device_broadcast(data, bytes, root), what);
        } else {  // staged through host memory
            auto host = detail::host_bytes(data, bytes, dev);
            comm.broadcast(host.data(), bytes, root, what);
            cuda::copy_elements(static_cast<unsigned char*>(data), host.data(), bytes, cuda::CopyKind::host_to_device,
                                what);
        }
    });
}

/// Every rank's parameter values and buffers must be bit-identical; a
/// DistError on every rank naming the first tensor that differs otherwise.
template <class M>
void check_in_sync(Communicator& comm, M& model) {
    const auto sums = comm.allgather_u64(state_checksum(model), "the state checksum's all-gather");
    if (std::all_of(sums.begin(), sums.end(), [&](auto s) { return s == sums[0]; })) return;
    std::vector<std::string> lines;
    detail::for_each_state_tensor(model, [&](void* data, std::size_t bytes, const std::string& name, auto dev) {
        const auto host = detail::host_bytes(data, bytes, dev);
        lines.push_back(detail::concat("'", name, "' with checksum ", detail::fnv1a(host.data(), bytes)));
    });
    detail::check_same_lines(comm, lines, "parameter values");
    throw DistError("dist: the state checksums differ across ranks, but no tensor does (a rank changed during the check)");
}

/// Start of data-parallel training: check that every rank built the same
/// model (check_same_model), copy rank 0's values and buffers to all
/// (broadcast_state), and verify the copies by checksum (check_in_sync).
template <class M>
void synchronize_model(Communicator& comm, M& model) {
    check_same_model(comm, model);
    broadcast_state(comm, model, 0);
    check_in_sync(comm, model);
}

/// Run `write` on rank 0 only (saving a checkpoint: the library's writers
/// write a temporary file and rename it), then let every rank continue. If
/// it throws on rank 0, every rank throws a DistError with its message.
template <class F>
void on_root(Communicator& comm, F&& write) {
    std::string failure;
    if (comm.rank() == 0) {
        try {
            std::forward<F>(write)();
        } catch (const std::exception& e) {
            failure = e.what();
            if (failure.empty()) failure = "an exception without a message";
        }
    }
    failure = comm.broadcast_string(failure, 0, "on_root's status broadcast");
    if (!failure.empty()) throw DistError("dist: rank 0 failed in on_root: " + failure);
}

/// Options of DataParallel.
struct DataParallelOptions {
    std::size_t bucket_bytes = std::size_t(4) << 20;  ///< target size of a gradient bucket
    /// Start a bucket's reduction during backward once its gradients are complete.
    /// Off by default: on CPUs the ranks' cores are busy computing, so nothing
    /// overlaps, and the end-of-step check costs two passes over the gradients
    /// (fine-tuning MiniLM on 2 processes: 7 to 9 % slower steps with it on).
    bool overlap = false;
    bool exact_order = false;  ///< gather and sum in rank order: bit-identical results, P times the bytes
    bool check = true;         ///< check at construction that every rank has the same trainable set
};

/// What the last reduce_gradients() did.
struct ReductionStats {
    std::size_t buckets = 0;          ///< buckets of the current layout
    std::size_t early = 0;            ///< buckets started during backward
    std::size_t resent = 0;           ///< buckets sent again because their gradients changed after an early start
    std::size_t parameters = 0;       ///< trainable parameters reduced
    std::size_t bytes = 0;            ///< gradient bytes this rank contributed
    std::size_t steps = 0;            ///< reductions so far
};

/// An optimiser wrapper that averages the trainable gradients across the
/// ranks of `comm` before each update (see the file comment). Wraps `inner`
/// by reference; the parameters are those of its groups (or the list given).
template <Optimizer O>
class DataParallel final : private patchwork::detail::GradientReadyObserver {
public:
    using Scalar = typename O::Scalar;
    using Device = device_of_t<O>;  ///< of its parameters: the optimiser's Device member (Cpu without one)
    using Param = Parameter<Scalar, Device>;
    static_assert(!std::is_same_v<Scalar, bf16>,
                  "patchwork::dist::DataParallel: bf16 models are not averaged across ranks yet (their fp32 "
                  "gradients need fp32 buckets); use float or double");

    DataParallel(Communicator& comm, O& inner, DataParallelOptions options = {})
        : DataParallel(comm, inner, options, parameters_of(inner)) {}
    /// Averages the gradients of `params` (an optimiser without groups(), or a subset).
    DataParallel(Communicator& comm, O& inner, DataParallelOptions options, std::vector<Param*> params)
        : comm_(comm), inner_(inner), options_(options), params_(std::move(params)) {
        if (options_.bucket_bytes == 0)
            throw ConfigError("dist::DataParallel: bucket_bytes must be positive, got 0");
        std::unordered_set<const void*> seen;
        for (std::size_t i = 0; i < params_.size(); ++i) {
            if (params_[i] == nullptr)
                throw ConfigError(detail::concat("dist::DataParallel: parameter ", i, " is null"));
            if (!seen.insert(params_[i]).second)
                throw ConfigError(detail::concat("dist::DataParallel: parameter '", params_[i]->name(),
                                                 "' is listed twice"));
            slot_of_[params_[i]] = i;
        }
        stamp_.assign(params_.size(), 0);
        if (options_.check) {
            std::vector<std::string> lines;
            for (const auto* p : params_)
                lines.push_back(detail::concat("parameter '", p->name(), "' ", p->value.shape(),
                                               p->trainable() ? " trainable" : " frozen"));
            detail::check_same_lines(comm_, lines, "optimised parameters");
        }
        build_layout();
        patchwork::detail::add_gradient_ready_observer(this);
    }
    ~DataParallel() { patchwork::detail::remove_gradient_ready_observer(this); }
    DataParallel(const DataParallel&) = delete;
    DataParallel& operator=(const DataParallel&) = delete;

    /// Average the trainable gradients across ranks (optimizer_step calls it
    /// after backward, before clipping). Collective: every rank must call it.
    void reduce_gradients() {
        const bool overlapped = armed_;  // buckets may have left during backward (the same on every rank)
        armed_ = false;
        if (layout_stale()) {
            wait_launched();  // sent with an outdated layout: complete them, then start over
            build_layout();
        }
        const double w = comm_.local_weight();
        if (!(w > 0 && w <= 1))
            throw ConfigError(detail::concat("dist::DataParallel: rank ", comm_.rank(), "'s gradient weight ", w,
                                             " is outside (0, 1]"));
        for (std::size_t b = next_launch_; b < buckets_.size(); ++b) launch(b, false);
        next_launch_ = buckets_.size();
        for (std::size_t b = 0; b < buckets_.size(); ++b) finish(b);
        last_.early = 0;
        last_.resent = 0;
        if (overlapped && !buckets_.empty()) {
            // Gradients that changed after their bucket left: the ranks agree and resend.
            std::vector<double> changed(buckets_.size(), 0.0);
            for (std::size_t b = 0; b < buckets_.size(); ++b) {
                last_.early += buckets_[b].early ? 1 : 0;
                if (buckets_[b].early && gradients_changed(b)) changed[b] = 1;
            }
            comm_.allreduce_sum(changed.data(), changed.size(), "the all-reduce of the resend flags");
            for (std::size_t b = 0; b < buckets_.size(); ++b)
                if (changed[b] > 0) {
                    launch(b, false);
                    finish(b);
                    ++last_.resent;
                }
        }
        for (std::size_t b = 0; b < buckets_.size(); ++b) unpack(b);
        if (!buffers_.empty()) average_buffers();
        for (auto& bucket : buckets_) {
            bucket.pending = bucket.slots.size();
            bucket.launched = bucket.early = false;
        }
        next_launch_ = 0;
        ++epoch_;
        ++last_.steps;
        reduced_ = true;
    }

    /// A step begins: gradients may be sent during the coming backward (with
    /// `overlap`). optimizer_step calls it; without it every bucket is sent by
    /// reduce_gradients().
    void begin_step() noexcept { armed_ = options_.overlap && comm_.size() > 1; }

    // -- Optimizer interface ----------------------------------------------------
    void step() {
        if (!reduced_) reduce_gradients();
        inner_.step();
        reduced_ = false;
    }
    void zero_grad() { inner_.zero_grad(); }
    void set_lr_factor(double f) { inner_.set_lr_factor(f); }
    [[nodiscard]] double lr() const { return inner_.lr(); }

    /// Keep `model`'s running statistics (BatchNorm2d buffers, and the
    /// per-task statistics of a multi-task model, which are frozen parameters
    /// named *.running_mean / *.running_var) the same on every rank: at each
    /// reduce_gradients() their changes since the last one are averaged with
    /// the ranks' batch shares, like the gradients. A running mean then
    /// follows the global batch's mean exactly; a running variance follows the
    /// average of the per-rank variances (each rank normalises with its own
    /// batch statistics, as without synchronised BatchNorm). Rank 0's values
    /// are broadcast first. Collective.
    template <class M>
    void sync_buffers(M& model) {
        static_assert(!on_gpu, "dist::DataParallel::sync_buffers: averaging running statistics is implemented for "
                               "CPU models only (a device model's BatchNorm2d keeps them in device memory)");
        buffers_.clear();
        for_each_module(model, [&](auto& m) {
            if constexpr (requires {
                              m.running_mean.data();
                              m.running_var.data();
                          }) {
                if constexpr (std::is_same_v<std::remove_cvref_t<decltype(*m.running_mean.data())>, Scalar>) {
                    buffers_.push_back(&m.running_mean);
                    buffers_.push_back(&m.running_var);
                }
            }
        });
        model.visit([&](auto& p) {
            if constexpr (std::is_same_v<std::remove_cvref_t<decltype(p)>, Param>)
                if (!p.trainable() && (p.leaf() == "running_mean" || p.leaf() == "running_var"))
                    buffers_.push_back(&p.value);
        });
        buffer_base_.clear();
        std::size_t total = 0;
        for (auto* b : buffers_) {
            if (b->size()) comm_.broadcast(b->data(), b->size() * sizeof(Scalar), 0, "the broadcast of running statistics");
            buffer_base_.insert(buffer_base_.end(), b->begin(), b->end());
            total += b->size();
        }
        buffer_flat_.resize(total);
    }

    /// The same averaging applied to another optimiser (search::run wraps its
    /// architecture optimiser this way, so the alphas are averaged too).
    template <Optimizer O2>
    [[nodiscard]] DataParallel<O2> companion(O2& other) {
        return DataParallel<O2>(comm_, other, options_);
    }

    [[nodiscard]] O& inner() noexcept { return inner_; }
    [[nodiscard]] Communicator& communicator() noexcept { return comm_; }
    [[nodiscard]] const DataParallelOptions& options() const noexcept { return options_; }
    /// What the last reduction did (buckets, early starts, bytes).
    [[nodiscard]] const ReductionStats& last_reduction() const noexcept { return last_; }
    /// Gradient bytes one step reduces (trainable parameters only).
    [[nodiscard]] std::size_t bytes_per_step() const noexcept { return last_.bytes; }

private:
    struct Bucket {
        std::vector<std::size_t> slots;  ///< parameter slots, in backward order
        std::size_t count = 0;           ///< scalars
        std::vector<Scalar> flat;        ///< this rank's weighted gradients; the sum after an all-reduce
        std::vector<Scalar> snapshot;    ///< what an early all-reduce sent (flat is overwritten in place)
        std::vector<Scalar> gathered;    ///< exact_order: every rank's flat, rank after rank
        Tensor<Scalar, Device> dflat, dsnapshot, dgathered;  ///< the same in device memory (device models)
        Communicator::Request request = 0;
        std::size_t pending = 0;         ///< parameters not yet reported ready this step
        bool launched = false;
        bool early = false;
    };

    static std::vector<Param*> parameters_of(O& inner) {
        if constexpr (requires { inner.groups(); }) {
            std::vector<Param*> out;
            std::unordered_set<const void*> seen;
            for (const auto& g : inner.groups())
                for (auto* p : g.params)
                    if (seen.insert(p).second) out.push_back(p);
            return out;
        } else {
            static_assert(sizeof(O) == 0,
                          "dist::DataParallel: this optimiser does not list its parameter groups (groups()); "
                          "pass the parameters explicitly: DataParallel(comm, opt, options, params)");
            return {};
        }
    }

    void build_layout() {
        buckets_.clear();
        bucket_of_.assign(params_.size(), -1);
        trainable_now_.assign(params_.size(), 0);
        last_ = ReductionStats{0, 0, 0, 0, 0, last_.steps};
        Bucket current;
        std::size_t bytes = 0;
        for (std::size_t i = params_.size(); i-- > 0;) {
            Param& p = *params_[i];
            trainable_now_[i] = p.trainable() ? 1 : 0;
            if (!p.trainable()) continue;
            bucket_of_[i] = int(buckets_.size());
            current.slots.push_back(i);
            current.count += p.value.size();
            bytes += p.value.size() * sizeof(Scalar);
            ++last_.parameters;
            if (bytes >= options_.bucket_bytes) {
                buckets_.push_back(std::move(current));
                current = Bucket{};
                bytes = 0;
            }
        }
        if (!current.slots.empty()) buckets_.push_back(std::move(current));
        for (auto& b : buckets_) {
            b.flat.resize(b.count);
            if constexpr (on_gpu) b.dflat.resize(Shape{b.count});
            b.pending = b.slots.size();
            last_.bytes += b.count * sizeof(Scalar);
        }
        last_.buckets = buckets_.size();
        next_launch_ = 0;
    }

    [[nodiscard]] bool layout_stale() const {
        for (std::size_t i = 0; i < params_.size(); ++i)
            if ((params_[i]->trainable() ? 1 : 0) != trainable_now_[i]) return true;
        return false;
    }

    void wait_launched() {
        for (std::size_t b = 0; b < buckets_.size(); ++b)
            if (buckets_[b].launched) comm_.wait(buckets_[b].request, what(b));
    }

    [[nodiscard]] std::string what(std::size_t b) const {
        return detail::concat(options_.exact_order ? "the all-gather" : "the all-reduce", " of gradient bucket ", b,
                              " (", buckets_[b].slots.size(), " parameters, ", buckets_[b].count * sizeof(Scalar),
                              " bytes, first '", params_[buckets_[b].slots.front()]->name(), "')");
    }

    static constexpr bool on_gpu = std::is_same_v<Device, Cuda>;
    /// Device buckets reduced in device memory (else staged through flat on the host).
    [[nodiscard]] bool in_device_memory() const noexcept { return on_gpu && comm_.device_collectives(); }

    /// flat <- w * gradients of bucket b (device models: dflat, and flat too when staged).
    void pack(std::size_t b) {
        Bucket& bucket = buckets_[b];
        const auto w = Scalar(comm_.local_weight());
        std::size_t at = 0;
        for (auto slot : bucket.slots) {
            const Param& p = *params_[slot];
            if (p.grad.size() != p.value.size())
                throw DistError(detail::concat("dist::DataParallel: rank ", comm_.rank(), ": parameter '", p.name(),
                                               "' has no gradient (", p.grad.shape(), " for a value of ",
                                               p.value.shape(), ")"));
            if constexpr (on_gpu) {
                cuda::scaled_copy(w, p.grad.data(), bucket.dflat.data() + at, p.grad.size(), p.name());
            } else {
                const Scalar* g = p.grad.data();
                for (std::size_t k = 0; k < p.grad.size(); ++k) bucket.flat[at + k] = w * g[k];
            }
            at += p.grad.size();
        }
        if constexpr (on_gpu)
            if (!in_device_memory())
                cuda::copy_elements(bucket.flat.data(), bucket.dflat.data(), bucket.count, cuda::CopyKind::device_to_host,
                                    "dist::DataParallel: staging a gradient bucket");
    }

    void launch(std::size_t b, bool early) {
        Bucket& bucket = buckets_[b];
        pack(b);
        bucket.early = early;
        const std::size_t bytes = bucket.count * sizeof(Scalar);
        if (in_device_memory()) {
            if (options_.exact_order) {
                bucket.dgathered.resize(Shape{bucket.count * std::size_t(comm_.size())});
                bucket.request = comm_.start_device_allgather(bucket.dflat.data(), bucket.dgathered.data(), bytes);
            } else {
                if (early) bucket.dsnapshot = bucket.dflat;
                bucket.request = comm_.start_device_allreduce_sum(bucket.dflat.data(), bucket.count,
                                                                  data_type_of<Scalar>());
            }
        } else if (options_.exact_order) {
            bucket.gathered.resize(bucket.count * std::size_t(comm_.size()));
            bucket.request = comm_.start_allgather(bucket.flat.data(), bucket.gathered.data(), bytes);
        } else {
            if (early) bucket.snapshot = bucket.flat;
            bucket.request = comm_.start_allreduce_sum(bucket.flat.data(), bucket.count, data_type_of<Scalar>());
        }
        bucket.launched = true;
    }

    void finish(std::size_t b) { comm_.wait(buckets_[b].request, what(b)); }

    /// Whether w * gradients differ from what bucket b sent.
    [[nodiscard]] bool gradients_changed(std::size_t b) const {
        const Bucket& bucket = buckets_[b];
        std::vector<Scalar> sent_copy;
        if constexpr (on_gpu) {
            if (in_device_memory()) {  // what was sent, read back
                const auto& d = options_.exact_order ? bucket.dflat : bucket.dsnapshot;
                sent_copy.resize(bucket.count);
                cuda::copy_elements(sent_copy.data(), d.data(), bucket.count, cuda::CopyKind::device_to_host,
                                    "dist::DataParallel: the resend check");
            }
        }
        const std::vector<Scalar>& sent =
            !sent_copy.empty() ? sent_copy : (options_.exact_order ? bucket.flat : bucket.snapshot);
        const auto w = Scalar(comm_.local_weight());
        std::size_t at = 0;
        for (auto slot : bucket.slots) {
            const Param& p = *params_[slot];
            std::vector<Scalar> host;
            const Scalar* g = p.grad.data();
            if constexpr (on_gpu) {
                host.resize(p.grad.size());
                cuda::copy_elements(host.data(), p.grad.data(), p.grad.size(), cuda::CopyKind::device_to_host,
                                    "dist::DataParallel: the resend check");
                g = host.data();
            }
            for (std::size_t k = 0; k < p.grad.size(); ++k) {
                const Scalar now = w * g[k];
                if (std::memcmp(&sent[at + k], &now, sizeof(Scalar)) != 0) return true;
            }
            at += p.grad.size();
        }
        return false;
    }

    /// gradients <- the sum over ranks (in rank order with exact_order).
    void unpack(std::size_t b) {
        Bucket& bucket = buckets_[b];
        if constexpr (on_gpu) {
            if (in_device_memory()) {
                if (options_.exact_order)
                    cuda::sum_slices(bucket.dgathered.data(), std::size_t(comm_.size()), bucket.count,
                                     bucket.dflat.data(), "dist::DataParallel: the rank-order sum");
            } else {
                host_rank_sum(bucket);
                cuda::copy_elements(bucket.dflat.data(), bucket.flat.data(), bucket.count, cuda::CopyKind::host_to_device,
                                    "dist::DataParallel: a reduced gradient bucket");
            }
            std::size_t at = 0;
            for (auto slot : bucket.slots) {
                Param& p = *params_[slot];
                cuda::copy_elements(p.grad.data(), bucket.dflat.data() + at, p.grad.size(),
                                    cuda::CopyKind::device_to_device, p.name());
                at += p.grad.size();
            }
            return;
        }
        host_rank_sum(bucket);
        std::size_t at = 0;
        for (auto slot : bucket.slots) {
            Param& p = *params_[slot];
            std::copy(bucket.flat.begin() + std::ptrdiff_t(at), bucket.flat.begin() + std::ptrdiff_t(at + p.grad.size()),
                      p.grad.data());
            at += p.grad.size();
        }
    }

    /// exact_order on the host: flat <- the gathered buckets summed in rank order.
    void host_rank_sum(Bucket& bucket) {
        if (options_.exact_order) {
            const std::size_t n = bucket.count, ranks = std::size_t(comm_.size());
            for (std::size_t k = 0; k < n; ++k) {
                Scalar s = bucket.gathered[k];
                for (std::size_t r = 1; r < ranks; ++r) s += bucket.gathered[r * n + k];
                bucket.flat[k] = s;
            }
        }
    }

    /// buffers <- base + sum over ranks of w_r (buffers_r - base); base <- buffers.
    void average_buffers() {
        const auto w = Scalar(comm_.local_weight());
        std::size_t at = 0;
        for (auto* b : buffers_) {
            for (std::size_t k = 0; k < b->size(); ++k) buffer_flat_[at + k] = w * ((*b)[k] - buffer_base_[at + k]);
            at += b->size();
        }
        comm_.allreduce_sum(buffer_flat_.data(), buffer_flat_.size(), "the all-reduce of running statistics");
        at = 0;
        for (auto* b : buffers_) {
            for (std::size_t k = 0; k < b->size(); ++k) {
                (*b)[k] = buffer_base_[at + k] + buffer_flat_[at + k];
                buffer_base_[at + k] = (*b)[k];
            }
            at += b->size();
        }
    }

    // GradientReadyObserver: a chain child's backward returned.
    void gradient_ready(const void* parameter) override {
        if (!armed_) return;
        const auto it = slot_of_.find(parameter);
        if (it == slot_of_.end()) return;
        const std::size_t slot = it->second;
        Param& p = *params_[slot];
        if (!p.wants_grad() || bucket_of_[slot] < 0 || stamp_[slot] == epoch_) return;
        stamp_[slot] = epoch_;
        Bucket& bucket = buckets_[std::size_t(bucket_of_[slot])];
        if (bucket.pending > 0) --bucket.pending;
        // Start complete buckets in index order only, so every rank issues the same sequence.
        while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0 &&
               !buckets_[next_launch_].launched && !layout_stale_cheap()) {
            launch(next_launch_, true);
            ++next_launch_;
        }
    }

    /// The bucket about to start still matches the trainable flags (only its own parameters are checked).
    [[nodiscard]] bool layout_stale_cheap() const {
        for (auto slot : buckets_[next_launch_].slots)
            if (!params_[slot]->trainable()) return true;
        return false;
    }

    Communicator& comm_;
    O& inner_;
    DataParallelOptions options_;
    std::vector<Param*> params_;
    std::unordered_map<const void*, std::size_t> slot_of_;
    std::vector<int> bucket_of_;
    std::vector<char> trainable_now_;
    std::vector<std::uint64_t> stamp_;
    std::uint64_t epoch_ = 1;
    std::vector<Bucket> buckets_;
    std::size_t next_launch_ = 0;
    ReductionStats last_{};
    std::vector<Tensor<Scalar>*> buffers_;  ///< sync_buffers: running statistics
    std::vector<Scalar> buffer_base_;       ///< their values after the last average
    std::vector<Scalar> buffer_flat_;
    bool reduced_ = false;
    bool armed_ = false;
};

// -- sharding the global batches --------------------------------------------------

/// Rows (samples) of a batch, and rows [begin, end) of it: for Batch<T> and
/// TokenBatch here; other batch types add overloads `batch_rows` and
/// `slice_rows` in their own namespace (found by argument-dependent lookup).
template <class T>
[[nodiscard]] std::size_t batch_rows(const Batch<T>& b) {
    return !b.labels.empty() ? b.labels.size() : (b.x.rank() ? b.x.dim(0) : 0);
}
template <class T>
[[nodiscard]] Batch<T> slice_rows(const Batch<T>& b, std::size_t begin, std::size_t end) {
    const std::size_t n = b.x.rank() ? b.x.dim(0) : 0;
    if (begin > end || end > batch_rows(b) || (n && end > n))
        throw ConfigError(detail::concat("dist::slice_rows: rows [", begin, ", ", end, ") of a batch of ",
                                         batch_rows(b), " rows"));
    Batch<T> out;
    if (n) {
        Shape s = b.x.shape();
        s[0] = end - begin;
        out.x = Tensor<T>(s);
        const std::size_t row = b.x.size() / n;
        std::copy(b.x.data() + begin * row, b.x.data() + end * row, out.x.data());
    }
    if (!b.labels.empty())
        out.labels.assign(b.labels.begin() + std::ptrdiff_t(begin), b.labels.begin() + std::ptrdiff_t(end));
    return out;
}
[[nodiscard]] inline std::size_t batch_rows(const TokenBatch& b) { return b.batch; }
[[nodiscard]] inline TokenBatch slice_rows(const TokenBatch& b, std::size_t begin, std::size_t end) {
    if (begin > end || end > b.batch)
        throw ConfigError(detail::concat("dist::slice_rows: rows [", begin, ", ", end, ") of a token batch of ",
                                         b.batch, " sequences"));
    TokenBatch out;
    out.batch = end - begin;
    out.tokens = b.tokens;
    const auto part = [&](const std::vector<std::int32_t>& v, std::vector<std::int32_t>& o) {
        if (v.empty()) return;
        o.assign(v.begin() + std::ptrdiff_t(begin * b.tokens), v.begin() + std::ptrdiff_t(end * b.tokens));
    };
    part(b.ids, out.ids);
    part(b.token_types, out.token_types);
    part(b.mask, out.mask);
    return out;
}

namespace detail {
template <class S>
struct ScalarOf {};
template <class S>
    requires requires { typename S::Scalar; }
struct ScalarOf<S> {
    using Scalar = typename S::Scalar;
};
}  // namespace detail

/// This rank's part of each global batch of `source`. Every rank must see the
/// same global batches (same data, same shuffling seed); rank r of P takes
/// rows [floor(r N / P), floor((r + 1) N / P)) of a batch of N rows, so the
/// shares differ by at most one row, and records its share on `comm` for the
/// gradient average. A batch with fewer rows than ranks is an error.
/// The global batch is built on every rank and sliced (simple and exact;
/// the data loading is repeated P times).
template <EpochSource S>
class ShardedSource : public detail::ScalarOf<S> {
public:
    using Global = std::remove_cvref_t<decltype(std::declval<S&>().batch(std::size_t{}))>;
    using Shard = decltype(slice_rows(std::declval<const Global&>(), std::size_t{}, std::size_t{}));

    ShardedSource(Communicator& comm, S& source) : comm_(comm), source_(source) {}

    void start_epoch(std::size_t epoch) {
        source_.start_epoch(epoch);
        epoch_ = epoch;
    }
    [[nodiscard]] std::size_t batches() const { return source_.batches(); }

    /// Rows of global batch i that belong to this rank; valid until the next call.
    const Shard& batch(std::size_t i) {
        auto&& global = source_.batch(i);
        const std::size_t n = batch_rows(global);
        const auto p = std::size_t(comm_.size()), r = std::size_t(comm_.rank());
        if (n < p)
            throw ConfigError(detail::concat("dist::ShardedSource: batch ", i, " of epoch ", epoch_, " has ", n,
                                             " rows, fewer than the ", p, " ranks"));
        const std::size_t begin = r * n / p, end = (r + 1) * n / p;
        shard_ = slice_rows(global, begin, end);
        comm_.set_local_share(end - begin, n);
        return shard_;
    }

private:
    Communicator& comm_;
    S& source_;
    std::size_t epoch_ = 0;
    Shard shard_{};
};

}  // namespace patchwork::dist
