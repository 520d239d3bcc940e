#pragma once
// The MobileNet-style backbone of examples/multitask_patches and its four
// Fashion-MNIST tasks, for any element type and device: the CPU example and
// examples/gpu_multitask (Device = Cuda) build the same model.
//
//   Unflatten(28x28x1)  Conv 3x3/2 (1->32) BN ReLU
//   [DW 3x3 (32) BN ReLU  PW 1x1 (32->64) BN ReLU]
//   [DW 3x3/2 (64) BN ReLU  PW 1x1 (64->128) BN ReLU]  GlobalAvgPool -> 128 features
#include <cstddef>

#include <patchwork/patchwork.hpp>

namespace mobilenet {

namespace pw = patchwork;

template <class T = float, class D = pw::Cpu>
using Body = pw::Sequential<pw::BasicUnflatten<T, D>, pw::BasicConv2d<T, D>, pw::BasicBatchNorm2d<T, D>,
                            pw::BasicRelu<T, D>,  //
                            pw::BasicDepthwiseConv2d<T, D>, pw::BasicBatchNorm2d<T, D>, pw::BasicRelu<T, D>,
                            pw::BasicConv2d<T, D>, pw::BasicBatchNorm2d<T, D>, pw::BasicRelu<T, D>,  //
                            pw::BasicDepthwiseConv2d<T, D>, pw::BasicBatchNorm2d<T, D>, pw::BasicRelu<T, D>,
                            pw::BasicConv2d<T, D>, pw::BasicBatchNorm2d<T, D>, pw::BasicRelu<T, D>,  //
                            pw::BasicGlobalAvgPool<T, D>>;

constexpr std::size_t kFeatures = 128;  ///< the backbone's output width
constexpr std::size_t kTasks = 4;

/// A freshly initialised backbone (the global generator, pw::manual_seed).
template <class T = float, class D = pw::Cpu>
Body<T, D> make_body() {
    using Conv = pw::BasicConv2d<T, D>;
    using Dw = pw::BasicDepthwiseConv2d<T, D>;
    using Bn = pw::BasicBatchNorm2d<T, D>;
    using Relu = pw::BasicRelu<T, D>;
    return Body<T, D>(pw::BasicUnflatten<T, D>(28, 28, 1), Conv(1, 32, 3, {.stride = 2, .padding = 1}), Bn(32),
                      Relu{}, Dw(32, 3, {.padding = 1}), Bn(32), Relu{}, Conv(32, 64, 1), Bn(64), Relu{},
                      Dw(64, 3, {.stride = 2, .padding = 1}), Bn(64), Relu{}, Conv(64, kFeatures, 1), Bn(kFeatures),
                      Relu{}, pw::BasicGlobalAvgPool<T, D>{});
}

/// Class count of each task.
inline constexpr std::size_t kClasses[kTasks] = {10, 4, 10, 3};

/// Task `task`'s version of a Fashion-MNIST set:
///   0  the 10 classes
///   1  a coarse grouping: tops {0,2,4,6}, trousers and dresses {1,3}, footwear {5,7,9}, bags {8}
///   2  the 10 classes on inverted images (1 - x)
///   3  classes 7, 8, 9 only (relabelled 0-2): never seen in pre-training on classes 0-6
inline pw::Dataset<float> make_task(const pw::Dataset<float>& ds, int task) {
    static const int coarse[10] = {0, 1, 0, 1, 0, 2, 0, 2, 3, 2};
    switch (task) {
        case 0: return ds;
        case 1: {
            auto out = ds;
            for (auto& l : out.labels) l = coarse[l];
            return out;
        }
        case 2: {
            auto out = ds;
            for (auto& v : out.images) v = 1.0f - v;
            return out;
        }
        default: return pw::filter_classes(ds, {7, 8, 9}, true);
    }
}

}  // namespace mobilenet
