// SPDX-License-Identifier: Apache-2.0
// Writes a safetensors file with mixprec from a JSON description, for
// tests/io/safetensors_interop.py, which makes the description and checks
// the file with its own parser, numpy, PyTorch and (where installed) the
// safetensors package:
//   safetensors_interop_write SPEC.json OUT.safetensors
// SPEC: {"metadata": {k: v}, "tensors": [{"name", "dtype": F16|BF16|F32|I64,
// "shape": [...], "values": [...]}]}; the floats are exact in their dtype.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixprec/core/convert.hpp"
#include "mixprec/io/safetensors.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SPEC.json OUT.safetensors\n", argv[0]);
    return 2;
  }
  try {
    std::ifstream in(argv[1]);
    if (!in) {
      std::fprintf(stderr, "cannot open %s\n", argv[1]);
      return 2;
    }
    const nlohmann::json spec = nlohmann::json::parse(in);
    // The writer holds pointers: keep every buffer alive until write().
    std::vector<std::vector<mixprec::half>> halves;
    std::vector<std::vector<mixprec::bfloat16>> bfloats;
    std::vector<std::vector<float>> floats;
    std::vector<std::vector<std::int64_t>> ints;
    halves.reserve(spec["tensors"].size());
    bfloats.reserve(spec["tensors"].size());
    floats.reserve(spec["tensors"].size());
    ints.reserve(spec["tensors"].size());
    mixprec::io::SafetensorsWriter writer;
    for (const auto& t : spec["tensors"]) {
      const std::string name = t["name"];
      const std::string dtype = t["dtype"];
      const auto shape = t["shape"].get<std::vector<std::int64_t>>();
      const auto& values = t["values"];
      if (dtype == "F16") {
        auto& v = halves.emplace_back();
        for (const auto& x : values) v.push_back(mixprec::from_float<mixprec::half>(x.get<float>()));
        writer.add(name, shape, v.data(), v.size());
      } else if (dtype == "BF16") {
        auto& v = bfloats.emplace_back();
        for (const auto& x : values) v.push_back(mixprec::from_float<mixprec::bfloat16>(x.get<float>()));
        writer.add(name, shape, v.data(), v.size());
      } else if (dtype == "F32") {
        auto& v = floats.emplace_back();
        for (const auto& x : values) v.push_back(x.get<float>());
        writer.add(name, shape, v.data(), v.size());
      } else if (dtype == "I64") {
        auto& v = ints.emplace_back();
        for (const auto& x : values) v.push_back(x.get<std::int64_t>());
        writer.add(name, shape, v.data(), v.size());
      } else {
        std::fprintf(stderr, "unsupported dtype %s\n", dtype.c_str());
        return 2;
      }
    }
    for (const auto& [k, v] : spec["metadata"].items()) writer.set_metadata(k, v.get<std::string>());
    writer.write(argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "safetensors_interop_write: %s\n", e.what());
    return 1;
  }
  return 0;
}
