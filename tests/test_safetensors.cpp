#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "patchwork/compose/sequential.hpp"
#include "patchwork/layers/activation.hpp"
#include "patchwork/layers/linear.hpp"
#include "patchwork/policies/adapter.hpp"
#include "patchwork/policies/tune.hpp"
#include "temp_dir.hpp"
#include "patchwork/io/parameter_files.hpp"
#include "patchwork/io/safetensors.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;

namespace {

struct TempDir : patchwork::testing::TempDir {
    TempDir() : patchwork::testing::TempDir("patchwork_test_safetensors") {}
};

using Bytes = std::vector<std::uint8_t>;

void write_bytes(const fs::path& path, const Bytes& bytes) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    REQUIRE(f.good());
}

Bytes read_bytes(const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void put_u64(Bytes& out, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) out.push_back(std::uint8_t(v >> (8 * i)));
}

/// A safetensors file built byte by byte, independently of the writer under
/// test: the length (the header's own by default), the header, the data.
Bytes st_file(const std::string& header, const Bytes& data, std::uint64_t claimed_len = ~std::uint64_t(0)) {
    Bytes out;
    put_u64(out, claimed_len == ~std::uint64_t(0) ? header.size() : claimed_len);
    out.insert(out.end(), header.begin(), header.end());
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

Bytes f32_bytes(std::initializer_list<float> values) {
    Bytes out;
    for (float v : values) {
        std::uint32_t u;
        std::memcpy(&u, &v, 4);
        for (int i = 0; i < 4; ++i) out.push_back(std::uint8_t(u >> (8 * i)));
    }
    return out;
}

template <class T>
bool same_values(const pw::Tensor<T>& a, const pw::Tensor<T>& b) {
    return a.shape() == b.shape() && std::equal(a.begin(), a.end(), b.begin());
}

}  // namespace

TEST_CASE("safetensors: float and double tensors round-trip exactly, with metadata") {
    TempDir dir;
    pw::Tensor<float> a(pw::Shape{2, 3}, {1.5f, -2.f, 0.1f, std::numeric_limits<float>::denorm_min(),
                                           std::numeric_limits<float>::infinity(), -0.f});
    pw::Tensor<double> b(pw::Shape{3}, {1.0 / 3.0, -1e300, 42.0});
    pw::Tensor<float> scalar(pw::Shape{}, {7.25f});
    pw::Tensor<double> empty(pw::Shape{0, 4});
    pw::Tensor<float> four(pw::Shape{2, 1, 3, 2});
    for (std::size_t i = 0; i < four.size(); ++i) four[i] = float(i) - 5.5f;

    pw::SafetensorsWriter w;
    w.add("layer.a", a);
    w.add("b", b);
    w.add("scalar", scalar);
    w.add("empty", empty);
    w.add("four", four);
    w.add_metadata("hello", "world");
    const auto path = dir / "t.safetensors";
    w.save(path);

    const Bytes file = read_bytes(path);
    const auto mem = w.serialize();
    REQUIRE(file.size() == mem.size());
    CHECK(std::memcmp(file.data(), mem.data(), file.size()) == 0);
    // Header padded with spaces so the data starts at a multiple of 8.
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | file[std::size_t(i)];
    CHECK(n % 8 == 0);
    CHECK(file[8] == '{');
    CHECK(file[8 + n - 1] != 0);

    const pw::SafetensorsFile f = pw::read_safetensors(path);
    CHECK(f.size() == 5);
    CHECK(f.metadata().at("hello") == "world");
    CHECK(f.source() == path.string());
    CHECK(same_values(f.tensor<float>("layer.a"), a));
    CHECK(std::signbit(f.tensor<float>("layer.a")[5]));
    CHECK(same_values(f.tensor<double>("b"), b));
    CHECK(same_values(f.tensor<float>("scalar"), scalar));
    CHECK(f.tensor<float>("scalar").rank() == 0);
    CHECK(same_values(f.tensor<double>("empty"), empty));
    CHECK(same_values(f.tensor<float>("four"), four));
    CHECK(f.find("b")->dtype == "F64");
    CHECK(f.find("layer.a")->dtype == "F32");
    // Entries come sorted by name; in the file, wider elements come first.
    std::vector<std::string> names;
    for (const auto& e : f.entries()) names.push_back(e.name);
    CHECK(names == std::vector<std::string>{"b", "empty", "four", "layer.a", "scalar"});
    CHECK(f.find("b")->begin == 0);
    CHECK(f.find("b")->begin % 8 == 0);

    // Reading converts between F32 and F64 when the types differ.
    const auto a64 = f.tensor<double>("layer.a");
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(a64[i] == double(a[i]));
    const auto b32 = f.tensor<float>("b");
    for (std::size_t i = 0; i < b.size(); ++i) CHECK(b32[i] == float(b[i]));

    // An empty file set round-trips too.
    pw::SafetensorsWriter none;
    none.save(dir / "none.safetensors");
    CHECK(pw::read_safetensors(dir / "none.safetensors").size() == 0);

    CHECK_IO_ERROR(f.tensor<float>("nope"), path, "missing");
}

TEST_CASE("safetensors: BF16 tensors read exactly, write as BF16, and F32 rounds to nearest even into bf16") {
    TempDir dir;
    // BF16 is the upper half of the float32 bit pattern, little-endian: 0x3F80 = 1, 0xC049 = -3.140625,
    // 0x0001 = 2^-133 (the smallest subnormal), 0x7F80 = +inf, 0x8000 = -0.
    const Bytes bits{0x80, 0x3F, 0x49, 0xC0, 0x01, 0x00, 0x80, 0x7F, 0x00, 0x80, 0x00, 0x00};
    const auto p = dir / "bf16.safetensors";
    write_bytes(p, st_file(R"({"h":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}})", bits));
    const pw::SafetensorsFile f = pw::read_safetensors(p);
    const std::vector<float> want{1.0f, -3.140625f, std::ldexp(1.0f, -133), std::numeric_limits<float>::infinity(),
                                  -0.0f, 0.0f};
    const auto t32 = f.tensor<float>("h");
    const auto t64 = f.tensor<double>("h");
    const auto t16 = f.tensor<pw::bf16>("h");
    CHECK(t32.shape() == pw::Shape{2, 3});
    for (std::size_t i = 0; i < want.size(); ++i) {
        CHECK(t32[i] == want[i]);
        CHECK(t64[i] == double(want[i]));
        CHECK(float(t16[i]) == want[i]);
    }
    CHECK(std::signbit(t32[4]));

    // A bf16 tensor is written as BF16: the same bytes back.
    pw::SafetensorsWriter w;
    const pw::Tensor<float> half(pw::Shape{1}, {0.5f});  // the writer keeps references
    w.add("h", t16);
    w.add("f", half);
    const auto q = dir / "written.safetensors";
    w.save(q);
    const pw::SafetensorsFile g = pw::read_safetensors(q);
    CHECK(g.find("h")->dtype == "BF16");
    CHECK(g.find("f")->begin == 0);  // wider elements first
    const auto data = g.bytes(*g.find("h"));
    REQUIRE(data.size() == bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i) CHECK(std::to_integer<unsigned>(data[i]) == bits[i]);

    // F32 into bf16: round to nearest, ties to even (1 + 2^-8 -> 1, 1 + 3 2^-8 -> 1 + 2^-6, 1 + 2^-8 + 2^-12 up).
    const auto r = dir / "f32.safetensors";
    write_bytes(r, st_file(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})",
                           f32_bytes({1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-12f})));
    const auto rounded = pw::read_safetensors(r).tensor<pw::bf16>("x");
    CHECK(float(rounded[0]) == 1.0f);
    CHECK(float(rounded[1]) == 1.0f + 0x1p-6f);
    CHECK(float(rounded[2]) == 1.0f + 0x1p-7f);

    // A float model loads BF16 parameter files (a bf16 checkpoint or adapter) exactly.
    pw::Linear lin(3, 2);
    pw::SafetensorsWriter pf;
    const pw::Tensor<pw::bf16> weight = pw::cast<pw::bf16>(pw::Tensor<float>(pw::Shape{2, 3}, {1, -2, 0.5f, 0.25f, 3, -1}));
    const pw::Tensor<pw::bf16> bias = pw::cast<pw::bf16>(pw::Tensor<float>(pw::Shape{2}, {-3.140625f, 7}));
    pf.add("weight", weight);
    pf.add("bias", bias);
    pf.save(dir / "lin.safetensors");
    pw::load_parameters(lin, dir / "lin.safetensors");
    CHECK(lin.weight.value(0, 1) == -2.0f);
    CHECK(lin.weight.value(1, 2) == -1.0f);
    CHECK(lin.bias.value[0] == -3.140625f);
}

TEST_CASE("safetensors: reads the fixture written by Python's safetensors package") {
    const char* data_dir = std::getenv("PATCHWORK_TEST_DATA");
    REQUIRE_MESSAGE(data_dir != nullptr, "PATCHWORK_TEST_DATA must point at tests/data (meson test sets it)");
    const pw::SafetensorsFile f = pw::read_safetensors(fs::path(data_dir) / "fixture.safetensors");
    CHECK(f.size() == 7);
    CHECK(f.metadata().at("source") == "make_safetensors_fixture.py");
    CHECK(f.metadata().at("note") == "patchwork test fixture");

    const auto matrix = f.tensor<float>("f32.matrix");
    REQUIRE(matrix.shape() == pw::Shape{2, 3});
    for (std::size_t i = 0; i < 6; ++i) CHECK(matrix[i] == float(i) * 0.25f - 1.f);

    const auto cube = f.tensor<float>("f32.cube");
    REQUIRE(cube.shape() == pw::Shape{2, 2, 2});
    for (std::size_t i = 0; i < 8; ++i) CHECK(cube[i] == (i % 2 ? -1.f : 1.f) * (float(i) + 0.5f));

    const auto tenth = f.tensor<float>("f32.tenth");
    REQUIRE(tenth.shape() == pw::Shape{3});
    CHECK(tenth[0] == 0.1f);
    CHECK(tenth[1] == -0.1f);
    CHECK(tenth[2] == std::numeric_limits<float>::max());

    const auto vec = f.tensor<double>("f64.vector");
    REQUIRE(vec.shape() == pw::Shape{4});
    CHECK(vec[0] == 1.0 / 3.0);
    CHECK(vec[1] == -2.0 / 3.0);
    CHECK(vec[2] == 1e-300);
    CHECK(vec[3] == std::ldexp(1.0, 60));

    const auto scalar = f.tensor<double>("f64.scalar");
    CHECK(scalar.rank() == 0);
    REQUIRE(scalar.size() == 1);
    CHECK(scalar[0] == 2.718281828459045);

    const auto empty = f.tensor<float>("f32.empty");
    CHECK(empty.shape() == pw::Shape{0, 3});
    CHECK(empty.size() == 0);

    const auto row = f.tensor<double>("f64.row");
    REQUIRE(row.shape() == pw::Shape{1, 5});
    for (std::size_t i = 0; i < 5; ++i) CHECK(row[i] == double(i * i) - 2.0);

    for (const auto& e : f.entries()) CHECK((e.dtype == (e.name.rfind("f32", 0) == 0 ? "F32" : "F64")));
}

// Writes the fixture's tensors with patchwork for tests/data/make_safetensors_fixture.py --check.
// Only when PATCHWORK_SAFETENSORS_ROUNDTRIP_OUT names the output (by hand; not in CI).
TEST_CASE("safetensors: write the fixture's tensors for the Python reader (when asked)") {
    const char* out = std::getenv("PATCHWORK_SAFETENSORS_ROUNDTRIP_OUT");
    if (!out) return;
    pw::Tensor<float> matrix(pw::Shape{2, 3}), cube(pw::Shape{2, 2, 2}), tenth(pw::Shape{3}), empty(pw::Shape{0, 3});
    for (std::size_t i = 0; i < 6; ++i) matrix[i] = float(i) * 0.25f - 1.f;
    for (std::size_t i = 0; i < 8; ++i) cube[i] = (i % 2 ? -1.f : 1.f) * (float(i) + 0.5f);
    tenth[0] = 0.1f;
    tenth[1] = -0.1f;
    tenth[2] = std::numeric_limits<float>::max();
    pw::Tensor<double> vec(pw::Shape{4}, {1.0 / 3.0, -2.0 / 3.0, 1e-300, std::ldexp(1.0, 60)});
    pw::Tensor<double> scalar(pw::Shape{}, {2.718281828459045});
    pw::Tensor<double> row(pw::Shape{1, 5});
    for (std::size_t i = 0; i < 5; ++i) row[i] = double(i * i) - 2.0;
    pw::SafetensorsWriter w;
    w.add("f32.matrix", matrix);
    w.add("f32.cube", cube);
    w.add("f32.tenth", tenth);
    w.add("f32.empty", empty);
    w.add("f64.vector", vec);
    w.add("f64.scalar", scalar);
    w.add("f64.row", row);
    w.add_metadata("source", "make_safetensors_fixture.py");
    w.add_metadata("note", "patchwork test fixture");
    w.save(out);
    MESSAGE("wrote ", std::string(out));
}

TEST_CASE("safetensors: every kind of corrupt file throws IoError naming the path and the problem") {
    TempDir dir;
    const Bytes eight = f32_bytes({1.f, 2.f});  // 8 bytes of data
    const std::string good_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
    int counter = 0;
    // Writes the bytes to a fresh file and expects read_safetensors and
    // parse_safetensors to report `word`, naming the file.
    const auto expect = [&](const Bytes& bytes, const std::string& word) {
        const auto p = dir / ("corrupt" + std::to_string(counter++) + ".safetensors");
        write_bytes(p, bytes);
        CHECK_IO_ERROR(pw::read_safetensors(p), p, word);
        const auto span = std::span(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size());
        CHECK_IO_ERROR(pw::parse_safetensors(span, "in-memory.st"), fs::path("in-memory.st"), word);
    };
    const auto header = [&](const std::string& h, const Bytes& data) { return st_file(h, data); };

    // The well-formed base case parses.
    {
        const auto p = dir / "good.safetensors";
        write_bytes(p, header("{" + good_entry + "}", eight));
        CHECK(pw::read_safetensors(p).tensor<float>("t")[1] == 2.f);
    }

    SUBCASE("missing file, directory") {
        CHECK_IO_ERROR(pw::read_safetensors(dir / "nope.safetensors"), dir / "nope.safetensors", "no such file");
        CHECK_IO_ERROR(pw::read_safetensors(dir.path), dir.path, "directory");
    }
    SUBCASE("file shorter than 8 bytes") {
        expect({}, "too short");
        expect({1, 0, 0, 0, 0}, "too short");
    }
    SUBCASE("header length beyond the file or absurd") {
        expect(st_file("{}", {}, 3), "exceeds the file");
        expect(st_file("{" + good_entry + "}", eight, 1000), "exceeds the file");
        expect(st_file("{}", {}, std::uint64_t(1) << 40), "too large");
        expect(st_file("{}", {}, ~std::uint64_t(0) - 1), "too large");
        expect(st_file("{}", {}, 100'000'001), "too large");
    }
    SUBCASE("header not JSON, or not an object") {
        expect(header("", {}), "not valid JSON");
        expect(header("{\"t\":", {}), "not valid JSON");
        expect(header("{} trailing", {}), "not valid JSON");
        expect(header(std::string("{\"\xff\":1}"), {}), "not valid JSON");  // invalid UTF-8
        expect(header("[1, 2]", {}), "not a JSON object");
        expect(header("\"text\"", {}), "not a JSON object");
        expect(header(std::string(100, '[') + std::string(100, ']'), {}), "deeper");
    }
    SUBCASE("entries and metadata of the wrong type") {
        expect(header(R"({"t": 5})", {}), "not a JSON object");
        expect(header(R"({"t": {"shape":[0],"data_offsets":[0,0]}})", {}), "missing \"dtype\"");
        expect(header(R"({"t": {"dtype":"F32","data_offsets":[0,0]}})", {}), "missing \"shape\"");
        expect(header(R"({"t": {"dtype":"F32","shape":[0]}})", {}), "missing \"data_offsets\"");
        expect(header(R"({"__metadata__": [1]})", {}), "__metadata__");
        expect(header(R"({"__metadata__": {"k": 1}})", {}), "__metadata__");
    }
    SUBCASE("unknown dtype") {
        expect(header(R"({"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", eight), "unknown dtype");
        expect(header(R"({"t":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", eight), "unknown dtype");
        expect(header(R"({"t":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", eight), "unknown dtype");
    }
    SUBCASE("shape not a list of non-negative integers") {
        for (const char* shape : {"[-2]", "[2.0]", "\"2\"", "2", "[[2]]", "[2, null]", "[true]", "{}",
                                  "[18446744073709551616]"})
            expect(header(std::string(R"({"t":{"dtype":"F32","shape":)") + shape + R"(,"data_offsets":[0,8]}})",
                          eight),
                   "non-negative integers");
    }
    SUBCASE("data_offsets not two integers with begin <= end") {
        for (const char* offsets : {"[0]", "[0, 8, 8]", "[-1, 8]", "[0, 8.0]", "\"0,8\"", "[0, \"8\"]", "[]"})
            expect(header(std::string(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":)") + offsets + "}}", eight),
                   "data_offsets");
        expect(header(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", eight), "begin is after end");
    }
    SUBCASE("end beyond the data section") {
        expect(header(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})", eight), "beyond the data section");
        expect(header(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", f32_bytes({1.f})),
               "beyond the data section");
    }
    SUBCASE("byte size not numel * dtype size") {
        expect(header(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight), "byte size");
        expect(header(R"({"t":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", eight), "byte size");
        expect(header(R"({"t":{"dtype":"F32","shape":[],"data_offsets":[0,8]}})", eight), "byte size");
        // numel * size overflows 64 bits.
        expect(header(R"({"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", eight),
               "byte size");
        expect(header(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", eight),
               "byte size");
    }
    SUBCASE("overlap, gap, trailing bytes") {
        expect(header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      eight),
               "overlap");
        expect(header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                      f32_bytes({1.f})),
               "overlap");
        expect(header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight), "gap");
        expect(header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                      f32_bytes({1.f, 2.f, 3.f})),
               "gap");
        expect(header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight), "trailing");
        expect(header("{}", eight), "trailing");
    }
    SUBCASE("duplicate names and keys") {
        expect(header("{" + good_entry + "," + good_entry + "}", eight), "duplicate");
        expect(header(R"({"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", eight),
               "duplicate");
        expect(header(R"({"__metadata__":{"k":"a","k":"b"},)" + good_entry + "}", eight), "duplicate");
    }
    SUBCASE("valid files patchwork cannot convert: other dtypes, rank above 4") {
        const auto p = dir / "other.safetensors";
        write_bytes(p, header(R"({"i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", eight));
        const auto f = pw::read_safetensors(p);  // parses: the format allows it
        CHECK(f.find("i")->dtype == "I64");
        CHECK_IO_ERROR(f.tensor<float>("i"), p, "unsupported dtype");
        const auto q = dir / "rank5.safetensors";
        write_bytes(q, header(R"({"r":{"dtype":"F32","shape":[1,1,2,1,1],"data_offsets":[0,8]}})", eight));
        const auto g = pw::read_safetensors(q);
        CHECK(g.find("r")->shape.size() == 5);
        CHECK_IO_ERROR(g.tensor<double>("r"), q, "rank 5");
    }
}

TEST_CASE("safetensors: saving is atomic") {
    TempDir dir;
    pw::Tensor<float> t(pw::Shape{2}, {1.f, 2.f});
    const auto target = dir / "keep.safetensors";
    {
        pw::SafetensorsWriter w;
        w.add("t", t);
        w.save(target);
    }
    const Bytes before = read_bytes(target);
    const std::set<std::string> listing = dir.listing();

    SUBCASE("serialisation throws: an existing target is left intact, no temporary file remains") {
        pw::Tensor<float> other(pw::Shape{3});
        pw::SafetensorsWriter bad_utf8;
        bad_utf8.add("ok", other);
        bad_utf8.add(std::string("bad\xff"), other);
        CHECK_IO_ERROR(bad_utf8.save(target), target, "header");
        pw::SafetensorsWriter duplicate;
        duplicate.add("x", other);
        duplicate.add("x", other);
        CHECK_IO_ERROR(duplicate.save(target), target, "duplicate");
        pw::SafetensorsWriter reserved;
        reserved.add("__metadata__", other);
        CHECK_IO_ERROR(reserved.save(target), target, "reserved");
        CHECK(read_bytes(target) == before);
        CHECK(dir.listing() == listing);
    }
    SUBCASE("the rename fails: the temporary file is removed") {
        const auto sub = dir / "a_directory";
        fs::create_directories(sub / "inside");
        pw::SafetensorsWriter w;
        w.add("t", t);
        CHECK_IO_ERROR(w.save(sub), sub, "cannot replace");
        CHECK(fs::is_directory(sub / "inside"));
        std::set<std::string> expected = listing;
        expected.insert("a_directory");
        CHECK(dir.listing() == expected);
    }
    SUBCASE("the directory does not exist or is not writable") {
        pw::SafetensorsWriter w;
        w.add("t", t);
        const auto missing = dir / "no_such_dir" / "x.safetensors";
        CHECK_IO_ERROR(w.save(missing), missing, "temporary file");
        CHECK(!fs::exists(missing));

        const auto locked = dir / "locked";
        fs::create_directories(locked);
        const auto inside = locked / "x.safetensors";
        {
            pw::SafetensorsWriter old;
            old.add("t", t);
            old.save(inside);
        }
        fs::permissions(locked, fs::perms::owner_read | fs::perms::owner_exec);
        // root may write anyway; then there is nothing to check.
        const bool writable = [&] {
            std::ofstream probe(locked / "probe");
            return probe.good();
        }();
        if (!writable) {
            pw::Tensor<float> other(pw::Shape{5});
            pw::SafetensorsWriter w2;
            w2.add("other", other);
            CHECK_IO_ERROR(w2.save(inside), inside, "not writable");
            CHECK(read_bytes(inside) == read_bytes(target));
        } else {
            MESSAGE("running as a user who can write into a read-only directory: not-writable case skipped");
        }
        fs::permissions(locked, fs::perms::owner_all);
    }
}

namespace {

using Model = pw::Sequential<pw::Tune<pw::Linear, pw::Adapter<4>>, pw::Relu, pw::Linear>;

Model make_model(std::size_t hidden = 16) {
    return Model(pw::Tune<pw::Linear, pw::Adapter<4>>(8, hidden), pw::Relu{}, pw::Linear(hidden, 3));
}

/// Fill every parameter with seeded values (the adapter's up-projection
/// starts at zero; make it matter).
template <class M>
void scramble(M& m, unsigned seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    m.visit([&](auto& p) {
        for (auto& v : p.value) v = static_cast<std::remove_reference_t<decltype(v)>>(u(gen));
    });
}

template <class M>
std::set<std::string> names_of(M& m) {
    std::set<std::string> names;
    m.visit([&](auto& p) { names.insert(p.name()); });
    return names;
}

std::set<std::string> names_in(const pw::SafetensorsFile& f) {
    std::set<std::string> names;
    for (const auto& e : f.entries()) names.insert(e.name);
    return names;
}

template <class T>
pw::Tensor<T> input(std::size_t rows, std::size_t cols) {
    pw::Tensor<T> x(pw::Shape{rows, cols});
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(std::sin(double(i) * 0.7));
    return x;
}

}  // namespace

TEST_CASE("safetensors: save_parameters / load_parameters restore a model's outputs exactly") {
    TempDir dir;
    Model a = make_model();
    scramble(a, 1);
    Model b = make_model();
    scramble(b, 2);
    const auto x = input<float>(5, 8);
    const pw::Tensor<float> ya = a.forward(x);
    CHECK(!same_values(b.forward(x), ya));

    const auto path = dir / "model.safetensors";
    pw::save_parameters(a, path, pw::AllParameters{}, {{"note", "whole model"}});
    const auto file = pw::read_safetensors(path);
    CHECK(names_in(file) == names_of(a));
    CHECK(file.metadata().at(pw::safetensors_format_key) == pw::safetensors_format_version);
    CHECK(file.metadata().at("note") == "whole model");
    for (const auto& e : file.entries()) CHECK(e.dtype == "F32");

    const auto meta = pw::load_parameters(b, path);
    CHECK(meta.at("note") == "whole model");
    CHECK(same_values(b.forward(x), ya));

    // A double model reads the float file (converting) and writes F64.
    using Model64 = pw::Sequential<pw::Tune<pw::BasicLinear<double>, pw::Adapter<4>>, pw::BasicRelu<double>,
                                   pw::BasicLinear<double>>;
    Model64 c(pw::Tune<pw::BasicLinear<double>, pw::Adapter<4>>(8, 16), pw::BasicRelu<double>{},
              pw::BasicLinear<double>(16, 3));
    pw::load_parameters(c, path);
    const auto x64 = input<double>(5, 8);
    const pw::Tensor<double> yc = c.forward(x64);
    scramble(c, 5);  // tiny values can differ after a double round trip; this one is exact
    const auto path64 = dir / "model64.safetensors";
    pw::load_parameters(c, path);
    pw::save_parameters(c, path64);
    const auto file64 = pw::read_safetensors(path64);
    for (const auto& e : file64.entries()) CHECK(e.dtype == "F64");
    Model64 d(pw::Tune<pw::BasicLinear<double>, pw::Adapter<4>>(8, 16), pw::BasicRelu<double>{},
              pw::BasicLinear<double>(16, 3));
    pw::load_parameters(d, path64);
    CHECK(same_values(d.forward(x64), yc));

    // A filter selects a subset; loading it leaves the rest alone.
    const auto weights = dir / "weights.safetensors";
    const auto only_weights = [](const auto& p) { return p.role() == pw::Role::weight; };
    pw::save_parameters(a, weights, only_weights);
    const auto weights_file = pw::read_safetensors(weights);
    for (const auto& e : weights_file.entries())
        CHECK(e.name.substr(e.name.size() - 7) == ".weight");
    Model e = make_model();
    scramble(e, 3);
    const pw::Tensor<float> bias_before = e.get<2>().bias.value;
    pw::load_parameters(e, weights, only_weights);
    CHECK(same_values(e.get<2>().bias.value, bias_before));
    CHECK(same_values(e.get<2>().weight.value, a.get<2>().weight.value));
}

TEST_CASE("safetensors: base and patch files split a model, and loading checks names and shapes") {
    TempDir dir;
    Model a = make_model();
    scramble(a, 11);
    const auto x = input<float>(4, 8);
    const pw::Tensor<float> ya = a.forward(x);

    const auto base = dir / "base.safetensors";
    const auto patch = dir / "patch.safetensors";
    pw::save_base(a, base);
    pw::save_patch(a, patch);

    const auto bf = pw::read_safetensors(base);
    const auto pf = pw::read_safetensors(patch);
    std::set<std::string> adapter_names, base_names;
    a.visit([&](auto& p) { (pw::is_injected(p.role()) ? adapter_names : base_names).insert(p.name()); });
    REQUIRE(adapter_names.size() == 4);
    CHECK(names_in(pf) == adapter_names);
    CHECK(names_in(bf) == base_names);
    for (const auto& n : names_in(pf)) CHECK(n.find("adapter") != std::string::npos);
    CHECK(pf.metadata().at("kind") == "patch");
    CHECK(pf.metadata().at("task") == std::to_string(pw::shared_task));
    CHECK(bf.metadata().at("kind") == "base");
    CHECK(pf.metadata().at(pw::safetensors_format_key) == pw::safetensors_format_version);

    // Base, then patch, into a fresh model: the same outputs.
    Model b = make_model();
    scramble(b, 12);
    pw::load_base(b, base);
    CHECK(!same_values(b.forward(x), ya));
    pw::load_patch(b, patch);
    CHECK(same_values(b.forward(x), ya));

    SUBCASE("a patch into a model of other shapes names the file, the parameter and both shapes") {
        Model narrow = make_model(12);
        scramble(narrow, 13);
        std::vector<pw::Tensor<float>> before;
        narrow.visit([&](auto& p) { before.push_back(p.value); });
        const std::string msg = patchwork::testing::io_error([&] { pw::load_patch(narrow, patch); });
        INFO("message: ", msg);
        CHECK(msg.find(patch.string()) != std::string::npos);
        CHECK(msg.find("shape mismatch") != std::string::npos);
        CHECK(msg.find("adapter") != std::string::npos);
        CHECK(msg.find("[4, 12]") != std::string::npos);
        CHECK(msg.find("[4, 16]") != std::string::npos);
        // Nothing was changed by the failed load.
        std::size_t i = 0;
        narrow.visit([&](auto& p) { CHECK(same_values(p.value, before[i++])); });
    }
    SUBCASE("unexpected and missing names") {
        const auto whole = dir / "whole.safetensors";
        pw::save_parameters(a, whole);
        Model c = make_model();
        CHECK_IO_ERROR(pw::load_patch(c, whole), whole, "unexpected");
        pw::load_patch(c, whole, pw::shared_task, {.strict = false});
        CHECK_IO_ERROR(pw::load_parameters(c, patch), patch, "missing tensor");
        CHECK_IO_ERROR(pw::load_base(c, patch), patch, "missing tensor");
        CHECK_IO_ERROR(pw::load_patch(c, patch, 3), patch, "task mismatch");
    }
}

TEST_CASE("safetensors: per-task patches hold only their task's parameters") {
    TempDir dir;
    using TwoAdapters = pw::Sequential<pw::Tune<pw::Linear, pw::Adapter<4>>, pw::Relu,
                                       pw::Tune<pw::Linear, pw::Adapter<2>>>;
    const auto make = [] {
        TwoAdapters m(pw::Tune<pw::Linear, pw::Adapter<4>>(6, 10), pw::Relu{},
                      pw::Tune<pw::Linear, pw::Adapter<2>>(10, 5));
        // The first adapter belongs to task 0, the second to task 1.
        m.visit([](auto& p) {
            if (pw::is_injected(p.role())) p.set_task(p.name().rfind("linear0", 0) == 0 ? 0 : 1);
        });
        return m;
    };
    TwoAdapters a = make();
    scramble(a, 21);
    const auto p0 = dir / "task0.safetensors";
    const auto p1 = dir / "task1.safetensors";
    pw::save_patch(a, p0, 0);
    pw::save_patch(a, p1, 1);
    const auto f0 = pw::read_safetensors(p0);
    const auto f1 = pw::read_safetensors(p1);
    CHECK(f0.size() == 4);
    CHECK(f1.size() == 4);
    for (const auto& e : f0.entries()) CHECK(e.name.rfind("linear0.adapter.", 0) == 0);
    for (const auto& e : f1.entries()) CHECK(e.name.rfind("linear2.adapter.", 0) == 0);
    CHECK(f1.metadata().at("task") == "1");
    // The base holds neither adapter.
    pw::save_base(a, dir / "base.safetensors");
    const auto base_file = pw::read_safetensors(dir / "base.safetensors");
    for (const auto& e : base_file.entries())
        CHECK(e.name.find("adapter") == std::string::npos);

    TwoAdapters b = make();
    scramble(b, 22);
    pw::load_base(b, dir / "base.safetensors");
    pw::load_patch(b, p0, 0);
    pw::load_patch(b, p1, 1);
    const auto x = input<float>(3, 6);
    const pw::Tensor<float> ya = a.forward(x);
    CHECK(same_values(b.forward(x), ya));
    CHECK_IO_ERROR(pw::load_patch(b, p0, 1), p0, "task mismatch");
}
