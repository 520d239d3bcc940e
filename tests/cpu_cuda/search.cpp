// The architecture-search tests of tests/gpu/ on the project's CPU execution of its CUDA code.
#include "test_device_search.cu"
