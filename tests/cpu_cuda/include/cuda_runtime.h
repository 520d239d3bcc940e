#pragma once
// The project's CPU execution of its CUDA code (tests only): see cpu_cuda/runtime.hpp.
#include "cpu_cuda/runtime.hpp"
