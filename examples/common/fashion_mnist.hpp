// SPDX-License-Identifier: Apache-2.0
// Fashion-MNIST from its gzipped IDX files (the Debian package
// dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist),
// read with zlib. Every check names the file: a missing file, a wrong magic
// number, dimensions that are not 28x28, a truncated or overlong body,
// labels outside 0..9, image and label counts that differ.
#pragma once

#include <zlib.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "mixprec/core/error.hpp"

namespace mixprec::examples {

inline const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

/// Where the examples look by default: $MIXPREC_FASHION_MNIST when set (a
/// copy elsewhere, e.g. on a machine without the package), else the
/// package's folder.
inline std::string default_fashion_mnist_dir() {
  const char* env = std::getenv("MIXPREC_FASHION_MNIST");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(kFashionMnistDir);
}

/// One split: `count` images of rows x cols bytes (0..255, row-major, one
/// after another) and their labels.
struct ImageSet {
  std::int64_t count = 0, rows = 0, cols = 0;
  std::vector<std::uint8_t> pixels;
  std::vector<std::int32_t> labels;
};

namespace detail {

class GzFile {
 public:
  explicit GzFile(const std::string& path) : path_(path), file_(gzopen(path.c_str(), "rb")) {
    MIXPREC_CHECK(file_ != nullptr, "fashion_mnist: cannot open ", path, " (", std::strerror(errno),
                  "); install the Debian package dataset-fashion-mnist or pass --data DIR");
  }
  ~GzFile() { gzclose(file_); }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  /// Exactly `bytes` bytes, or an error naming the file.
  void read(void* out, std::size_t bytes, const char* what) {
    std::size_t done = 0;
    while (done < bytes) {
      const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(bytes - done, 1u << 30));
      const int n = gzread(file_, static_cast<char*>(out) + done, chunk);
      int zerr = Z_OK;
      const char* msg = gzerror(file_, &zerr);
      MIXPREC_CHECK(n >= 0 && zerr == Z_OK, "fashion_mnist: ", path_, ": corrupt gzip data reading the ", what,
                    " (", msg, ")");
      MIXPREC_CHECK(n > 0, "fashion_mnist: ", path_, ": the file ends after ", done, " of the ", bytes,
                    " bytes of the ", what);
      done += static_cast<std::size_t>(n);
    }
  }
  std::uint32_t big_endian_u32(const char* what) {
    unsigned char b[4];
    read(b, 4, what);
    return (std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) | (std::uint32_t{b[2]} << 8) | b[3];
  }
  /// Errors unless nothing follows.
  void expect_end() {
    char c;
    MIXPREC_CHECK(gzread(file_, &c, 1) == 0, "fashion_mnist: ", path_, ": data after the last record");
  }

 private:
  std::string path_;
  gzFile file_;
};

}  // namespace detail

/// Reads `<dir>/<split>-images-idx3-ubyte.gz` and `<dir>/<split>-labels-idx1-ubyte.gz`,
/// split "train" or "t10k".
inline ImageSet load_fashion_mnist(const std::string& dir, const std::string& split) {
  MIXPREC_CHECK(split == "train" || split == "t10k", "fashion_mnist: split = \"", split,
                "\", must be \"train\" or \"t10k\"");
  ImageSet set;
  const std::string images = dir + "/" + split + "-images-idx3-ubyte.gz";
  const std::string labels = dir + "/" + split + "-labels-idx1-ubyte.gz";
  {
    detail::GzFile f(images);
    const std::uint32_t magic = f.big_endian_u32("header");
    MIXPREC_CHECK(magic == 2051, "fashion_mnist: ", images, ": magic number ", magic,
                  ", expected 2051 (IDX, unsigned bytes, 3 dimensions)");
    set.count = f.big_endian_u32("header");
    set.rows = f.big_endian_u32("header");
    set.cols = f.big_endian_u32("header");
    MIXPREC_CHECK(set.rows == 28 && set.cols == 28 && set.count > 0 && set.count <= 1000000, "fashion_mnist: ",
                  images, ": ", set.count, " images of ", set.rows, "x", set.cols, ", expected up to 10^6 of 28x28");
    set.pixels.resize(static_cast<std::size_t>(set.count * set.rows * set.cols));
    f.read(set.pixels.data(), set.pixels.size(), "pixels");
    f.expect_end();
  }
  {
    detail::GzFile f(labels);
    const std::uint32_t magic = f.big_endian_u32("header");
    MIXPREC_CHECK(magic == 2049, "fashion_mnist: ", labels, ": magic number ", magic,
                  ", expected 2049 (IDX, unsigned bytes, 1 dimension)");
    const std::int64_t count = f.big_endian_u32("header");
    MIXPREC_CHECK(count == set.count, "fashion_mnist: ", labels, " holds ", count, " labels, ", images, " holds ",
                  set.count, " images");
    std::vector<std::uint8_t> raw(static_cast<std::size_t>(count));
    f.read(raw.data(), raw.size(), "labels");
    f.expect_end();
    set.labels.resize(raw.size());
    for (std::size_t i = 0; i < raw.size(); ++i) {
      MIXPREC_CHECK(raw[i] < 10, "fashion_mnist: ", labels, ": label ", i, " is ", int{raw[i]}, ", must be 0..9");
      set.labels[i] = raw[i];
    }
  }
  return set;
}

}  // namespace mixprec::examples
