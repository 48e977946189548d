// SPDX-License-Identifier: Apache-2.0
// The safetensors format layer: round trips, the writer's argument checks, a
// table of hostile files, truncations and byte flips of a valid file, and
// atomic writes (including a writer killed mid-write).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mixprec/core/convert.hpp"
#include "mixprec/io/safetensors.hpp"
#include "test_util.hpp"

namespace mixprec::io {
namespace {

using Bytes = std::vector<std::uint8_t>;

constexpr StDType kAllDTypes[] = {StDType::F16, StDType::BF16, StDType::F32,  StDType::F64,     StDType::I8,
                                  StDType::I16, StDType::I32,  StDType::I64,  StDType::U8,      StDType::U16,
                                  StDType::U32, StDType::U64,  StDType::BOOL, StDType::F8_E4M3, StDType::F8_E5M2};

Bytes random_bytes(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes out(n);
  for (auto& b : out) b = static_cast<std::uint8_t>(rng());
  return out;
}

/// A file whose header is exactly `json` (no padding) followed by
/// `data_bytes` bytes: the hostile files are written by hand, not by the
/// writer under test.
Bytes file_with_header(const std::string& json, std::size_t data_bytes = 0) {
  Bytes out(8);
  const std::uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
  out.insert(out.end(), json.begin(), json.end());
  out.resize(out.size() + data_bytes, 0xAB);
  return out;
}

std::uint64_t header_length(const Bytes& file) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[i];
  return n;
}

/// A scratch directory, removed with its contents at the end of the test.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/mixprec_st_XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    const char* made = ::mkdtemp(buf.data());
    if (made == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = made;
  }
  ~TempDir() {
    for (const std::string& name : list()) ::unlink((path_ + "/" + name).c_str());
    ::rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::vector<std::string> list() const {
    std::vector<std::string> names;
    if (DIR* d = ::opendir(path_.c_str())) {
      while (dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name != "." && name != "..") names.push_back(name);
      }
      ::closedir(d);
    }
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  std::string path_;
};

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

/// What every successfully parsed file must satisfy, whatever its bytes:
/// the ranges tile the data section in order, every tensor's size matches
/// its dtype and shape, and data() stays inside the buffer.
void expect_invariants(const SafetensorsFile& f) {
  const std::uint64_t data_start = 8 + header_length(f.bytes());
  ASSERT_LE(data_start, f.bytes().size());
  std::uint64_t covered = 0;
  for (const TensorInfo& t : f.tensors()) {
    EXPECT_EQ(t.begin, covered) << t.name;
    EXPECT_GE(t.numel(), 0);
    EXPECT_EQ(t.nbytes(), static_cast<std::uint64_t>(t.numel()) * size_of(t.dtype)) << t.name;
    EXPECT_EQ(f.data(t), f.bytes().data() + data_start + t.begin);
    EXPECT_EQ(f.find(t.name), &t);
    covered = t.end;
  }
  EXPECT_EQ(data_start + covered, f.bytes().size());
}

// --- round trips ----------------------------------------------------------------

TEST(SafetensorsDType, NamesAndSizes) {
  const char* names[] = {"F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64",
                         "U8",  "U16",  "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2"};
  const std::size_t sizes[] = {2, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 1, 1};
  for (std::size_t i = 0; i < std::size(kAllDTypes); ++i) {
    EXPECT_STREQ(to_string(kAllDTypes[i]), names[i]);
    EXPECT_EQ(size_of(kAllDTypes[i]), sizes[i]) << names[i];
    StDType parsed = StDType::BOOL;
    EXPECT_TRUE(st_dtype_from_string(names[i], parsed));
    EXPECT_EQ(parsed, kAllDTypes[i]);
  }
  StDType untouched = StDType::I8;
  EXPECT_FALSE(st_dtype_from_string("f32", untouched));  // case matters in the format
  EXPECT_FALSE(st_dtype_from_string("float32", untouched));
  EXPECT_EQ(untouched, StDType::I8);
  EXPECT_EQ(st_dtype(DType::float16), StDType::F16);
  EXPECT_EQ(st_dtype(DType::bfloat16), StDType::BF16);
  EXPECT_EQ(st_dtype(DType::float32), StDType::F32);
  EXPECT_EQ(st_dtype(dtype_of<half>), st_dtype_of<half>::value);
}

TEST(Safetensors, RoundTripEveryDType) {
  SafetensorsWriter writer;
  std::vector<Bytes> payloads;
  std::vector<std::vector<std::int64_t>> shapes;
  for (std::size_t i = 0; i < std::size(kAllDTypes); ++i) {
    // Shapes of different ranks, including a scalar and an empty tensor.
    std::vector<std::int64_t> shape = i == 0 ? std::vector<std::int64_t>{}
                                      : i == 1 ? std::vector<std::int64_t>{3, 0, 2}
                                               : std::vector<std::int64_t>{static_cast<std::int64_t>(i), 3};
    std::int64_t numel = 1;
    for (auto d : shape) numel *= d;
    Bytes data = random_bytes(static_cast<std::size_t>(numel) * size_of(kAllDTypes[i]), 100 + i);
    if (kAllDTypes[i] == StDType::BOOL) {
      for (auto& b : data) b &= 1;
    }
    payloads.push_back(std::move(data));
    shapes.push_back(shape);
  }
  for (std::size_t i = 0; i < std::size(kAllDTypes); ++i) {
    writer.add(std::string("t_") + to_string(kAllDTypes[i]), kAllDTypes[i], shapes[i], payloads[i].data(),
               payloads[i].size());
  }
  EXPECT_EQ(writer.size(), std::size(kAllDTypes));

  TempDir dir;
  writer.write(dir.file("all.safetensors"));
  const Bytes in_memory = writer.serialize();
  EXPECT_EQ(read_file(dir.file("all.safetensors")), in_memory);

  for (const SafetensorsFile& f :
       {SafetensorsFile::parse(in_memory, "mem"), SafetensorsFile::read(dir.file("all.safetensors"))}) {
    ASSERT_EQ(f.tensors().size(), std::size(kAllDTypes));
    expect_invariants(f);
    for (std::size_t i = 0; i < std::size(kAllDTypes); ++i) {
      const TensorInfo& t = f.at(std::string("t_") + to_string(kAllDTypes[i]));
      EXPECT_EQ(t.dtype, kAllDTypes[i]);
      EXPECT_EQ(t.shape, shapes[i]);
      ASSERT_EQ(t.nbytes(), payloads[i].size());
      EXPECT_TRUE(payloads[i].empty() || std::memcmp(f.data(t), payloads[i].data(), payloads[i].size()) == 0)
          << t.name;
    }
  }
  EXPECT_EQ(SafetensorsFile::read(dir.file("all.safetensors")).source(), dir.file("all.safetensors"));
  EXPECT_EQ(SafetensorsFile::parse(in_memory).source(), "<memory>");
}

TEST(Safetensors, TypedValuesKeepTheBits) {
  // F16 and BF16 elements are the bits of mixprec::half and bfloat16.
  const std::vector<half> h = {half(1.0f), half(-2.5f), half(65504.0f), half(6.1035156e-05f)};
  const std::vector<bfloat16> b = {bfloat16(1.0f), bfloat16(-3.0e38f), bfloat16(1.0e-38f)};
  const std::vector<float> x = {0.1f, -0.0f, 3.4e38f};
  const std::vector<std::int64_t> i = {-1, INT64_MAX, INT64_MIN};
  SafetensorsWriter writer;
  writer.add("h", {2, 2}, h.data(), h.size());
  writer.add("b", {3}, b.data(), b.size());
  writer.add("x", {3}, x.data(), x.size());
  writer.add("i", {1, 3}, i.data(), i.size());
  const SafetensorsFile f = SafetensorsFile::parse(writer.serialize());
  const std::vector<half> h2 = f.values<half>(f.at("h"));
  ASSERT_EQ(h2.size(), h.size());
  for (std::size_t k = 0; k < h.size(); ++k) EXPECT_EQ(to_bits(h2[k]), to_bits(h[k]));
  // 1.0 in binary16 and bfloat16, read as raw little-endian bytes.
  EXPECT_EQ(f.data(f.at("h"))[0], 0x00);
  EXPECT_EQ(f.data(f.at("h"))[1], 0x3C);
  EXPECT_EQ(f.data(f.at("b"))[0], 0x80);
  EXPECT_EQ(f.data(f.at("b"))[1], 0x3F);
  const std::vector<bfloat16> b2 = f.values<bfloat16>(f.at("b"));
  for (std::size_t k = 0; k < b.size(); ++k) EXPECT_EQ(to_bits(b2[k]), to_bits(b[k]));
  const std::vector<float> x2 = f.values<float>(f.at("x"));
  EXPECT_EQ(std::memcmp(x2.data(), x.data(), x.size() * 4), 0);
  EXPECT_EQ(f.values<std::int64_t>(f.at("i")), i);
  test::expect_error([&] { f.values<float>(f.at("h")); }, {"\"h\"", "is F16, not F32"});
  float small[1];
  test::expect_error([&] { f.copy_to(f.at("x"), small, sizeof small); }, {"\"x\"", "has 12 bytes"});
}

TEST(Safetensors, Metadata) {
  SafetensorsWriter writer;
  const float w[2] = {1.0f, 2.0f};
  writer.add("w", StDType::F32, {2}, w, sizeof w);
  writer.set_metadata("format", "pt");
  writer.set_metadata("step", "1");
  writer.set_metadata("step", "1200");  // replaces
  writer.set_metadata("unicode \xc3\xa9\xe2\x82\xac", "quote \" backslash \\ newline \n tab \t");
  writer.set_metadata("", "");
  const SafetensorsFile f = SafetensorsFile::parse(writer.serialize());
  const std::map<std::string, std::string> expected = {{"format", "pt"},
                                                       {"step", "1200"},
                                                       {"unicode \xc3\xa9\xe2\x82\xac",
                                                        "quote \" backslash \\ newline \n tab \t"},
                                                       {"", ""}};
  EXPECT_EQ(f.metadata(), expected);

  // No metadata: no "__metadata__" key at all, and an empty map on reading.
  SafetensorsWriter plain;
  plain.add("w", StDType::F32, {2}, w, sizeof w);
  const Bytes bytes = plain.serialize();
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_length(bytes)));
  EXPECT_EQ(header.find("__metadata__"), std::string::npos) << header;
  EXPECT_TRUE(SafetensorsFile::parse(bytes).metadata().empty());

  test::expect_error([&] { writer.set_metadata("bad\xff", "v"); }, {"set_metadata", "not valid UTF-8"});
  test::expect_error([&] { writer.set_metadata("k", "\xc0\xaf"); }, {"set_metadata", "\"k\"", "not valid UTF-8"});
}

TEST(Safetensors, HeaderIsPaddedAndTensorsAligned) {
  // Names of every length mod 8 make the unpadded header length vary.
  for (int extra = 0; extra < 8; ++extra) {
    SafetensorsWriter writer;
    const std::uint8_t u8[3] = {1, 2, 3};
    const std::uint16_t u16[3] = {4, 5, 6};
    const double f64[1] = {7.0};
    const std::uint32_t u32[1] = {8};
    // Added smallest first: the writer must still put larger elements first.
    writer.add("a" + std::string(static_cast<std::size_t>(extra), 'x'), {3}, u8, 3);
    writer.add("b", {3}, u16, 3);
    writer.add("c", {1}, f64, 1);
    writer.add("d", {1}, u32, 1);
    const Bytes bytes = writer.serialize();
    const std::uint64_t n = header_length(bytes);
    EXPECT_EQ(n % 8, 0u) << "extra " << extra;
    const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    EXPECT_EQ(header.front(), '{');
    const std::size_t close = header.rfind('}');
    ASSERT_NE(close, std::string::npos);
    EXPECT_LT(header.size() - close - 1, 8u);
    for (std::size_t k = close + 1; k < header.size(); ++k) EXPECT_EQ(header[k], ' ') << "padding byte " << k;
    const SafetensorsFile f = SafetensorsFile::parse(bytes);
    ASSERT_EQ(f.tensors().size(), 4u);
    EXPECT_EQ(f.tensors()[0].name, "c");  // F64
    EXPECT_EQ(f.tensors()[1].name, "d");  // U32
    EXPECT_EQ(f.tensors()[2].name, "b");  // U16
    for (const TensorInfo& t : f.tensors()) {
      EXPECT_EQ((8 + n + t.begin) % size_of(t.dtype), 0u) << t.name << " is misaligned in the file";
    }
  }
}

TEST(Safetensors, EmptyFileAndEmptyTensors) {
  SafetensorsWriter writer;
  const SafetensorsFile empty = SafetensorsFile::parse(writer.serialize());
  EXPECT_TRUE(empty.tensors().empty());
  EXPECT_EQ(empty.find("x"), nullptr);
  writer.add("zero", StDType::F32, {0, 5}, nullptr, 0);
  writer.add("scalar", StDType::I32, {}, "\x01\x02\x03\x04", 4);
  writer.add("zero2", StDType::F64, {7, 0}, nullptr, 0);
  const SafetensorsFile f = SafetensorsFile::parse(writer.serialize());
  expect_invariants(f);
  EXPECT_EQ(f.at("zero").numel(), 0);
  EXPECT_EQ(f.at("scalar").numel(), 1);
  EXPECT_EQ(f.at("scalar").shape, std::vector<std::int64_t>{});
  EXPECT_EQ(std::memcmp(f.data(f.at("scalar")), "\x01\x02\x03\x04", 4), 0);
}

TEST(Safetensors, LookupErrorsNameTensorAndFile) {
  SafetensorsWriter writer;
  const float w[1] = {1.0f};
  writer.add("w", StDType::F32, {1}, w, sizeof w);
  const SafetensorsFile f = SafetensorsFile::parse(writer.serialize(), "ckpt.safetensors");
  EXPECT_EQ(f.find("missing"), nullptr);
  test::expect_error([&] { f.at("missing"); }, {"ckpt.safetensors", "\"missing\""});
  TensorInfo foreign = f.at("w");
  foreign.end = 1000;
  test::expect_error([&] { f.data(foreign); }, {"ckpt.safetensors", "\"w\"", "[0, 1000]", "not inside"});
}

// --- the writer's checks --------------------------------------------------------

TEST(SafetensorsWriter, RejectsBadArgumentsBeforeAnyChange) {
  SafetensorsWriter writer;
  const float w[4] = {1, 2, 3, 4};
  writer.add("w", StDType::F32, {2, 2}, w, sizeof w);
  const Bytes before = writer.serialize();
  test::expect_error([&] { writer.add("", StDType::F32, {4}, w, sizeof w); }, {"name is empty"});
  test::expect_error([&] { writer.add("__metadata__", StDType::F32, {4}, w, sizeof w); }, {"__metadata__", "reserved"});
  test::expect_error([&] { writer.add("w", StDType::F32, {4}, w, sizeof w); }, {"\"w\"", "already added"});
  test::expect_error([&] { writer.add("v", StDType::F32, {2, 3}, w, sizeof w); },
                     {"\"v\"", "bytes = 16", "[2, 3]", "needs 24"});
  test::expect_error([&] { writer.add("v", StDType::F16, {2, 2}, w, sizeof w); }, {"\"v\"", "F16", "needs 8"});
  test::expect_error([&] { writer.add("v", StDType::F32, {4, -1}, w, sizeof w); }, {"\"v\"", "shape[1] = -1", ">= 0"});
  test::expect_error([&] { writer.add("v", StDType::U8, {1 << 30, 1 << 30, 1 << 30}, w, sizeof w); },
                     {"\"v\"", "more elements than fit in int64"});
  test::expect_error([&] { writer.add("v", StDType::F64, {std::int64_t{1} << 62}, w, sizeof w); },
                     {"\"v\"", "more than 2^64 bytes"});
  test::expect_error([&] { writer.add("v", StDType::F32, {4}, nullptr, 16); }, {"\"v\"", "data is null"});
  test::expect_error([&] { writer.add("bad\xfe", StDType::F32, {4}, w, sizeof w); }, {"not valid UTF-8"});
  EXPECT_EQ(writer.size(), 1u);
  EXPECT_EQ(writer.serialize(), before);
  // A name that failed stays free.
  writer.add("v", StDType::F32, {4}, w, sizeof w);
  EXPECT_EQ(writer.size(), 2u);
}

// --- hostile files ---------------------------------------------------------------

struct Hostile {
  const char* what;
  Bytes bytes;
  std::vector<const char*> expect;  // fragments of the message
};

std::vector<Hostile> hostile_files() {
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  auto entry = [](const std::string& fields) { return R"({"w":{)" + fields + "}}"; };
  Bytes huge_length(16, 0);
  huge_length[7] = 0x80;  // 2^63
  Bytes over_limit = file_with_header("{}");
  const std::uint64_t limit_plus = kSafetensorsMaxHeaderBytes + 1;
  for (int i = 0; i < 8; ++i) over_limit[i] = static_cast<std::uint8_t>(limit_plus >> (8 * i));
  Bytes too_long = file_with_header("{}", 10);
  too_long[0] = 0xE8;  // 1000
  too_long[1] = 0x03;
  Bytes zero_length = file_with_header("{}");
  zero_length[0] = 0;
  std::string deep(50, '[');
  std::string many = R"({"w":{"dtype":"U8","shape":[)";
  for (int i = 0; i < 2000; ++i) many += i == 0 ? "1" : ",1";
  many += R"(],"data_offsets":[0,1]}})";

  return {
      {"empty file", {}, {"is 0 bytes", "shorter than the 8-byte header length"}},
      {"5 bytes", {1, 2, 3, 4, 5}, {"is 5 bytes"}},
      {"length 2^63", huge_length, {"header length 9223372036854775808", "exceeds the limit of 100000000"}},
      {"length over the limit", over_limit, {"header length 100000001", "exceeds the limit"}},
      {"length past the end", too_long, {"header length 1000", "exceeds the 12 bytes", "file size 20"}},
      {"length 0", zero_length, {"header length 0", "too short"}},
      {"invalid UTF-8 byte", file_with_header("{\"w\xff\":1}"), {"not valid UTF-8", "byte 3 of the header"}},
      {"overlong UTF-8", file_with_header("{\"\xc0\xaf\":1}"), {"not valid UTF-8", "byte 2"}},
      {"UTF-8 surrogate", file_with_header("{\"\xed\xa0\x80\":1}"), {"not valid UTF-8"}},
      {"truncated UTF-8", file_with_header("{\"\xe2\x82"), {"not valid UTF-8"}},
      {"not JSON", file_with_header("{abc}"), {"not valid JSON"}},
      {"trailing garbage", file_with_header("{} x"), {"not valid JSON"}},
      // nlohmann's lexer alone would stop at the NUL and accept these.
      {"NUL padding", file_with_header(std::string("{}\0\0", 4)), {"not valid JSON", "NUL byte at byte 2"}},
      {"data hidden after a NUL",
       file_with_header(std::string("{}") + '\0' + R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1),
       {"NUL byte at byte 2"}},
      {"comment", file_with_header("/**/{}"), {"not valid JSON"}},
      {"lone surrogate escape", file_with_header(R"({"\ud800":1})"), {"not valid JSON"}},
      {"number overflow", file_with_header(R"({"w":1e999})"), {"not valid JSON"}},
      {"top-level array", file_with_header("[1, 2]"), {"must be a JSON object, got array"}},
      {"top-level number", file_with_header("42"), {"must be a JSON object, got number"}},
      {"top-level string", file_with_header(R"("w")"), {"must be a JSON object, got string"}},
      {"entry not an object", file_with_header(R"({"w":5})"), {"tensor \"w\"", "must be an object, got number"}},
      {"entry is an array", file_with_header(R"({"w":[]})"), {"tensor \"w\"", "got array"}},
      {"missing dtype", file_with_header(entry(R"("shape":[2],"data_offsets":[0,8])"), 8),
       {"tensor \"w\"", "missing field \"dtype\""}},
      {"missing shape", file_with_header(entry(R"("dtype":"F32","data_offsets":[0,8])"), 8),
       {"missing field \"shape\""}},
      {"missing data_offsets", file_with_header(entry(R"("dtype":"F32","shape":[2])"), 8),
       {"missing field \"data_offsets\""}},
      {"unknown field", file_with_header(entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,8],"offsets":[0,8])"), 8),
       {"tensor \"w\"", "unknown field \"offsets\""}},
      {"dtype not a string", file_with_header(entry(R"("dtype":4,"shape":[2],"data_offsets":[0,8])"), 8),
       {"dtype must be a string, got number"}},
      {"unknown dtype", file_with_header(entry(R"("dtype":"F17","shape":[2],"data_offsets":[0,8])"), 8),
       {"tensor \"w\"", "unknown dtype \"F17\""}},
      {"lower-case dtype", file_with_header(entry(R"("dtype":"f32","shape":[2],"data_offsets":[0,8])"), 8),
       {"unknown dtype \"f32\""}},
      {"shape not an array", file_with_header(entry(R"("dtype":"F32","shape":2,"data_offsets":[0,8])"), 8),
       {"shape must be an array, got number"}},
      {"fractional dim", file_with_header(entry(R"("dtype":"F32","shape":[2.0],"data_offsets":[0,8])"), 8),
       {"shape[0] must be an integer"}},
      {"string dim", file_with_header(entry(R"("dtype":"F32","shape":["2"],"data_offsets":[0,8])"), 8),
       {"shape[0] must be an integer, got string"}},
      {"negative dim", file_with_header(entry(R"("dtype":"F32","shape":[2,-3],"data_offsets":[0,8])"), 8),
       {"tensor \"w\"", "shape[1] = -3, must be >= 0"}},
      {"dim past int64",
       file_with_header(entry(R"("dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8])"), 8),
       {"shape[0] = 9223372036854775808", "does not fit in int64"}},
      {"element count overflow",
       file_with_header(entry(R"("dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,8])"), 8),
       {"shape [4294967296,4294967296]", "more elements than fit in int64"}},
      {"byte count overflow",
       file_with_header(entry(R"("dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8])"), 8),
       {"F64 shape [4611686018427387904]", "more than 2^64 bytes"}},
      {"one offset", file_with_header(entry(R"("dtype":"F32","shape":[2],"data_offsets":[8])"), 8),
       {"data_offsets must be an array of 2 integers, got [8]"}},
      {"offsets not an array", file_with_header(entry(R"("dtype":"F32","shape":[2],"data_offsets":"0-8")"), 8),
       {"data_offsets must be an array of 2 integers"}},
      {"negative offset", file_with_header(entry(R"("dtype":"F32","shape":[2],"data_offsets":[-8,0])"), 8),
       {"data_offsets[0] = -8"}},
      {"fractional offset", file_with_header(entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,8.5])"), 8),
       {"data_offsets[1] = 8.5"}},
      {"begin after end", file_with_header(entry(R"("dtype":"F32","shape":[1],"data_offsets":[8,4])"), 8),
       {"data_offsets [8, 4]", "begin after they end"}},
      {"size mismatch", file_with_header(entry(R"("dtype":"F32","shape":[2],"data_offsets":[0,4])"), 4),
       {"tensor \"w\"", "data_offsets [0, 4] hold 4 bytes", "F32 shape [2] needs 8"}},
      {"past the data section", file_with_header(ok, 4), {"data_offsets [0, 8]", "run past the end", "of 4 bytes"}},
      {"offsets near 2^64",
       file_with_header(entry(R"("dtype":"U8","shape":[8],"data_offsets":[18446744073709551608,18446744073709551615])"), 8),
       {"run past the end"}},
      {"overlap",
       file_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       {"tensor \"b\" data_offsets [4, 12] overlap tensor \"a\""}},
      {"alias",
       file_with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", 4),
       {"overlap"}},
      {"gap",
       file_with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
       {"gap in the data section", "bytes [4, 8)", "before tensor \"b\""}},
      {"gap at the start", file_with_header(entry(R"("dtype":"F32","shape":[1],"data_offsets":[4,8])"), 8),
       {"gap", "bytes [0, 4)"}},
      {"trailing bytes", file_with_header(ok, 12), {"4 trailing bytes", "data section is 12 bytes"}},
      {"data without tensors", file_with_header("{}", 3), {"3 trailing bytes"}},
      {"duplicate tensor",
       file_with_header(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
       {"duplicate key \"w\" in the header"}},
      {"duplicate field", file_with_header(entry(R"("dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8])"), 8),
       {"duplicate key \"dtype\"", "entry of \"w\""}},
      {"duplicate __metadata__", file_with_header(R"({"__metadata__":{},"__metadata__":{}})"),
       {"duplicate key \"__metadata__\""}},
      {"metadata not an object", file_with_header(R"({"__metadata__":["a"]})"),
       {"__metadata__ must be an object of strings, got array"}},
      {"metadata value a number", file_with_header(R"({"__metadata__":{"step":3}})"),
       {"__metadata__ \"step\" must be a string, got number"}},
      {"metadata value nested", file_with_header(R"({"__metadata__":{"k":{}}})"),
       {"__metadata__ \"k\" must be a string, got object"}},
      {"nesting in shape", file_with_header(entry(R"("dtype":"F32","shape":[[2]],"data_offsets":[0,8])"), 8),
       {"nests deeper than 3 levels", "entry of \"w\""}},
      {"nesting bomb", file_with_header(deep), {"nests deeper than 3 levels"}},
      {"long array", file_with_header(many, 1), {"more than 1024 elements", "entry of \"w\""}},
      {"control byte in name", file_with_header("{\"a\x01\":5}"), {"not valid JSON"}},
      {"escaped control in name", file_with_header(R"({"a\u0001":5})"), {"tensor \"a\\x01\"", "got number"}},
  };
}

TEST(SafetensorsHostile, EachGetsAClearError) {
  const auto cases = hostile_files();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].what);
    const std::string source = "hostile-" + std::to_string(i) + ".safetensors";
    try {
      SafetensorsFile::parse(cases[i].bytes, source);
      ADD_FAILURE() << "parsed";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find("safetensors file '" + source + "'"), std::string::npos) << message;
      for (const char* fragment : cases[i].expect) {
        EXPECT_NE(message.find(fragment), std::string::npos) << "message \"" << message << "\" lacks \"" << fragment << "\"";
      }
    }
  }
}

TEST(SafetensorsHostile, LongNamesAreCutInMessages) {
  const std::string name(5000, 'n');
  const Bytes bytes = file_with_header("{\"" + name + "\":1}");
  test::expect_error([&] { SafetensorsFile::parse(bytes); }, {"...(5000 bytes)", "got number"});
  try {
    SafetensorsFile::parse(bytes);
  } catch (const Error& e) {
    EXPECT_LT(std::string(e.what()).size(), 300u);
  }
}

TEST(SafetensorsHostile, ReadChecksLengthBeforeLoading) {
  TempDir dir;
  test::expect_error([&] { SafetensorsFile::read(dir.file("absent.safetensors")); },
                     {"absent.safetensors", "cannot open"});
  test::expect_error([&] { SafetensorsFile::read(dir.path()); }, {"not a regular file"});
  // A header length beyond the end is refused from the first 8 bytes.
  Bytes bad = file_with_header("{}", 0);
  bad[3] = 1;
  write_file(dir.file("bad.safetensors"), bad);
  test::expect_error([&] { SafetensorsFile::read(dir.file("bad.safetensors")); },
                     {"bad.safetensors", "header length 16777218 exceeds the 2 bytes"});
}

/// A valid file with several dtypes, metadata and an empty tensor.
Bytes valid_file() {
  static const Bytes a = random_bytes(6 * 4, 7), b = random_bytes(5 * 2, 8), c = random_bytes(3, 9);
  SafetensorsWriter writer;
  writer.add("layer.weight", StDType::F32, {2, 3}, a.data(), a.size());
  writer.add("layer.bias", StDType::BF16, {5}, b.data(), b.size());
  writer.add("mask", StDType::U8, {3}, c.data(), c.size());
  writer.add("empty", StDType::F64, {0}, nullptr, 0);
  writer.set_metadata("format", "pt");
  return writer.serialize();
}

TEST(SafetensorsHostile, EveryTruncationThrows) {
  const Bytes full = valid_file();
  expect_invariants(SafetensorsFile::parse(full));
  for (std::size_t len = 0; len < full.size(); ++len) {
    const Bytes prefix(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
    EXPECT_THROW(SafetensorsFile::parse(prefix, "truncated"), Error) << "length " << len << " of " << full.size();
  }
  Bytes longer = full;
  longer.push_back(0);
  test::expect_error([&] { SafetensorsFile::parse(longer); }, {"1 trailing bytes"});
}

TEST(SafetensorsHostile, ByteFlipsNeverCrash) {
  // Flips anywhere: in the length, the JSON (names, numbers, structure) and
  // the data. Data flips parse; most header flips do not. Either way the
  // only outcomes allowed are a valid file or a mixprec::Error.
  const Bytes full = valid_file();
  const std::size_t header_end = 8 + static_cast<std::size_t>(header_length(full));
  std::mt19937_64 rng(2024);
  int parsed = 0, rejected = 0, header_parsed = 0;
  for (int iteration = 0; iteration < 20000; ++iteration) {
    Bytes bytes = full;
    const int flips = 1 + static_cast<int>(rng() % 4);
    bool header_touched = false;
    for (int k = 0; k < flips; ++k) {
      // Half the flips aim at the header, where the parser lives.
      const std::size_t at = rng() % 2 == 0 ? rng() % header_end : rng() % bytes.size();
      header_touched |= at < header_end;
      if (rng() % 2 == 0) {
        bytes[at] ^= static_cast<std::uint8_t>(1u << (rng() % 8));
      } else {
        bytes[at] = static_cast<std::uint8_t>(rng());
      }
    }
    try {
      const SafetensorsFile f = SafetensorsFile::parse(bytes, "flipped");
      expect_invariants(f);
      ++parsed;
      header_parsed += header_touched;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("flipped"), std::string::npos) << e.what();
      ++rejected;
    }
  }
  // Both outcomes must have happened, or the test exercised nothing.
  EXPECT_GT(parsed, 100);
  EXPECT_GT(rejected, 1000);
  RecordProperty("parsed", parsed);
  RecordProperty("rejected", rejected);
  RecordProperty("parsed_with_header_flips", header_parsed);
}

// --- atomic writes ---------------------------------------------------------------

SafetensorsWriter small_writer(const std::vector<float>& values) {
  SafetensorsWriter writer;
  writer.add("w", StDType::F32, {static_cast<std::int64_t>(values.size())}, values.data(), values.size() * 4);
  return writer;
}

TEST(SafetensorsWrite, MissingDirectoryThrowsAndLeavesNothing) {
  TempDir dir;
  const std::vector<float> v = {1, 2, 3};
  const SafetensorsWriter writer = small_writer(v);
  test::expect_error([&] { writer.write(dir.file("no/such/dir/x.safetensors")); },
                     {"cannot create the temporary file", "x.safetensors", "No such file or directory"});
  EXPECT_TRUE(dir.list().empty());
  test::expect_error([&] { writer.write(""); }, {"path is empty"});
  test::expect_error([&] { writer.write(dir.path() + "/"); }, {"names a directory"});
}

TEST(SafetensorsWrite, ReplacesAnExistingFile) {
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  const std::vector<float> first = {1, 2, 3}, second = {4, 5, 6, 7, 8};
  small_writer(first).write(path);
  EXPECT_EQ(SafetensorsFile::read(path).values<float>(SafetensorsFile::read(path).at("w")), first);
  small_writer(second).write(path);
  const SafetensorsFile f = SafetensorsFile::read(path);
  EXPECT_EQ(f.values<float>(f.at("w")), second);
  EXPECT_EQ(read_file(path), small_writer(second).serialize());
  EXPECT_EQ(dir.list(), std::vector<std::string>{"ckpt.safetensors"});  // no temporary file left
  // Relative paths write into the current directory's file system too.
  const std::string cwd_before = [] {
    char buf[4096];
    return std::string(::getcwd(buf, sizeof buf));
  }();
  ASSERT_EQ(::chdir(dir.path().c_str()), 0);
  small_writer(first).write("relative.safetensors");
  ASSERT_EQ(::chdir(cwd_before.c_str()), 0);
  EXPECT_EQ(read_file(dir.file("relative.safetensors")), small_writer(first).serialize());
}

TEST(SafetensorsWrite, PathThatIsADirectoryIsUntouched) {
  TempDir dir;
  ASSERT_EQ(::mkdir(dir.file("sub").c_str(), 0755), 0);
  const std::vector<float> v = {1, 2, 3};
  test::expect_error([&] { small_writer(v).write(dir.file("sub")); }, {"cannot rename", "sub"});
  EXPECT_EQ(dir.list(), std::vector<std::string>{"sub"});  // the temporary file was removed
  ::rmdir(dir.file("sub").c_str());
}

TEST(SafetensorsWrite, FailedWriteRemovesTheTemporaryFile) {
  // A file size limit makes write() fail with EFBIG halfway through the
  // data, in a child process so that the limit does not outlive the test.
  TempDir dir;
  const std::string path = dir.file("ckpt.safetensors");
  const std::vector<float> old_values = {1, 2, 3};
  small_writer(old_values).write(path);
  const Bytes old_bytes = read_file(path);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    rlimit limit{1 << 20, 1 << 20};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(2);
    const std::vector<float> big(1 << 20, 0.5f);  // 4 MiB
    try {
      small_writer(big).write(path);
    } catch (const Error& e) {
      ::_exit(std::string(e.what()).find("File too large") != std::string::npos ? 0 : 3);
    }
    ::_exit(4);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "3: another error, 4: no error";
  EXPECT_EQ(read_file(path), old_bytes);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"ckpt.safetensors"});
}

/// The temporary files of `path` in `dir`: "<name>.tmp-<pid>-<n>".
std::vector<std::string> temp_files(const TempDir& dir, const std::string& name) {
  std::vector<std::string> out;
  for (const std::string& f : dir.list()) {
    if (f.rfind(name + ".tmp-", 0) == 0) out.push_back(f);
  }
  return out;
}

TEST(SafetensorsWrite, KilledWriterLeavesThePreviousFile) {
  TempDir dir;
  const std::string name = "ckpt.safetensors";
  const std::string path = dir.file(name);
  const Bytes old_payload = random_bytes(1 << 20, 99);
  SafetensorsWriter old_writer;
  old_writer.add("w", StDType::U8, {1 << 20}, old_payload.data(), old_payload.size());
  old_writer.set_metadata("generation", "old");
  old_writer.write(path);
  const Bytes old_bytes = read_file(path);

  constexpr std::size_t kBig = std::size_t{256} << 20;
  // Kill as soon as the temporary file has data, then well into the data.
  for (const std::uint64_t kill_at : {std::uint64_t{1}, std::uint64_t{kBig / 2}}) {
    SCOPED_TRACE("killed once the temporary file had " + std::to_string(kill_at) + " bytes");
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // The 256 MiB exist only in the child.
      std::vector<std::uint8_t> big(kBig, 0x5A);
      SafetensorsWriter writer;
      writer.add("w", StDType::U8, {static_cast<std::int64_t>(kBig)}, big.data(), big.size());
      writer.set_metadata("generation", "new");
      try {
        for (;;) writer.write(path);
      } catch (...) {
        ::_exit(1);
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    std::uint64_t seen = 0;
    std::string temp;
    while (std::chrono::steady_clock::now() < deadline) {
      const auto temps = temp_files(dir, name);
      if (!temps.empty()) {
        struct stat st {};
        if (::stat(dir.file(temps[0]).c_str(), &st) == 0 && static_cast<std::uint64_t>(st.st_size) >= kill_at) {
          seen = static_cast<std::uint64_t>(st.st_size);
          temp = temps[0];
          break;
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    ::kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    ASSERT_GE(seen, kill_at) << "the writer's temporary file never reached the size";

    // The killed writer's first write never reached its rename: `path` is
    // the old file, bit for bit, and still parses.
    EXPECT_EQ(read_file(path), old_bytes);
    const SafetensorsFile f = SafetensorsFile::read(path);
    EXPECT_EQ(f.metadata().at("generation"), "old");
    EXPECT_EQ(std::memcmp(f.data(f.at("w")), old_payload.data(), old_payload.size()), 0);
    // A crash leaves its temporary file behind; the reader never looks at
    // it, and the next write does not collide with it.
    EXPECT_FALSE(temp_files(dir, name).empty());
    for (const std::string& t : temp_files(dir, name)) ::unlink(dir.file(t).c_str());
  }
  EXPECT_EQ(dir.list(), std::vector<std::string>{name});
}

}  // namespace
}  // namespace mixprec::io
