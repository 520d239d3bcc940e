#!/usr/bin/env bash
# Installs the Debian packages patchwork builds with, if any is missing.
# Sourced by scripts/test, scripts/demo and scripts/bench.
patchwork_install_deps() {
    local pkgs=(meson ninja-build pkg-config g++ python3 libeigen3-dev xtensor-dev libxsimd-dev doctest-dev
                zlib1g-dev nlohmann-json3-dev libopenblas-dev libbenchmark-dev dataset-fashion-mnist
                python3-pip libutf8proc-dev wordnet-base clang libclang-rt-14-dev
                libopenmpi-dev openmpi-bin libdnnl-dev "$@")
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    echo "installing missing Debian packages: ${missing[*]}"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# nvcc lives outside PATH on CUDA machines; meson finds it only on PATH.
if [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"
fi
