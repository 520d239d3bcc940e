// patchwork::dist in one process: the LocalCommunicator, DataParallel's
// bookkeeping, sharding, and the errors. The multi-process behaviour (MPI,
// 2 and 3 ranks) is checked by tests/dist under mpirun.
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include "patchwork/compose/sequential.hpp"
#include "patchwork/dist/communicator.hpp"
#include "patchwork/dist/data_parallel.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/batch_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/tune.hpp"
#include "patchwork/train/trainer.hpp"

namespace pw = patchwork;
namespace dist = patchwork::dist;

namespace {
using L = pw::BasicLinear<double>;
using Net = pw::Sequential<pw::Tune<L, pw::Adapter<2>>, pw::BasicRelu<double>, pw::Tune<L, pw::FineTune>>;

Net make_net(std::uint64_t seed) {
    pw::manual_seed(seed);
    return Net{pw::Tune<L, pw::Adapter<2>>(5, 6), pw::BasicRelu<double>{}, pw::Tune<L, pw::FineTune>(6, 3)};
}

pw::VectorSource<double> make_data(std::size_t batches, std::size_t rows) {
    pw::Rng rng(3);
    pw::VectorSource<double> src;
    for (std::size_t b = 0; b < batches; ++b) {
        pw::Batch<double> batch{pw::Tensor<double>(pw::Shape{rows, 5}), {}};
        pw::init::normal(batch.x, rng, 0, 1);
        for (std::size_t r = 0; r < rows; ++r) batch.labels.push_back(int(r % 3));
        src.push_back(std::move(batch));
    }
    return src;
}

template <class M>
std::vector<double> flat_values(M& m) {
    std::vector<double> out;
    m.visit([&](auto& p) { out.insert(out.end(), p.value.begin(), p.value.end()); });
    return out;
}
}  // namespace

TEST_CASE("dist: one process through DataParallel trains exactly as without it") {
    auto a = make_net(1), b = make_net(1);
    auto data = make_data(4, 7);
    pw::BasicAdamW<double> plain(pw::trainable_parameters(a), {.lr = 1e-2});
    pw::fit(a, plain, data, {.epochs = 2, .clip_norm = 0.5, .verbose = false});

    dist::LocalCommunicator comm;
    pw::BasicAdamW<double> inner(pw::trainable_parameters(b), {.lr = 1e-2});
    dist::DataParallel opt(comm, inner, {.bucket_bytes = 100});
    dist::ShardedSource shard(comm, data);
    pw::fit(b, opt, shard, {.epochs = 2, .clip_norm = 0.5, .verbose = false});
    CHECK(flat_values(a) == flat_values(b));  // weight 1, sum of one: bit-identical
    // Buckets of about 100 bytes over the trainable parameters, in reverse order.
    const auto& r = opt.last_reduction();
    CHECK(r.steps == 8);
    CHECK(r.bytes == pw::trainable_count(b) * sizeof(double));
    CHECK(r.buckets >= 3);
    CHECK(r.early == 0);  // a single rank never sends early
    CHECK(comm.stats().reductions == 8 * r.buckets);
    CHECK(comm.stats().bytes_reduced == 8 * r.bytes);
}

TEST_CASE("dist: the trainable set may change between steps; buckets follow it") {
    auto net = make_net(2);
    dist::LocalCommunicator comm;
    pw::BasicSGD<double> inner(pw::trainable_parameters(net), {.lr = 0.1});
    dist::DataParallel opt(comm, inner);
    const std::size_t all = opt.last_reduction().bytes;
    net.visit([](auto& p) {
        if (p.name() == "linear2.bias") p.set_trainable(false);
    });
    auto data = make_data(1, 4);
    pw::fit(net, opt, data, {.epochs = 1, .verbose = false});
    CHECK(opt.last_reduction().bytes == all - 3 * sizeof(double));
}

TEST_CASE("dist: state checksums see every value and BatchNorm buffer") {
    auto a = make_net(4), b = make_net(4);
    CHECK(dist::state_checksum(a) == dist::state_checksum(b));
    b.visit([](auto& p) {
        if (p.name() == "linear2.bias") p.value[1] += 1e-12;
    });
    CHECK(dist::state_checksum(a) != dist::state_checksum(b));
    pw::BatchNorm2d bn1(3), bn2(3);
    CHECK(dist::state_checksum(bn1) == dist::state_checksum(bn2));
    bn2.running_var[2] = 2;
    CHECK(dist::state_checksum(bn1) != dist::state_checksum(bn2));
    dist::LocalCommunicator comm;
    dist::synchronize_model(comm, bn2);  // one rank: nothing to disagree with
    CHECK(bn2.running_var[2] == 2.0f);
}

TEST_CASE("dist: sharding splits rows evenly, labels with them, and records the share") {
    pw::Batch<double> b{pw::Tensor<double>(pw::Shape{5, 2}), {0, 1, 2, 0, 1}};
    for (std::size_t i = 0; i < 10; ++i) b.x[i] = double(i);
    const auto part = dist::slice_rows(b, 2, 4);
    CHECK(part.x.shape() == pw::Shape{2, 2});
    CHECK(part.x[0] == 4.0);
    CHECK(part.x[3] == 7.0);
    CHECK(part.labels == std::vector<int>{2, 0});
    CHECK_THROWS_AS((void)dist::slice_rows(b, 3, 6), pw::ConfigError);

    pw::TokenBatch t;
    t.batch = 3;
    t.tokens = 2;
    t.ids = {1, 2, 3, 4, 5, 6};
    t.mask = {1, 1, 1, 0, 1, 1};
    const auto tp = dist::slice_rows(t, 1, 3);
    CHECK(tp.batch == 2);
    CHECK(tp.ids == std::vector<std::int32_t>{3, 4, 5, 6});
    CHECK(tp.mask == std::vector<std::int32_t>{1, 0, 1, 1});
    CHECK(tp.token_types.empty());

    dist::LocalCommunicator comm;
    CHECK(comm.local_weight() == 1.0);
    comm.set_local_share(2, 8);
    CHECK(comm.local_weight() == 0.25);
    comm.clear_local_share();
    CHECK(comm.local_weight() == 1.0);
}

TEST_CASE("dist: bad input is a clear error") {
    dist::LocalCommunicator comm;
    CHECK_THROWS_WITH_AS(comm.set_timeout(0), doctest::Contains("positive"), pw::ConfigError);
    CHECK_THROWS_WITH_AS(comm.set_local_share(3, 2), doctest::Contains("3 of 2"), pw::ConfigError);
    CHECK_THROWS_WITH_AS(comm.broadcast(nullptr, 0, 1), doctest::Contains("root rank 1"), pw::ConfigError);

    auto net = make_net(5);
    pw::BasicSGD<double> inner(pw::trainable_parameters(net), {.lr = 0.1});
    CHECK_THROWS_WITH_AS(dist::DataParallel(comm, inner, {.bucket_bytes = 0}), doctest::Contains("bucket_bytes"),
                         pw::ConfigError);
    auto params = pw::trainable_parameters(net);
    params.push_back(params.front());
    CHECK_THROWS_WITH_AS(dist::DataParallel(comm, inner, {}, params), doctest::Contains("listed twice"),
                         pw::ConfigError);
    // A parameter made trainable after the optimiser was built has no gradient in the step.
    dist::DataParallel opt(comm, inner);
    net.visit([](auto& p) { p.zero_grad(); });
    net.visit([](auto& p) {
        if (p.name() == "linear0.weight") p.set_trainable(true);
    });
    CHECK_NOTHROW(opt.reduce_gradients());  // not one of the optimiser's parameters: ignored

    // on_root: a failure on the root reaches the caller as a DistError with its message.
    CHECK_THROWS_WITH_AS(dist::on_root(comm, [] { throw pw::IoError("disk full at /x"); }),
                         doctest::Contains("disk full at /x"), dist::DistError);
}
