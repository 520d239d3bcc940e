// examples/gpu_transfer compiled for the project's CPU execution of its CUDA code (its smoke run in CI).
#include "gpu_transfer.cu"
