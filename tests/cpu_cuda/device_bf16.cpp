// bf16 storage through the device modules and optimisers (tests/gpu/test_device_bf16.cu)
// on the project's CPU execution of its CUDA code.
#include "test_device_bf16.cu"
