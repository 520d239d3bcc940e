// The device-module and policy tests of tests/gpu/ on the project's CPU execution of its CUDA code.
#include "test_device.cu"
#include "test_device_policies.cu"
