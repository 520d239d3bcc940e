// The kernel tests of tests/gpu/ on the project's CPU execution of its CUDA code.
#include "test_kernels.cu"
