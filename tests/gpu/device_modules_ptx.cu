// The device-module tests in one translation unit, compiled to PTX only where
// no GPU is present (tests/gpu/meson.build, gpu_fast_compile): one parse of
// the library for all of them. Their host side runs in tests/cpu_cuda.
#include "test_device.cu"
#include "test_device_policies.cu"
#include "test_device_search.cu"
#include "test_device_conv.cu"
#include "test_device_multitask.cu"
#include "test_device_transformer.cu"
#include "test_device_bf16.cu"
