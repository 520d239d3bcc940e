// libFuzzer target: parse arbitrary bytes as a safetensors file.
// A malformed input must end in patchwork::IoError and nothing else (no crash,
// no sanitizer report, no other exception); a valid one must read back.
#include <cstddef>
#include <cstdint>
#include <span>

#include "patchwork/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    namespace pw = patchwork;
    const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
    try {
        const pw::SafetensorsFile file = pw::parse_safetensors(bytes, "<fuzz input>");
        // Touch every value that patchwork can convert, as a loader would.
        for (const pw::SafetensorsEntry& e : file.entries()) {
            if (e.dtype != "F32" && e.dtype != "F64") continue;
            if (e.shape.size() > pw::Shape::max_rank) continue;
            const auto t = file.tensor<double>(e.name);
            if (t.size() != e.numel()) __builtin_trap();
        }
        (void)file.metadata();
    } catch (const pw::IoError&) {
        // Expected for malformed input.
    }
    return 0;
}
