#include <doctest/doctest.h>

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "temp_dir.hpp"
#include "patchwork/io/dataset.hpp"
#include "patchwork/io/idx.hpp"

namespace pw = patchwork;
namespace fs = std::filesystem;

namespace {

struct TempDir : patchwork::testing::TempDir {
    TempDir() : patchwork::testing::TempDir("patchwork_test_io") {}
};

using Bytes = std::vector<std::uint8_t>;

/// An IDX file's bytes, written independently of the reader under test.
Bytes idx_bytes(std::uint8_t dtype, const std::vector<std::uint32_t>& dims, const Bytes& data) {
    Bytes out{0x00, 0x00, dtype, std::uint8_t(dims.size())};
    for (std::uint32_t d : dims)
        for (int shift = 24; shift >= 0; shift -= 8) out.push_back(std::uint8_t(d >> shift));
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

Bytes iota_bytes(std::size_t n, std::uint8_t start = 0) {
    Bytes b(n);
    for (std::size_t i = 0; i < n; ++i) b[i] = std::uint8_t(start + i);
    return b;
}

void write_plain(const fs::path& path, const Bytes& bytes) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    REQUIRE(f.good());
}

void write_gz(const fs::path& path, const Bytes& bytes) {
    gzFile f = gzopen(path.string().c_str(), "wb");
    REQUIRE(f != nullptr);
    if (!bytes.empty()) REQUIRE(gzwrite(f, bytes.data(), unsigned(bytes.size())) == int(bytes.size()));
    REQUIRE(gzclose(f) == Z_OK);
}

Bytes read_all(const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

}  // namespace

TEST_CASE("idx: plain and gzip files round-trip") {
    TempDir dir;
    const Bytes data = iota_bytes(3 * 2 * 4, 7);
    const Bytes file = idx_bytes(0x08, {3, 2, 4}, data);
    write_plain(dir / "a.idx", file);
    write_gz(dir / "a.idx.gz", file);
    for (const char* name : {"a.idx", "a.idx.gz"}) {
        CAPTURE(name);
        const pw::IdxArray a = pw::read_idx(dir / name);
        CHECK(a.dims == std::vector<std::size_t>{3, 2, 4});
        CHECK(a.count() == 3);
        CHECK(a.item_size() == 8);
        CHECK(a.data == data);
    }
    // A one-dimensional file (labels).
    write_gz(dir / "l.gz", idx_bytes(0x08, {5}, {0, 9, 3, 3, 1}));
    const pw::IdxArray l = pw::read_idx(dir / "l.gz");
    CHECK(l.dims == std::vector<std::size_t>{5});
    CHECK(l.data == Bytes{0, 9, 3, 3, 1});
}

TEST_CASE("idx: every kind of malformed file throws IoError naming the path and the problem") {
    TempDir dir;

    SUBCASE("missing file and directory") {
        CHECK_IO_ERROR(pw::read_idx(dir / "nope.idx"), dir / "nope.idx", "no such file");
        CHECK_IO_ERROR(pw::read_idx(dir.path), dir.path, "directory");
    }
    SUBCASE("bad magic") {
        const auto p = dir / "magic.idx";
        write_plain(p, {0x1f, 0x02, 0x08, 0x01, 0, 0, 0, 1, 42});
        CHECK_IO_ERROR(pw::read_idx(p), p, "bad magic");
        const auto t = dir / "text.gz";
        write_gz(t, {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'});
        CHECK_IO_ERROR(pw::read_idx(t), t, "magic");
    }
    SUBCASE("unsupported dtype") {
        const auto p = dir / "float.idx";
        write_plain(p, idx_bytes(0x0D, {2}, Bytes(8, 0)));
        CHECK_IO_ERROR(pw::read_idx(p), p, "unsupported dtype 0x0d");
        CHECK_IO_ERROR(pw::read_idx(p), p, "float32");
    }
    SUBCASE("empty file and truncated header") {
        const auto e = dir / "empty.idx";
        write_plain(e, {});
        CHECK_IO_ERROR(pw::read_idx(e), e, "truncated header");
        const auto h = dir / "header.idx";
        write_plain(h, {0x00, 0x00, 0x08, 0x03, 0x00, 0x00, 0x00, 0x02, 0x00});
        CHECK_IO_ERROR(pw::read_idx(h), h, "truncated header");
    }
    SUBCASE("implausible dimensions") {
        const auto z = dir / "zero.idx";
        write_plain(z, idx_bytes(0x08, {4, 0, 3}, {}));
        CHECK_IO_ERROR(pw::read_idx(z), z, "zero");
        const auto r = dir / "rank0.idx";
        write_plain(r, idx_bytes(0x08, {}, {1, 2, 3}));
        CHECK_IO_ERROR(pw::read_idx(r), r, "implausible dims");
        const auto big = dir / "huge.idx";
        write_plain(big, idx_bytes(0x08, {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, {1, 2, 3}));
        CHECK_IO_ERROR(pw::read_idx(big), big, "implausible dims");
    }
    SUBCASE("truncated data, plain and gzip") {
        const auto p = dir / "short.idx";
        write_plain(p, idx_bytes(0x08, {10, 4}, iota_bytes(25)));
        CHECK_IO_ERROR(pw::read_idx(p), p, "truncated data");
        CHECK_IO_ERROR(pw::read_idx(p), p, "found 25");
        const auto g = dir / "short.gz";
        write_gz(g, idx_bytes(0x08, {10, 4}, iota_bytes(25)));
        CHECK_IO_ERROR(pw::read_idx(g), g, "truncated data");
    }
    SUBCASE("truncated gzip stream") {
        // Incompressible payload, so that cutting the file cuts the data.
        std::mt19937 gen(3);
        Bytes payload(4096);
        for (auto& b : payload) b = std::uint8_t(gen());
        const auto g = dir / "cut.gz";
        write_gz(g, idx_bytes(0x08, {16, 256}, payload));
        fs::resize_file(g, fs::file_size(g) / 2);
        CHECK_IO_ERROR(pw::read_idx(g), g, "truncated");
        CHECK_IO_ERROR(pw::read_idx(g), g, "unexpected end of file");
        // Cut inside the 8-byte trailer: all data present, the stream still incomplete.
        const auto t = dir / "cut_trailer.gz";
        write_gz(t, idx_bytes(0x08, {16, 256}, payload));
        fs::resize_file(t, fs::file_size(t) - 3);
        CHECK_IO_ERROR(pw::read_idx(t), t, "gzip");
    }
    SUBCASE("gzip CRC mismatch") {
        const auto g = dir / "crc.gz";
        write_gz(g, idx_bytes(0x08, {4, 4}, iota_bytes(16)));
        Bytes raw = read_all(g);
        REQUIRE(raw.size() > 8);
        raw[raw.size() - 8] ^= 0xFF;  // first byte of the CRC-32 in the trailer
        write_plain(g, raw);
        CHECK_IO_ERROR(pw::read_idx(g), g, "corrupt");
        CHECK_IO_ERROR(pw::read_idx(g), g, "gzip: incorrect data check");
    }
    SUBCASE("trailing bytes, plain and gzip") {
        const auto p = dir / "long.idx";
        write_plain(p, idx_bytes(0x08, {2, 2}, iota_bytes(7)));
        CHECK_IO_ERROR(pw::read_idx(p), p, "trailing bytes");
        CHECK_IO_ERROR(pw::read_idx(p), p, "3 more");
        const auto g = dir / "long.gz";
        write_gz(g, idx_bytes(0x08, {2, 2}, iota_bytes(100)));
        CHECK_IO_ERROR(pw::read_idx(g), g, "trailing bytes");
    }
}

TEST_CASE("idx: load_idx_pair flattens and scales images and checks the counts") {
    TempDir dir;
    const auto images = dir / "img.gz", labels = dir / "lab.gz";
    const Bytes pixels = {0, 255, 51, 102, 153, 204, 0, 0, 0, 255, 255, 255};  // 2 images of 2x3
    write_gz(images, idx_bytes(0x08, {2, 2, 3}, pixels));
    write_gz(labels, idx_bytes(0x08, {2}, {7, 2}));

    const auto ds = pw::load_idx_pair<double>(images, labels);
    CHECK(ds.size() == 2);
    CHECK(ds.features() == 6);
    CHECK(ds.images.shape() == pw::Shape{2, 6});
    CHECK(ds.labels == std::vector<int>{7, 2});
    CHECK(ds.num_classes() == 8);
    for (std::size_t i = 0; i < pixels.size(); ++i) CHECK(ds.images[i] == doctest::Approx(pixels[i] / 255.0));

    const auto one = pw::load_idx_pair<float>(images, labels, 1);
    CHECK(one.size() == 1);
    CHECK(one.images.shape() == pw::Shape{1, 6});
    CHECK(one.labels == std::vector<int>{7});

    SUBCASE("count mismatch names both files") {
        const auto three = dir / "three.gz";
        write_gz(three, idx_bytes(0x08, {3}, {1, 2, 3}));
        CHECK_IO_ERROR(pw::load_idx_pair<float>(images, three), images, "mismatch");
        CHECK_IO_ERROR(pw::load_idx_pair<float>(images, three), three, "mismatch");
    }
    SUBCASE("labels must be one-dimensional, images at least two-dimensional") {
        CHECK_IO_ERROR(pw::load_idx_pair<float>(images, images), images, "expected labels");
        CHECK_IO_ERROR(pw::load_idx_pair<float>(labels, labels), labels, "expected images");
    }
    SUBCASE("a missing Fashion-MNIST directory") {
        const auto missing = dir / "no-such-dir";
        CHECK_IO_ERROR(pw::load_fashion_mnist<float>(missing, pw::Split::test), missing, "no such file");
    }
}

TEST_CASE("fashion-mnist: the installed test split") {
    const fs::path root = pw::fashion_mnist_default_dir;
    if (!fs::exists(root / "t10k-images-idx3-ubyte.gz") || !fs::exists(root / "t10k-labels-idx1-ubyte.gz")) {
        MESSAGE("skipped: Fashion-MNIST not installed at ", root.string(), " (Debian package dataset-fashion-mnist)");
        return;
    }
    const auto ds = pw::load_fashion_mnist<float>(pw::Split::test);
    REQUIRE(ds.size() == 10000);
    CHECK(ds.images.shape() == pw::Shape{10000, 28 * 28});
    CHECK(ds.num_classes() == 10);
    std::vector<int> per_class(10, 0);
    for (int l : ds.labels) {
        REQUIRE(l >= 0);
        REQUIRE(l <= 9);
        ++per_class[std::size_t(l)];
    }
    for (int c : per_class) CHECK(c == 1000);  // the test split is balanced
    const auto [lo, hi] = std::minmax_element(ds.images.begin(), ds.images.end());
    CHECK(*lo == 0.0f);
    CHECK(*hi == 1.0f);

    const auto few = pw::load_fashion_mnist<double>(root, pw::Split::test, 50);
    CHECK(few.size() == 50);
    CHECK(std::equal(few.labels.begin(), few.labels.end(), ds.labels.begin()));
    CHECK(few.images[123] == doctest::Approx(ds.images[123]));
}

namespace {

/// n samples, sample i has label i % classes and features {i, -i, 0.5}.
pw::Dataset<float> toy(std::size_t n, int classes) {
    pw::Dataset<float> ds;
    ds.images = pw::Tensor<float>(pw::Shape{n, 3});
    for (std::size_t i = 0; i < n; ++i) {
        ds.images(i, 0) = float(i);
        ds.images(i, 1) = -float(i);
        ds.images(i, 2) = 0.5f;
        ds.labels.push_back(int(i % std::size_t(classes)));
    }
    return ds;
}

/// The dataset indices one epoch visits, in order, read back from the batch rows.
std::vector<std::size_t> visit(pw::Batcher<float>& b, std::size_t epoch, std::vector<std::size_t>* sizes = nullptr) {
    b.start_epoch(epoch);
    std::vector<std::size_t> seen;
    for (std::size_t i = 0; i < b.batches(); ++i) {
        const pw::Batch<float>& batch = b.batch(i);
        REQUIRE(batch.x.cols() == 3);
        REQUIRE(batch.x.rows() == batch.labels.size());
        if (sizes) sizes->push_back(batch.labels.size());
        for (std::size_t r = 0; r < batch.labels.size(); ++r) {
            const auto idx = std::size_t(batch.x(r, 0));
            CHECK(batch.x(r, 1) == -float(idx));
            CHECK(batch.labels[r] == int(idx % 4));
            seen.push_back(idx);
        }
    }
    return seen;
}

}  // namespace

static_assert(pw::BatchSource<pw::Batcher<float>>);

TEST_CASE("batcher: each sample once per epoch, reshuffled per epoch, reproducible from the seed") {
    const auto ds = toy(10, 4);
    pw::Batcher<float> b(ds, 3, /*seed=*/42);
    CHECK(b.batches() == 4);

    std::vector<std::size_t> sizes;
    const auto e0 = visit(b, 0, &sizes);
    CHECK(sizes == std::vector<std::size_t>{3, 3, 3, 1});
    auto sorted = e0;
    std::sort(sorted.begin(), sorted.end());
    for (std::size_t i = 0; i < 10; ++i) CHECK(sorted[i] == i);

    const auto e1 = visit(b, 1);
    CHECK(e1 != e0);
    CHECK(std::set<std::size_t>(e1.begin(), e1.end()).size() == 10);

    // The order of an epoch depends on (seed, epoch) only, not on history.
    pw::Batcher<float> again(ds, 3, 42);
    CHECK(visit(again, 1) == e1);
    CHECK(visit(again, 0) == e0);
    CHECK(visit(b, 0) == e0);
    pw::Batcher<float> other(ds, 3, 43);
    CHECK(visit(other, 0) != e0);

    // Without shuffling, dataset order.
    pw::Batcher<float> plain(ds, {.batch_size = 4, .shuffle = false});
    const auto in_order = visit(plain, 5);
    for (std::size_t i = 0; i < 10; ++i) CHECK(in_order[i] == i);
}

TEST_CASE("batcher: drop_last, buffer reuse and invalid arguments") {
    const auto ds = toy(10, 4);
    pw::Batcher<float> b(ds, {.batch_size = 3, .seed = 7, .drop_last = true});
    CHECK(b.batches() == 3);
    std::vector<std::size_t> sizes;
    const auto seen = visit(b, 2, &sizes);
    CHECK(sizes == std::vector<std::size_t>{3, 3, 3});
    CHECK(std::set<std::size_t>(seen.begin(), seen.end()).size() == 9);

    const pw::Batch<float>& first = b.batch(0);
    const float* storage = first.x.data();
    const pw::Batch<float>& second = b.batch(1);
    CHECK(&first == &second);
    CHECK(second.x.data() == storage);

    CHECK(pw::Batcher<float>(ds, {.batch_size = 10, .drop_last = true}).batches() == 1);
    CHECK(pw::Batcher<float>(ds, {.batch_size = 11, .drop_last = true}).batches() == 0);
    CHECK(pw::Batcher<float>(ds, 11).batches() == 1);
    CHECK_THROWS_AS(pw::Batcher<float>(ds, 0), pw::ConfigError);
    CHECK_THROWS_AS((void)b.batch(3), pw::ConfigError);
}

TEST_CASE("dataset: filter_classes, split, subset and first_per_class") {
    const auto ds = toy(12, 4);  // labels 0 1 2 3 0 1 2 3 0 1 2 3

    const int wanted[] = {3, 1};
    const auto relabelled = pw::filter_classes(ds, std::span<const int>(wanted), true);
    CHECK(relabelled.size() == 6);
    CHECK(relabelled.labels == std::vector<int>{1, 0, 1, 0, 1, 0});  // 1 -> 1, 3 -> 0
    CHECK(relabelled.images(0, 0) == 1.0f);
    CHECK(relabelled.images(1, 0) == 3.0f);
    CHECK(relabelled.images(5, 1) == -11.0f);
    const auto kept = pw::filter_classes(ds, {3, 1}, false);
    CHECK(kept.labels == std::vector<int>{1, 3, 1, 3, 1, 3});
    CHECK_THROWS_AS((void)pw::filter_classes(ds, {2, 2}, true), pw::ConfigError);
    CHECK_THROWS_AS((void)pw::filter_classes(ds, std::span<const int>(), true), pw::ConfigError);

    const auto [a, b] = pw::split(ds, 0.75, 5);
    CHECK(a.size() == 9);
    CHECK(b.size() == 3);
    std::set<float> ids;
    for (const auto* part : {&a, &b})
        for (std::size_t i = 0; i < part->size(); ++i) {
            ids.insert(part->images(i, 0));
            CHECK(part->labels[i] == int(part->images(i, 0)) % 4);
            if (i) CHECK(part->images(i - 1, 0) < part->images(i, 0));  // original order kept
        }
    CHECK(ids.size() == 12);
    const auto [a2, b2] = pw::split(ds, 0.75, 5);
    CHECK(a2.labels == a.labels);
    CHECK(std::equal(b2.images.begin(), b2.images.end(), b.images.begin()));
    const auto big = toy(200, 4);
    const auto [c1, d1] = pw::split(big, 0.5, 1);
    const auto [c2, d2] = pw::split(big, 0.5, 2);
    CHECK(!std::equal(c1.images.begin(), c1.images.end(), c2.images.begin()));
    for (double bad : {0.0, 1.0, -0.5, 1.5, std::numeric_limits<double>::quiet_NaN()})
        CHECK_THROWS_AS((void)pw::split(ds, bad, 0), pw::ConfigError);
    CHECK_THROWS_AS((void)pw::split(ds, 0.01, 0), pw::ConfigError);  // leaves the first part empty

    const auto s = pw::subset(ds, 5);
    CHECK(s.size() == 5);
    CHECK(s.images.shape() == pw::Shape{5, 3});
    CHECK(s.images(4, 0) == 4.0f);
    CHECK(pw::subset(ds, 100).size() == 12);

    const auto two = pw::first_per_class(ds, 2);  // the first two of each class, in order
    CHECK(two.labels == std::vector<int>{0, 1, 2, 3, 0, 1, 2, 3});
    CHECK(two.images(7, 0) == 7.0f);
    CHECK(pw::first_per_class(ds, 0).size() == 12);
    CHECK(pw::first_per_class(ds, 10).size() == 12);
    auto negative = ds;
    negative.labels[3] = -1;
    CHECK_THROWS_AS((void)pw::first_per_class(negative, 1), pw::ConfigError);
}
