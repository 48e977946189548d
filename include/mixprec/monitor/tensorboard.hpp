// SPDX-License-Identifier: Apache-2.0
// TensorBoard event files written without TensorFlow or protobuf: the
// TFRecord framing (length, masked CRC32C of the length, data, masked
// CRC32C of the data) around Event messages encoded by hand, holding
// scalars (Summary.Value.simple_value) and histograms (HistogramProto).
#pragma once

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "mixprec/core/config.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/monitor/record.hpp"

MIXPREC_NAMESPACE_BEGIN namespace monitor {

namespace detail {

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses.
inline std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc = 0) {
  static const auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) != 0 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

/// TFRecord's masked CRC: rotate right by 15, add a constant.
inline std::uint32_t masked_crc32c(const void* data, std::size_t n) {
  const std::uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mixprec/monitor/tensorboard.hpp writes little-endian fixed-width fields; this host is big-endian"
#endif

/// The protobuf wire format, the parts an Event needs (little-endian hosts).
class Proto {
 public:
  const std::string& bytes() const { return out_; }
  void varint(std::uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<char>((v & 0x7F) | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<char>(v));
  }
  void key(int field, int wire_type) { varint(static_cast<std::uint64_t>(field) << 3 | static_cast<unsigned>(wire_type)); }
  void double_field(int field, double v) {
    key(field, 1);
    raw(&v, 8);
  }
  void float_field(int field, float v) {
    key(field, 5);
    raw(&v, 4);
  }
  void int64_field(int field, std::int64_t v) {
    key(field, 0);
    varint(static_cast<std::uint64_t>(v));
  }
  void bytes_field(int field, const std::string& v) {
    key(field, 2);
    varint(v.size());
    out_ += v;
  }
  void packed_doubles(int field, const std::vector<double>& v) {
    key(field, 2);
    varint(v.size() * 8);
    for (double d : v) raw(&d, 8);
  }

 private:
  void raw(const void* p, std::size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string out_;
};

}  // namespace detail

/// A histogram as TensorBoard draws it: bucket i holds counts[i] values in
/// (limits[i - 1], limits[i]], the first from -inf.
struct TensorBoardHistogram {
  double min = 0, max = 0, num = 0, sum = 0, sum_squares = 0;
  std::vector<double> limits, counts;
};

/// The exponent histogram of a gradient (Bins) as a histogram of
/// floor(log2 |g|) over its finite nonzero elements: bin e counts the
/// values with exponent e, drawn in (e - 1, e]. Zeros and non-finite
/// elements are left out (the monitor writes their shares as scalars).
inline TensorBoardHistogram exponent_histogram(const Histogram& h) {
  TensorBoardHistogram t;
  bool any = false;
  for (int b = 1; b < Bins::nonfinite; ++b) {
    const double n = static_cast<double>(h[static_cast<std::size_t>(b)]);
    const double e = Bins::lower_exponent(b);
    t.limits.push_back(e);
    t.counts.push_back(n);
    if (n == 0) continue;
    if (!any || e < t.min) t.min = e;
    if (!any || e > t.max) t.max = e;
    any = true;
    t.num += n;
    t.sum += n * e;
    t.sum_squares += n * e * e;
  }
  return t;
}

/// One TensorBoard event file in `log_dir` (created if missing), named
/// events.out.tfevents.SECONDS.HOST.PID.mixprec (Unix time, host name,
/// process id), opened at construction with its file_version record.
/// Records are appended as they come and reach the file at flush() and
/// destruction (and whenever the C library's buffer fills). Errors name the
/// file and the system's reason.
class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const std::string& log_dir) {
    MIXPREC_CHECK(!log_dir.empty(), "TensorBoardWriter: log_dir is empty");
    std::error_code ec;
    std::filesystem::create_directories(log_dir, ec);
    MIXPREC_CHECK(!ec, "TensorBoardWriter: cannot create the directory '", log_dir, "': ", ec.message());
    char host[256] = "localhost";
    if (::gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "localhost");
    host[sizeof host - 1] = '\0';
    const auto secs = std::chrono::duration_cast<std::chrono::seconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
    path_ = (std::filesystem::path(log_dir) / ("events.out.tfevents." + std::to_string(secs) + "." + host + "." +
                                                std::to_string(static_cast<long>(::getpid())) + ".mixprec"))
                .string();
    file_ = std::fopen(path_.c_str(), "wb");
    MIXPREC_CHECK(file_ != nullptr, "TensorBoardWriter: cannot open '", path_, "': ", std::strerror(errno));
    detail::Proto e;
    e.double_field(1, now());
    e.bytes_field(3, "brain.Event:2");  // Event.file_version
    record(e.bytes());
  }
  ~TensorBoardWriter() {
    if (file_ != nullptr) std::fclose(file_);
  }
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  const std::string& path() const { return path_; }

  /// A scalar (Summary.Value.simple_value, a float) at `step`.
  void add_scalar(const std::string& tag, double value, std::int64_t step) {
    detail::Proto v;
    v.bytes_field(1, tag);                           // Value.tag
    v.float_field(2, static_cast<float>(value));     // Value.simple_value
    write_summary(v.bytes(), step);
  }

  /// A histogram (Summary.Value.histo) at `step`. limits and counts must
  /// have the same length.
  void add_histogram(const std::string& tag, const TensorBoardHistogram& h, std::int64_t step) {
    MIXPREC_CHECK(h.limits.size() == h.counts.size(), "TensorBoardWriter::add_histogram: \"", tag, "\": ",
                  h.limits.size(), " limits but ", h.counts.size(), " counts");
    detail::Proto p;  // HistogramProto
    p.double_field(1, h.min);
    p.double_field(2, h.max);
    p.double_field(3, h.num);
    p.double_field(4, h.sum);
    p.double_field(5, h.sum_squares);
    p.packed_doubles(6, h.limits);
    p.packed_doubles(7, h.counts);
    detail::Proto v;
    v.bytes_field(1, tag);
    v.bytes_field(5, p.bytes());  // Value.histo
    write_summary(v.bytes(), step);
  }

  /// Hands what was written so far to the file.
  void flush() {
    MIXPREC_CHECK(std::fflush(file_) == 0, "TensorBoardWriter: writing '", path_, "' failed: ", std::strerror(errno));
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  }
  void write_summary(const std::string& value, std::int64_t step) {
    detail::Proto summary;
    summary.bytes_field(1, value);  // Summary.value (repeated; one here)
    detail::Proto e;
    e.double_field(1, now());      // Event.wall_time
    e.int64_field(2, step);        // Event.step
    e.bytes_field(5, summary.bytes());  // Event.summary
    record(e.bytes());
  }
  // One TFRecord: u64 length, masked crc of those 8 bytes, the data, masked crc of the data.
  void record(const std::string& data) {
    const std::uint64_t n = data.size();
    const std::uint32_t length_crc = detail::masked_crc32c(&n, 8), data_crc = detail::masked_crc32c(data.data(), n);
    const bool ok = std::fwrite(&n, 8, 1, file_) == 1 && std::fwrite(&length_crc, 4, 1, file_) == 1 &&
                    (n == 0 || std::fwrite(data.data(), n, 1, file_) == 1) &&
                    std::fwrite(&data_crc, 4, 1, file_) == 1;
    MIXPREC_CHECK(ok, "TensorBoardWriter: writing '", path_, "' failed: ", std::strerror(errno));
  }

  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace monitor
MIXPREC_NAMESPACE_END
