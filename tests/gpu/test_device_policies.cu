// The Adapter, ScaleShift and LoRA policies on the device (the fused kernels
// behind them) against the same policies on the CPU: forward, input gradient
// and every parameter gradient, fp32 within 1e-5 and double within 1e-12
// (2-norm relative error), outputs poisoned before each run.
#include "device_compare.hpp"

using namespace device_test;

namespace {
/// Every parameter of a CPU module drawn at random (adapters and LoRA start as the identity otherwise).
template <class M>
void randomize(M& m, std::mt19937& rng) {
    m.visit([&](auto& p) { p.value = random_tensor<typename M::Scalar>(p.value.shape(), rng, 0.5); });
}
}  // namespace

TEST_CASE_TEMPLATE("Adapter, ScaleShift and LoRA policies on the device equal the CPU", T, float, double) {
    std::mt19937 rng(9);
    const std::vector<std::array<std::size_t, 3>> sizes =
        kCpu ? std::vector<std::array<std::size_t, 3>>{{1, 3, 2}, {7, 33, 40}, {40, 100, 65}}
             : std::vector<std::array<std::size_t, 3>>{{1, 3, 2}, {7, 33, 40}, {129, 100, 65}};
    for (auto [n, in, out] : sizes) {
        {
            pw::Tune<pw::BasicLinear<T>, pw::Adapter<8>> cpu(in, out);
            pw::Tune<pw::BasicLinear<T, Cuda>, pw::Adapter<8>> dev(in, out);
            randomize(cpu, rng);
            compare_module(cpu, dev, Shape{n, in}, rng);
        }
        {
            using Act = pw::AdapterActivation;
            pw::Tune<pw::BasicLinear<T>, pw::FineTune, pw::Adapter<70, Act::gelu>> cpu(in, out);
            pw::Tune<pw::BasicLinear<T, Cuda>, pw::FineTune, pw::Adapter<70, Act::gelu>> dev(in, out);
            randomize(cpu, rng);
            compare_module(cpu, dev, Shape{n, in}, rng);
        }
        {
            pw::Tune<pw::BasicLinear<T>, pw::BiasOnly, pw::ScaleShift> cpu(in, out);
            pw::Tune<pw::BasicLinear<T, Cuda>, pw::BiasOnly, pw::ScaleShift> dev(in, out);
            randomize(cpu, rng);
            compare_module(cpu, dev, Shape{n, in}, rng);
        }
        {
            pw::Tune<pw::BasicLinear<T>, pw::LoRA<4, 8>> cpu(in, out);
            pw::Tune<pw::BasicLinear<T, Cuda>, pw::LoRA<4, 8>> dev(in, out);
            randomize(cpu, rng);
            compare_module(cpu, dev, Shape{n, in}, rng);
        }
    }
    // merge() / unmerge() on the device: the merged Linear gives the same output.
    pw::Tune<pw::BasicLinear<T>, pw::LoRA<4, 8>> cpu(20, 12);
    pw::Tune<pw::BasicLinear<T, Cuda>, pw::LoRA<4, 8>> dev(20, 12);
    randomize(cpu, rng);
    copy_parameters(cpu, dev);
    const Tensor<T> x = random_tensor<T>(Shape{5, 20}, rng);
    const Tensor<T, Cuda> xd(x);
    const Tensor<T> y = cpu.forward(x);
    dev.inner().merge();
    CHECK(dev.inner().merged());
    check_close(y, dev.forward(xd), "merged LoRA forward");
    dev.inner().unmerge();
    CHECK(!dev.inner().merged());
    check_close(y, dev.forward(xd), "unmerged LoRA forward");
    // Unmerging restores the pre-trained weight (up to rounding).
    check_close(cpu.inner().inner().weight.value, dev.inner().inner().weight.value, "weight after unmerge");
}

