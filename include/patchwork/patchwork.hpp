#pragma once
// patchwork: parameter-efficient, multi-task adaptation of pre-trained models.
// One include for everything on the CPU, except the xtensor view of a tensor
// (core/xtensor.hpp: pw::xt(t)), whose headers are slow to compile; include it
// where you use it. Including the individual headers keeps compile times down.

#include "patchwork/core/error.hpp"
#include "patchwork/core/module.hpp"
#include "patchwork/core/parameter.hpp"
#include "patchwork/core/random.hpp"
#include "patchwork/core/report.hpp"
#include "patchwork/core/shape.hpp"
#include "patchwork/core/tensor.hpp"

#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/attention.hpp"
#include "patchwork/layers/batch_norm.hpp"
#include "patchwork/layers/conv2d.hpp"
#include "patchwork/layers/dropout.hpp"
#include "patchwork/layers/embedding.hpp"
#include "patchwork/layers/identity.hpp"
#include "patchwork/layers/layer_norm.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/layers/pool.hpp"
#include "patchwork/layers/reshape.hpp"

#include "patchwork/compose/cascade.hpp"
#include "patchwork/compose/repeat.hpp"
#include "patchwork/compose/sequential.hpp"

#include "patchwork/multitask/multitask.hpp"
#include "patchwork/multitask/train.hpp"

#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/bias_only.hpp"
#include "patchwork/policies/depthwise_patch.hpp"
#include "patchwork/policies/fine_tune.hpp"
#include "patchwork/policies/frozen.hpp"
#include "patchwork/policies/lora.hpp"
#include "patchwork/policies/norm_patch.hpp"
#include "patchwork/policies/over_param.hpp"
#include "patchwork/policies/scale_shift.hpp"
#include "patchwork/policies/tune.hpp"

#include "patchwork/search/gates.hpp"
#include "patchwork/search/derive.hpp"
#include "patchwork/search/loop.hpp"
#include "patchwork/search/search_module.hpp"
#include "patchwork/search/penalty.hpp"
#include "patchwork/train/batch.hpp"
#include "patchwork/train/clip.hpp"
#include "patchwork/train/loss.hpp"
#include "patchwork/train/metrics.hpp"
#include "patchwork/train/optimizer.hpp"
#include "patchwork/train/progress.hpp"
#include "patchwork/train/schedule.hpp"
#include "patchwork/train/step.hpp"
#include "patchwork/train/trainer.hpp"

#include "patchwork/io/dataset.hpp"
#include "patchwork/io/idx.hpp"
#include "patchwork/io/npy.hpp"
#include "patchwork/io/parameter_files.hpp"
#include "patchwork/io/wordnet.hpp"

#include "patchwork/text/wordpiece.hpp"

// Data parallelism (the MPI transport, patchwork/dist/mpi.hpp, needs <mpi.h> and is included by hand).
#include "patchwork/dist/communicator.hpp"
#include "patchwork/dist/data_parallel.hpp"

#include "patchwork/transformer/bert.hpp"
#include "patchwork/transformer/hf_checkpoint.hpp"
#include "patchwork/transformer/peft.hpp"
