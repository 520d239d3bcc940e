// NumPy .npy files: reading what numpy.save wrote (tests/data/npy, made by
// make_fixtures.py), writing what numpy reads, and clear errors on bad files.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "patchwork/core/random.hpp"
#include "patchwork/core/xtensor.hpp"
#include "patchwork/io/npy.hpp"
#include "temp_dir.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;

namespace {

fs::path npy_dir() {
    const char* data_dir = std::getenv("PATCHWORK_TEST_DATA");
    REQUIRE_MESSAGE(data_dir != nullptr, "PATCHWORK_TEST_DATA must point at tests/data (meson test sets it)");
    return fs::path(data_dir) / "npy";
}

std::vector<unsigned char> read_bytes(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
}

void write_bytes(const fs::path& p, const std::vector<unsigned char>& b) {
    std::ofstream out(p, std::ios::binary);
    out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

/// A version 1.0 file with the given header text (padded as numpy pads it) and data bytes.
std::vector<unsigned char> npy_bytes(std::string header, std::size_t data_bytes) {
    const std::size_t total = (10 + header.size() + 1 + 63) / 64 * 64;
    header.append(total - 10 - header.size() - 1, ' ');
    header += '\n';
    std::vector<unsigned char> b(10 + header.size() + data_bytes, 0);
    const unsigned char prefix[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<unsigned char>(header.size() & 0xff),
                                      static_cast<unsigned char>(header.size() >> 8)};
    std::copy(prefix, prefix + 10, b.begin());
    std::copy(header.begin(), header.end(), b.begin() + 10);
    return b;
}

/// The values make_fixtures.py stored: v[i] = i * 0.5 - 3 in C order.
double expected(std::size_t i) { return double(i) * 0.5 - 3; }

}  // namespace

TEST_CASE("npy: reads what numpy.save wrote, every supported dtype, byte order and layout") {
    const fs::path dir = npy_dir();
    const auto check_values = [](const pw::Tensor<double>& t, pw::Shape shape) {
        REQUIRE(t.shape() == shape);
        for (std::size_t i = 0; i < t.size(); ++i) CHECK(t[i] == expected(i));
    };
    check_values(pw::load_npy<double>(dir / "f4_2x3.npy"), pw::Shape{2, 3});
    check_values(pw::load_npy<double>(dir / "f8_fortran_3x4.npy"), pw::Shape{3, 4});
    check_values(pw::load_npy<double>(dir / "f4_fortran_2x3x2.npy"), pw::Shape{2, 3, 2});
    check_values(pw::load_npy<double>(dir / "big_f4_2x2.npy"), pw::Shape{2, 2});
    check_values(pw::load_npy<double>(dir / "f2_4.npy"), pw::Shape{4});
    check_values(pw::load_npy<double>(dir / "f4_2x1x2x2.npy"), pw::Shape{2, 1, 2, 2});
    check_values(pw::load_npy<double>(dir / "f8_scalar.npy"), pw::Shape{});
    // Integers are truncated towards zero by the cast in make_fixtures.py: -3, -2, -2, -1, -1 ...
    const auto ints = pw::load_npy<float>(dir / "i8_5.npy");
    REQUIRE(ints.shape() == pw::Shape{5});
    for (std::size_t i = 0; i < 5; ++i) CHECK(ints[i] == float(std::int64_t(expected(i))));
    const auto big = pw::load_npy<float>(dir / "big_i4_3.npy");
    REQUIRE(big.shape() == pw::Shape{3});
    for (std::size_t i = 0; i < 3; ++i) CHECK(big[i] == float(std::int32_t(expected(i))));
    const auto bytes = pw::load_npy<float>(dir / "u1_6.npy");
    for (std::size_t i = 0; i < 6; ++i) CHECK(bytes[i] == float(i));
    const auto flags = pw::load_npy<double>(dir / "b1_5.npy");
    for (std::size_t i = 0; i < 5; ++i) CHECK(flags[i] == (i % 3 == 0 ? 1.0 : 0.0));
    const auto empty = pw::load_npy<float>(dir / "f4_empty_0x3.npy");
    CHECK(empty.shape() == pw::Shape{0, 3});
    CHECK(empty.size() == 0);
}

TEST_CASE("npy: save writes numpy's own bytes and round-trips every rank exactly") {
    // The header and data numpy.save wrote for float32 [[-3, -2.5, -2], [-1.5, -1, -0.5]].
    pw::Tensor<float> t(pw::Shape{2, 3});
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = float(expected(i));
    pw::testing::TempDir tmp;
    pw::save_npy(tmp / "a.npy", t);
    CHECK(read_bytes(tmp / "a.npy") == read_bytes(npy_dir() / "f4_2x3.npy"));
    CHECK(tmp.listing() == std::set<std::string>{"a.npy"});  // no temporary file left behind

    pw::Rng rng(7);
    for (const pw::Shape& s : {pw::Shape{}, pw::Shape{5}, pw::Shape{3, 1}, pw::Shape{2, 3, 4}, pw::Shape{2, 1, 3, 2},
                               pw::Shape{0, 4}}) {
        pw::Tensor<double> d(s);
        pw::init::normal(d, rng, 0.0, 1.0);
        pw::save_npy(tmp / "d.npy", d);
        const auto back = pw::load_npy<double>(tmp / "d.npy");
        REQUIRE(back.shape() == s);
        for (std::size_t i = 0; i < d.size(); ++i) CHECK(back[i] == d[i]);
        const auto bytes = read_bytes(tmp / "d.npy");
        const std::size_t header_end = 10 + (std::size_t(bytes[8]) | (std::size_t(bytes[9]) << 8));
        CHECK(header_end % 64 == 0);
        CHECK(bytes[header_end - 1] == '\n');
    }
    // A loaded tensor is an ordinary Tensor: its xtensor view sees the same values.
    const auto a = pw::load_npy<float>(tmp / "a.npy");
    const auto v = pw::xt(a);
    CHECK(v(1, 2) == doctest::Approx(-0.5));
}

TEST_CASE("npy: a bad file is an IoError naming the file and the problem; nothing is half-written") {
    pw::testing::TempDir tmp;
    const fs::path p = tmp / "bad.npy";
    const auto with = [&](const std::vector<unsigned char>& b) {
        write_bytes(p, b);
        return p;
    };
    const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    CHECK_IO_ERROR(pw::load_npy<float>(tmp / "missing.npy"), tmp / "missing.npy", "cannot open");
    CHECK_IO_ERROR(pw::load_npy<float>(with({0x93, 'N', 'U'})), p, "too short");
    auto b = npy_bytes(ok, 24);
    b[1] = 'X';
    CHECK_IO_ERROR(pw::load_npy<float>(with(b)), p, "magic");
    b = npy_bytes(ok, 24);
    b[6] = 4;
    CHECK_IO_ERROR(pw::load_npy<float>(with(b)), p, "version 4.0");
    b = npy_bytes(ok, 24);
    b[9] = 0x40;  // header length 16K + ...
    CHECK_IO_ERROR(pw::load_npy<float>(with(b)), p, "past the end");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes(ok, 20))), p, "truncated");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes(ok, 28))), p, "trailing bytes");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes("{'descr': '<f4', 'shape': (2,), }", 8))), p,
                   "no 'fortran_order'");
    CHECK_IO_ERROR(pw::load_npy<float>(
                       with(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8))),
                   p, "unknown key 'x'");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes(
                       "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8))),
                   p, "appears twice");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", 16))),
                   p, "unsupported dtype '|O'");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", 16))),
                   p, "unsupported dtype '<c8'");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes(
                       "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8))),
                   p, "structured");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", 0))),
                   p, "non-negative integers");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes(
                       "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 2), }", 8))),
                   p, "5 dimensions");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes("{'descr': '<f4', 'fortran_order': maybe, 'shape': (2,), }", 8))),
                   p, "True or False");
    CHECK_IO_ERROR(pw::load_npy<float>(with(npy_bytes("['descr', '<f4']", 8))), p, "expected '{'");

    // Saving into a directory that does not exist fails clearly and leaves nothing behind;
    // an existing file is replaced only by a complete one.
    pw::Tensor<float> t(pw::Shape{3}, {1, 2, 3});
    CHECK_IO_ERROR(pw::save_npy(tmp / "no" / "such" / "dir.npy", t), tmp / "no" / "such" / "dir.npy", "temporary");
    pw::save_npy(tmp / "keep.npy", t);
    const auto before = read_bytes(tmp / "keep.npy");
    pw::Tensor<float> u(pw::Shape{2}, {4, 5});
    pw::save_npy(tmp / "keep.npy", u);
    CHECK(read_bytes(tmp / "keep.npy") != before);
    CHECK(pw::load_npy<float>(tmp / "keep.npy")[1] == 5.0f);
}
