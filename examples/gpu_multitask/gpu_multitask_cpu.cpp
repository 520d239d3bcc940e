// examples/gpu_multitask compiled for the project's CPU execution of its CUDA code (its smoke run in CI).
#include "gpu_multitask.cu"
