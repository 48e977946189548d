// SPDX-License-Identifier: Apache-2.0
// TensorBoard event files (monitor/tensorboard.hpp) read back by a reader
// written here, on its own: the CRC-32C against RFC 3720's test vectors,
// every record's two masked CRCs, the Event / Summary / HistogramProto
// fields decoded from the protobuf wire format; and the monitor's file and
// callback against the records it made. (tensorboard_read.py reads the same
// kind of file with TensorBoard's own reader where TensorBoard is installed.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "mixprec/mixprec.hpp"
#include "mixprec/monitor/tensorboard.hpp"
#include "test_util.hpp"

namespace mixprec {
namespace {

namespace fs = std::filesystem;

// --- an independent reader ----------------------------------------------------

// CRC-32C bit by bit, straight from the definition (no table).
std::uint32_t crc32c_bitwise(const std::string& s) {
  std::uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char c : s) {
    crc ^= c;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}
std::uint32_t masked(std::uint32_t c) { return ((c >> 15) | (c << 17)) + 0xA282EAD8u; }

struct Field {
  int number = 0, wire = 0;
  std::uint64_t varint = 0;
  std::string bytes;  // wire type 2; 1 and 5: the raw 8 or 4 bytes
};

std::vector<Field> parse(const std::string& m) {
  std::vector<Field> out;
  std::size_t at = 0;
  auto varint = [&] {
    std::uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (at >= m.size()) throw std::runtime_error("truncated varint");
      const auto b = static_cast<unsigned char>(m[at++]);
      v |= static_cast<std::uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return v;
    }
  };
  while (at < m.size()) {
    Field f;
    const std::uint64_t key = varint();
    f.number = static_cast<int>(key >> 3);
    f.wire = static_cast<int>(key & 7);
    if (f.wire == 0) {
      f.varint = varint();
    } else if (f.wire == 1 || f.wire == 5) {
      const std::size_t n = f.wire == 1 ? 8 : 4;
      f.bytes = m.substr(at, n);
      at += n;
    } else if (f.wire == 2) {
      const std::size_t n = varint();
      f.bytes = m.substr(at, n);
      at += n;
    } else {
      throw std::runtime_error("wire type " + std::to_string(f.wire));
    }
    if (at > m.size()) throw std::runtime_error("truncated field");
    out.push_back(std::move(f));
  }
  return out;
}
double as_double(const std::string& b) {
  double d;
  std::memcpy(&d, b.data(), 8);
  return d;
}
float as_float(const std::string& b) {
  float f;
  std::memcpy(&f, b.data(), 4);
  return f;
}

struct Histo {
  double min = 0, max = 0, num = 0, sum = 0, sum_squares = 0;
  std::vector<double> limits, counts;
};
struct Read {
  std::string file_version;
  std::map<std::string, std::vector<std::pair<std::int64_t, float>>> scalars;  // tag -> (step, value)
  std::map<std::string, std::vector<std::pair<std::int64_t, Histo>>> histos;
  int records = 0;
};

// Reads a whole event file, checking both CRCs of every record.
Read read_events(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Read r;
  std::size_t at = 0;
  while (at < all.size()) {
    EXPECT_LE(at + 12, all.size()) << "a truncated record header";
    std::uint64_t n;
    std::memcpy(&n, all.data() + at, 8);
    std::uint32_t length_crc, data_crc;
    std::memcpy(&length_crc, all.data() + at + 8, 4);
    EXPECT_EQ(length_crc, masked(crc32c_bitwise(all.substr(at, 8)))) << "record " << r.records;
    const std::string data = all.substr(at + 12, n);
    std::memcpy(&data_crc, all.data() + at + 12 + n, 4);
    EXPECT_EQ(data_crc, masked(crc32c_bitwise(data))) << "record " << r.records;
    at += 12 + n + 4;
    r.records += 1;
    std::int64_t step = 0;
    for (const Field& f : parse(data)) {
      if (f.number == 2 && f.wire == 0) step = static_cast<std::int64_t>(f.varint);
      if (f.number == 3 && f.wire == 2) r.file_version = f.bytes;
    }
    for (const Field& f : parse(data)) {
      if (f.number != 5) continue;  // Event.summary
      for (const Field& v : parse(f.bytes)) {
        EXPECT_EQ(v.number, 1);  // Summary.value
        std::string tag;
        for (const Field& x : parse(v.bytes)) {
          if (x.number == 1) tag = x.bytes;
        }
        for (const Field& x : parse(v.bytes)) {
          if (x.number == 2 && x.wire == 5) r.scalars[tag].push_back({step, as_float(x.bytes)});
          if (x.number == 5 && x.wire == 2) {
            Histo h;
            for (const Field& y : parse(x.bytes)) {
              if (y.wire == 1) {
                const double d = as_double(y.bytes);
                (y.number == 1 ? h.min : y.number == 2 ? h.max : y.number == 3 ? h.num : y.number == 4 ? h.sum
                                                                                                  : h.sum_squares) = d;
              } else if (y.number == 6 || y.number == 7) {
                std::vector<double>& v6 = y.number == 6 ? h.limits : h.counts;
                for (std::size_t k = 0; k + 8 <= y.bytes.size(); k += 8) v6.push_back(as_double(y.bytes.substr(k, 8)));
              }
            }
            r.histos[tag].push_back({step, h});
          }
        }
      }
    }
  }
  return r;
}

std::string the_event_file(const fs::path& dir) {
  std::string found;
  int count = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().find("tfevents") != std::string::npos) {
      found = e.path().string();
      count += 1;
    }
  }
  EXPECT_EQ(count, 1) << "event files in " << dir;
  return found;
}

fs::path fresh_dir(const char* name) {
  const fs::path d = fs::path(test::temp_path(name));
  fs::remove_all(d);
  return d;
}

// --- tests ----------------------------------------------------------------

TEST(TensorBoard, Crc32cMatchesRfc3720) {
  EXPECT_EQ(monitor::detail::crc32c("123456789", 9), 0xE3069283u);
  const std::string zeros(32, '\0'), ones(32, '\xFF');
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending.push_back(static_cast<char>(i));
  EXPECT_EQ(monitor::detail::crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(monitor::detail::crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(monitor::detail::crc32c(ascending.data(), 32), 0x46DD794Eu);
  EXPECT_EQ(monitor::detail::masked_crc32c(ascending.data(), 32), masked(crc32c_bitwise(ascending)));
}

TEST(TensorBoard, ScalarsAndHistogramsReadBack) {
  const fs::path dir = fresh_dir("tb_scalars");
  std::string path;
  {
    monitor::TensorBoardWriter w(dir.string());
    path = w.path();
    EXPECT_NE(fs::path(path).filename().string().find("events.out.tfevents."), std::string::npos);
    for (int s = 0; s < 300; ++s) w.add_scalar("loss", 1.0 / (s + 1), s);  // 300: varints of 2 bytes
    w.add_scalar("a/b", -3.25, 1LL << 40);
    monitor::TensorBoardHistogram h;
    h.min = -3;
    h.max = 5;
    h.num = 7;
    h.sum = 11;
    h.sum_squares = 29;
    h.limits = {-3, 0, 5};
    h.counts = {2, 4, 1};
    w.add_histogram("h", h, 12);
  }  // closed: everything is in the file
  const Read r = read_events(path);
  EXPECT_EQ(r.file_version, "brain.Event:2");
  EXPECT_EQ(r.records, 1 + 300 + 1 + 1);
  ASSERT_EQ(r.scalars.at("loss").size(), 300u);
  for (int s = 0; s < 300; ++s) {
    EXPECT_EQ(r.scalars.at("loss")[s].first, s);
    EXPECT_EQ(r.scalars.at("loss")[s].second, static_cast<float>(1.0 / (s + 1)));
  }
  EXPECT_EQ(r.scalars.at("a/b")[0].first, 1LL << 40);
  EXPECT_EQ(r.scalars.at("a/b")[0].second, -3.25f);
  const Histo& h = r.histos.at("h")[0].second;
  EXPECT_EQ(r.histos.at("h")[0].first, 12);
  EXPECT_EQ(h.min, -3);
  EXPECT_EQ(h.max, 5);
  EXPECT_EQ(h.num, 7);
  EXPECT_EQ(h.sum, 11);
  EXPECT_EQ(h.sum_squares, 29);
  EXPECT_EQ(h.limits, (std::vector<double>{-3, 0, 5}));
  EXPECT_EQ(h.counts, (std::vector<double>{2, 4, 1}));
}

TEST(TensorBoard, ExponentHistogramCountsFiniteNonzeroElements) {
  monitor::Histogram bins{};
  bins[monitor::Bins::zero] = 5;
  bins[monitor::Bins::nonfinite] = 2;
  bins[monitor::Bins::of(0.75f)] = 3;  // exponent -1
  bins[monitor::Bins::of(6.0f)] = 1;   // exponent 2
  const monitor::TensorBoardHistogram h = monitor::exponent_histogram(bins);
  EXPECT_EQ(h.num, 4);
  EXPECT_EQ(h.min, -1);
  EXPECT_EQ(h.max, 2);
  EXPECT_EQ(h.sum, 3 * -1 + 2);
  EXPECT_EQ(h.sum_squares, 3 * 1 + 4);
  EXPECT_EQ(h.limits.size(), h.counts.size());
}

TEST(TensorBoard, AnUnusableDirectoryIsAClearError) {
  const fs::path file = fs::path(test::temp_path("tb_not_a_dir"));
  { std::ofstream(file.string()) << "x"; }
  test::expect_error([&] { monitor::TensorBoardWriter w((file / "sub").string()); },
                     {"TensorBoardWriter", "tb_not_a_dir"});
}

// The monitor's file and callback: every step's loss and scale, each
// logged step's per-parameter figures and histograms, the same numbers as
// the records it made.
TEST(TensorBoard, TheMonitorWritesWhatItRecords) {
  const fs::path dir = fresh_dir("tb_monitor");
  std::vector<half> w1(64, half(0.5f)), g1(64, half(0.01f)), w2(32, half(0.5f)), g2(32, half(0.01f));
  optim::AdamW opt({{"first", TensorView<half>(w1.data(), {64}), TensorView<half>(g1.data(), {64})},
                    {"second", TensorView<half>(w2.data(), {32}), TensorView<half>(g2.data(), {32})}},
                   optim::AdamWOptions{});
  amp::GradScaler scaler;
  monitor::MonitorOptions mo;
  mo.every = 5;
  mo.warnings = false;
  mo.tensorboard_dir = dir.string();
  std::vector<monitor::LogRecord> seen;
  int events_seen = 0;
  mo.on_record = [&](const monitor::LogRecord& r, const std::vector<monitor::Event>& e, const monitor::Forecast&) {
    seen.push_back(r);
    events_seen += static_cast<int>(e.size());
  };
  {
    monitor::Monitor mon(opt, scaler, mo);
    for (int s = 1; s <= 20; ++s) {
      g2[5] = s == 7 ? half(std::numeric_limits<float>::infinity()) : half(0.01f * s);
      mon.step(static_cast<float>(3.0 / s));
    }
    EXPECT_EQ(mon.records(), 4);
    EXPECT_EQ(static_cast<int>(mon.events().size()), events_seen);
  }
  ASSERT_EQ(seen.size(), 4u);
  const Read r = read_events(the_event_file(dir));
  std::vector<std::pair<std::int64_t, float>> want_loss, want_scale;
  for (const monitor::LogRecord& rec : seen) {
    for (const monitor::StepSample& s : rec.steps) {
      want_loss.push_back({s.step, static_cast<float>(s.loss)});
      want_scale.push_back({s.step, static_cast<float>(s.scale)});
    }
  }
  EXPECT_EQ(r.scalars.at("loss"), want_loss);
  EXPECT_EQ(r.scalars.at("loss_scale"), want_scale);
  ASSERT_EQ(r.scalars.at("skipped").size(), 20u);
  EXPECT_EQ(r.scalars.at("skipped")[6].second, 1.0f);  // step 7
  EXPECT_EQ(r.scalars.at("grad_norm").size(), 19u);    // the skipped step's norm is not a number
  for (std::size_t k = 0; k < seen.size(); ++k) {
    const std::int64_t step = seen[k].last().step;
    EXPECT_EQ(r.scalars.at("grad_norm/first")[k], (std::pair<std::int64_t, float>{step, static_cast<float>(
                                                                                        seen[k].params[0].grad_norm)}));
    const Histo& h = r.histos.at("grad_exponent/second")[k].second;
    double n = 0;
    for (double c : h.counts) n += c;
    EXPECT_EQ(n, h.num);
    EXPECT_EQ(r.histos.at("grad_exponent/second")[k].first, step);
  }
  EXPECT_EQ(r.histos.at("grad_exponent").size(), 4u);
}

}  // namespace
}  // namespace mixprec
