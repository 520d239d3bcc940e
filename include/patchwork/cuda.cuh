#pragma once
// Everything of patchwork with the CUDA backend, for nvcc-compiled translation
// units: the CPU library, device tensors and contexts, and the kernels behind
// the Cuda modules (Linear, activations, LayerNorm, Conv2d, DepthwiseConv2d,
// BatchNorm2d, the pools, the Adapter, ScaleShift and LoRA policies,
// cross-entropy, SGD, Adam, AdamW) and the fused kernels of
// patchwork/kernels/.
//
//     using Mlp = pw::Sequential<pw::BasicLinear<float, pw::Cuda>, pw::BasicRelu<float, pw::Cuda>,
//                                pw::BasicLinear<float, pw::Cuda>>;
#include "patchwork/patchwork.hpp"

#include "patchwork/cuda/context.hpp"
#include "patchwork/cuda/cuda_error.hpp"
#include "patchwork/cuda/device_tensor.hpp"
#include "patchwork/kernels/adapter.cuh"
#include "patchwork/kernels/attention.cuh"
#include "patchwork/kernels/batchnorm.cuh"
#include "patchwork/kernels/common.cuh"
#include "patchwork/kernels/conv.cuh"
#include "patchwork/kernels/mix.cuh"
#include "patchwork/kernels/multitask.cuh"
#include "patchwork/kernels/pooling.cuh"
#include "patchwork/kernels/ops.cuh"
#include "patchwork/kernels/module_ops.cuh"
#include "patchwork/kernels/scale_shift.cuh"
