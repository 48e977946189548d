// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for SafetensorsFile::parse (scripts/fuzz.sh runs it): any
// input must either parse into a file that satisfies the format's invariants
// and survives a write-and-read round trip, or throw mixprec::Error. A crash,
// a sanitizer report, another exception or a broken invariant is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "mixprec/io/safetensors.hpp"

namespace {

using mixprec::io::SafetensorsFile;
using mixprec::io::SafetensorsWriter;
using mixprec::io::TensorInfo;

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "safetensors_fuzz: invariant broken: %s\n", what);
  std::abort();
}

void check(bool ok, const char* what) {
  if (!ok) finding(what);
}

void check_file(const SafetensorsFile& f) {
  const std::vector<std::uint8_t>& bytes = f.bytes();
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  const std::uint64_t data_start = 8 + n;
  check(data_start <= bytes.size(), "header inside the file");
  std::uint64_t covered = 0;
  unsigned sum = 0;
  for (const TensorInfo& t : f.tensors()) {
    check(t.begin == covered, "tensors tile the data section in order");
    check(t.numel() >= 0, "numel >= 0");
    check(t.nbytes() == static_cast<std::uint64_t>(t.numel()) * mixprec::io::size_of(t.dtype), "size matches");
    check(f.find(t.name) == &t, "find returns the tensor");
    const std::uint8_t* p = f.data(t);
    // Touch every byte: AddressSanitizer reports any that lies outside.
    for (std::uint64_t i = 0; i < t.nbytes(); ++i) sum += p[i];
    covered = t.end;
  }
  check(data_start + covered == bytes.size(), "no trailing bytes");
  if (sum == 0xFFFFFFFFu) std::fputc(' ', stderr);  // keep the reads
}

/// Writes f again with SafetensorsWriter and parses the result: the same
/// tensors, bytes and metadata must come back.
void round_trip(const SafetensorsFile& f) {
  SafetensorsWriter writer;
  for (const TensorInfo& t : f.tensors()) {
    if (t.name.empty()) return;  // valid in a file, refused by the writer
    writer.add(t.name, t.dtype, t.shape, f.data(t), static_cast<std::size_t>(t.nbytes()));
  }
  for (const auto& [k, v] : f.metadata()) writer.set_metadata(k, v);
  const SafetensorsFile g = SafetensorsFile::parse(writer.serialize(), "round trip");
  check(g.tensors().size() == f.tensors().size(), "round trip: tensor count");
  check(g.metadata() == f.metadata(), "round trip: metadata");
  for (const TensorInfo& t : f.tensors()) {
    const TensorInfo* u = g.find(t.name);
    check(u != nullptr, "round trip: tensor present");
    check(u->dtype == t.dtype && u->shape == t.shape && u->nbytes() == t.nbytes(), "round trip: dtype and shape");
    check(t.nbytes() == 0 || std::memcmp(g.data(*u), f.data(t), static_cast<std::size_t>(t.nbytes())) == 0,
          "round trip: bytes");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<SafetensorsFile> f;
  try {
    f.emplace(SafetensorsFile::parse(std::vector<std::uint8_t>(data, data + size), "fuzz input"));
  } catch (const mixprec::Error&) {
    return 0;  // the expected answer to a bad file; any other exception escapes to libFuzzer
  }
  // Once parsed, even mixprec::Error is a finding: data(), the writer and the
  // second parse must all accept what the first parse accepted.
  try {
    check_file(*f);
    round_trip(*f);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "safetensors_fuzz: a parsed file then failed: %s\n", e.what());
    std::abort();
  }
  return 0;
}
