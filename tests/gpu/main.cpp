// Entry point of the CUDA test programs: runs doctest when a CUDA device is
// present, and otherwise exits with 77 (meson's "skipped") after saying so.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cstdio>

#include <doctest/doctest.h>

#include "patchwork/cuda/cuda_error.hpp"

int main(int argc, char** argv) {
    if (patchwork::cuda::device_count() == 0) {
        std::printf("%s: no CUDA device is available; skipping every test of this program (exit 77)\n",
                    argc > 0 ? argv[0] : "gpu test");
        return 77;
    }
    doctest::Context ctx;
    ctx.applyCommandLine(argc, argv);
    return ctx.run();
}
