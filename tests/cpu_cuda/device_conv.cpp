// The image layers' device tests of tests/gpu/ (Conv2d, DepthwiseConv2d,
// BatchNorm2d, the pools, Flatten, Unflatten) on the project's CPU execution
// of its CUDA code.
#include "test_device_conv.cu"
