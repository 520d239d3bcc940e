// The device-module, policy and search tests of tests/gpu/ on the project's CPU
// execution of its CUDA code, in one translation unit (one parse of the library).
#include "test_device.cu"
#include "test_device_policies.cu"
#include "test_device_search.cu"
#include "test_device_multitask.cu"
