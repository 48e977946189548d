// SPDX-License-Identifier: Apache-2.0
// The Fashion-MNIST loader of the examples: small IDX files written here
// with zlib (good ones and broken ones, each error naming the file), and the
// real dataset from the Debian package: 60,000 + 10,000 images whose ten
// classes are exactly balanced (6,000 and 1,000 each, as published).
#include <gtest/gtest.h>

#include <unistd.h>
#include <zlib.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "fashion_mnist.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

namespace fs = std::filesystem;

std::vector<unsigned char> be32(std::uint32_t v) {
  return {static_cast<unsigned char>(v >> 24), static_cast<unsigned char>(v >> 16), static_cast<unsigned char>(v >> 8),
          static_cast<unsigned char>(v)};
}

void write_gz(const fs::path& path, const std::vector<unsigned char>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  gzclose(f);
}

struct Files {
  fs::path dir;
  Files() {
    dir = fs::temp_directory_path() / ("mixprec_idx_" + std::to_string(::getpid()));
    fs::create_directories(dir);
  }
  ~Files() { fs::remove_all(dir); }
  // `count` images and labels; pixel i of image n is (n + i) % 256, label n % 10.
  void write(std::uint32_t count, std::uint32_t image_magic = 2051, std::uint32_t label_count = 0,
             std::int64_t drop_bytes = 0, int bad_label_at = -1) {
    std::vector<unsigned char> img = be32(image_magic);
    for (std::uint32_t v : {count, 28u, 28u}) {
      const auto b = be32(v);
      img.insert(img.end(), b.begin(), b.end());
    }
    for (std::uint32_t n = 0; n < count; ++n) {
      for (int i = 0; i < 784; ++i) img.push_back(static_cast<unsigned char>((n + i) % 256));
    }
    img.resize(img.size() - static_cast<std::size_t>(drop_bytes));
    std::vector<unsigned char> lab = be32(2049);
    const auto c = be32(label_count ? label_count : count);
    lab.insert(lab.end(), c.begin(), c.end());
    for (std::uint32_t n = 0; n < (label_count ? label_count : count); ++n) {
      lab.push_back(static_cast<unsigned char>(static_cast<int>(n) == bad_label_at ? 10 : n % 10));
    }
    write_gz(dir / "train-images-idx3-ubyte.gz", img);
    write_gz(dir / "train-labels-idx1-ubyte.gz", lab);
  }
};

TEST(FashionMnistLoader, ReadsWhatWasWritten) {
  Files f;
  f.write(3);
  const examples::ImageSet s = examples::load_fashion_mnist(f.dir.string(), "train");
  EXPECT_EQ(s.count, 3);
  ASSERT_EQ(s.pixels.size(), 3u * 784);
  EXPECT_EQ(s.pixels[784 * 2 + 5], 7);
  EXPECT_EQ(s.labels, (std::vector<std::int32_t>{0, 1, 2}));
}

TEST(FashionMnistLoader, BrokenFilesNameThemselves) {
  Files f;
  const std::string images = (f.dir / "train-images-idx3-ubyte.gz").string();
  const std::string labels = (f.dir / "train-labels-idx1-ubyte.gz").string();
  test::expect_error([&] { examples::load_fashion_mnist(f.dir.string(), "train"); },
                     {"cannot open", images.c_str(), "dataset-fashion-mnist"});
  f.write(2, 2049);
  test::expect_error([&] { examples::load_fashion_mnist(f.dir.string(), "train"); },
                     {images.c_str(), "magic number 2049", "expected 2051"});
  f.write(2, 2051, 0, 10);
  test::expect_error([&] { examples::load_fashion_mnist(f.dir.string(), "train"); },
                     {images.c_str(), "ends after", "pixels"});
  f.write(2, 2051, 3);
  test::expect_error([&] { examples::load_fashion_mnist(f.dir.string(), "train"); },
                     {labels.c_str(), "3 labels", "2 images"});
  f.write(4, 2051, 0, 0, 2);
  test::expect_error([&] { examples::load_fashion_mnist(f.dir.string(), "train"); },
                     {labels.c_str(), "label 2 is 10"});
  // Not gzip at all.
  std::FILE* raw = std::fopen(images.c_str(), "wb");
  ASSERT_NE(raw, nullptr);
  const char junk[] = "\x1f\x8b\x08\x00garbage that is not deflate data";
  std::fwrite(junk, 1, sizeof junk, raw);
  std::fclose(raw);
  test::expect_error([&] { examples::load_fashion_mnist(f.dir.string(), "train"); }, {images.c_str()});
  test::expect_error([&] { examples::load_fashion_mnist(f.dir.string(), "valid"); }, {"split = \"valid\""});
}

TEST(FashionMnistLoader, TheRealDatasetIsBalanced) {
  const std::string dir = examples::kFashionMnistDir;
  if (!fs::exists(dir + "/t10k-labels-idx1-ubyte.gz")) {
    GTEST_SKIP() << "no Fashion-MNIST in " << dir << " (Debian package dataset-fashion-mnist)";
  }
  for (auto [split, count] : {std::pair<const char*, std::int64_t>{"train", 60000}, {"t10k", 10000}}) {
    const examples::ImageSet s = examples::load_fashion_mnist(dir, split);
    EXPECT_EQ(s.count, count) << split;
    std::array<std::int64_t, 10> per_class{};
    for (std::int32_t l : s.labels) ++per_class[static_cast<std::size_t>(l)];
    for (std::int64_t c : per_class) EXPECT_EQ(c, count / 10) << split;
  }
}

}  // namespace
}  // namespace mixprec
