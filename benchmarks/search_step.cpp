// Cost of architecture search against full fine-tuning, on the cascade of
// examples/cascade_search (enhancer -> recogniser -> understander, every block
// searched over {Frozen, Adapter<16>, FineTune}).
//
// Timed, each as a median over many steps, the kinds interleaved round by round:
//   finetune   one training step of the same cascade with every block FineTune
//              (the derived all-FineTune model: exactly Tune<Block, FineTune>)
//   weight     the search's weight step: zero_grad, forward of the mixed
//              operations, loss, backward, AdamW on the weights
//   alpha      the search's architecture step: zero_grad, forward, loss,
//              penalty, backward (no weight gradients: GradientRoles), clipping,
//              Adam on alpha
//   iteration  alpha + weight: one first-order DARTS iteration
// and the ratios to finetune. The target of the search issue is
// iteration / finetune <= 2.2.
//
// usage: search_step [--batches 64,256] [--steps N] [--rounds R]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "../examples/cascade_search/cascade_model.hpp"
#include "common.hpp"

namespace pw = patchwork;
namespace search = pw::search;
using namespace cascade;

namespace {

struct Pool {
    std::vector<pw::Batch<float>> batches;
    std::size_t next = 0;
    const pw::Batch<float>& get() { return batches[next++ % batches.size()]; }
};

Pool make_pool(std::size_t batch, std::size_t count, std::uint64_t seed) {
    Pool p;
    pw::Rng rng(seed);
    for (std::size_t i = 0; i < count; ++i) {
        pw::Batch<float> b{bench::random_tensor(pw::Shape{batch, kPixels}, seed + i), {}};
        for (std::size_t r = 0; r < batch; ++r) b.labels.push_back(int(rng.next() % kCoarse));
        p.batches.push_back(std::move(b));
    }
    return p;
}

double loss_and_backward(Model& m, const pw::Batch<float>& b) {
    const auto& y = m.forward(b.x);
    auto l = pw::cross_entropy(y, b.labels);
    m.backward(l.grad);
    return l.value;
}

template <class F>
double time_ms(F&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::size_t> batches = {64, 256};
    std::size_t steps = 30, rounds = 5;
    for (int i = 1; i < argc; ++i) {
        const std::string_view a = argv[i];
        if (i + 1 >= argc) {
            std::fprintf(stderr, "search_step: %s needs a value\n", argv[i]);
            return 2;
        }
        if (a == "--batches") {
            batches.clear();
            std::stringstream ss(argv[++i]);
            for (std::string item; std::getline(ss, item, ',');) batches.push_back(std::stoul(item));
        } else if (a == "--steps") steps = std::stoul(argv[++i]);
        else if (a == "--rounds") rounds = std::stoul(argv[++i]);
        else {
            std::fprintf(stderr, "search_step: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    const int threads = bench::configure_threads();
    std::printf("# %s\n", bench::build_info(threads).c_str());

    for (std::size_t batch : batches) {
        pw::manual_seed(1);
        Model ft = random_model();
        search::derive(ft, std::vector<std::size_t>(kModules, kFineTune));
        Model s = random_model();
        search::set_gates(s, {.mode = search::GateMode::gumbel, .tau = 1.0});
        pw::AdamW ft_opt{pw::trainable_parameters(ft), {.lr = 1e-4}};
        pw::AdamW w_opt{search::weight_parameters(s), {.lr = 1e-4}};
        pw::Adam a_opt{search::architecture_parameters(s), {.lr = 3e-4, .beta1 = 0.5, .beta2 = 0.999, .weight_decay = 1e-3}};
        const search::Penalty pen{.lambda = 0.5};
        Pool train = make_pool(batch, 8, 100), val = make_pool(batch, 8, 200);

        const auto ft_step = [&] {
            pw::zero_grad(ft);
            loss_and_backward(ft, train.get());
            ft_opt.step();
        };
        const auto weight_step = [&] {
            pw::zero_grad(s);
            loss_and_backward(s, train.get());
            w_opt.step();
        };
        const auto alpha_step = [&] {
            pw::zero_grad(s);
            {
                const pw::GradientRoles only_alpha(search::architecture_only);  // as search::run does
                loss_and_backward(s, val.get());
                search::penalty(s, pen, 0);
            }
            pw::clip_grad_norm(search::architecture_parameters(s), 5.0);
            a_opt.step();
        };
        std::vector<double> t_ft, t_w, t_a, t_it;
        for (std::size_t i = 0; i < 3; ++i) {  // warm-up: buffers allocated, caches filled
            ft_step();
            weight_step();
            alpha_step();
        }
        for (std::size_t r = 0; r < rounds; ++r) {
            for (std::size_t i = 0; i < steps; ++i) t_ft.push_back(time_ms(ft_step));
            for (std::size_t i = 0; i < steps; ++i) t_w.push_back(time_ms(weight_step));
            for (std::size_t i = 0; i < steps; ++i) t_a.push_back(time_ms(alpha_step));
            for (std::size_t i = 0; i < steps; ++i) t_it.push_back(time_ms([&] {
                alpha_step();
                weight_step();
            }));
        }
        const double f = bench::median(t_ft), w = bench::median(t_w), a = bench::median(t_a), it = bench::median(t_it);
        std::printf("SEARCH batch=%zu finetune_ms=%.4f weight_ms=%.4f alpha_ms=%.4f iteration_ms=%.4f "
                    "weight_ratio=%.3f alpha_ratio=%.3f iteration_ratio=%.3f target_iteration_ratio=2.2 steps=%zu\n",
                    batch, f, w, a, it, w / f, a / f, it / f, t_ft.size());
        // With SearchOptions::alpha_every = k, the cost per weight step is weight + alpha / k.
        for (std::size_t k : {2, 4})
            std::printf("SEARCH batch=%zu alpha_every=%zu amortised_ratio=%.3f\n", batch, k, (w + a / double(k)) / f);
    }
    return 0;
}
