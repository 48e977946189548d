// SPDX-License-Identifier: Apache-2.0
// mixprec reads a safetensors file that Python wrote from PyTorch tensors
// (tests/io/safetensors_interop.py write-torch DIR): names, dtypes, shapes,
// metadata and every element's bits against DIR/torch_expected.json, which
// Python wrote from the same tensors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixprec/core/convert.hpp"
#include "mixprec/io/checkpoint.hpp"
#include "mixprec/io/safetensors.hpp"
#include "mixprec/optim/optimizers/sgd.hpp"

namespace mixprec::io {
namespace {

std::string g_dir;

/// Element i of t as its raw little-endian bits, zero-extended.
std::uint64_t element_bits(const SafetensorsFile& f, const TensorInfo& t, std::size_t i) {
  const std::size_t size = size_of(t.dtype);
  std::uint64_t bits = 0;
  std::memcpy(&bits, f.data(t) + i * size, size);  // little-endian host
  return bits;
}

/// The value of element bits of dtype d, decoded by mixprec's types.
double element_value(StDType d, std::uint64_t bits) {
  switch (d) {
    case StDType::F16: return to_float(from_bits<half>(static_cast<std::uint16_t>(bits)));
    case StDType::BF16: return to_float(from_bits<bfloat16>(static_cast<std::uint16_t>(bits)));
    case StDType::F32: {
      float x;
      const auto b = static_cast<std::uint32_t>(bits);
      std::memcpy(&x, &b, 4);
      return x;
    }
    case StDType::F64: {
      double x;
      std::memcpy(&x, &bits, 8);
      return x;
    }
    case StDType::I64: return static_cast<double>(static_cast<std::int64_t>(bits));
    default: return static_cast<double>(bits);
  }
}

TEST(SafetensorsInterop, ReadsWhatPyTorchWrote) {
  const std::string path = g_dir + "/torch.safetensors";
  std::ifstream in(g_dir + "/torch_expected.json");
  ASSERT_TRUE(in) << "no " << g_dir << "/torch_expected.json: run safetensors_interop.py write-torch first";
  const nlohmann::json expected = nlohmann::json::parse(in);
  std::printf("file written by: %s\n", expected["writer"].get<std::string>().c_str());

  const SafetensorsFile f = SafetensorsFile::read(path);
  EXPECT_EQ(f.metadata(), (expected["metadata"].get<std::map<std::string, std::string>>()));
  ASSERT_EQ(f.tensors().size(), expected["tensors"].size());
  std::size_t checked = 0;
  for (const auto& [name, e] : expected["tensors"].items()) {
    SCOPED_TRACE(name);
    const TensorInfo* t = f.find(name);
    ASSERT_NE(t, nullptr);
    EXPECT_STREQ(to_string(t->dtype), e["dtype"].get<std::string>().c_str());
    EXPECT_EQ(t->shape, e["shape"].get<std::vector<std::int64_t>>());
    const auto& bits = e["bits"];
    const auto& values = e["values"];
    ASSERT_EQ(static_cast<std::size_t>(t->numel()), bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i) {
      const std::uint64_t got = element_bits(f, *t, i);
      ASSERT_EQ(got, bits[i].get<std::uint64_t>()) << "element " << i;
      // Python's value of the element (null where it is not finite).
      if (!values[i].is_null()) {
        ASSERT_EQ(element_value(t->dtype, got), values[i].get<double>()) << "element " << i;
      }
      ++checked;
    }
  }
  EXPECT_GT(checked, 100u);
}

// io::load_weights on the file PyTorch wrote: an fp16 weight from F16
// (bits kept, infinities and the NaN included) and an fp32 weight from BF16
// (exact); the other tensors are ignored (allow_unused).
TEST(SafetensorsInterop, LoadWeightsFromWhatPyTorchWrote) {
  std::ifstream in(g_dir + "/torch_expected.json");
  ASSERT_TRUE(in) << "no " << g_dir << "/torch_expected.json: run safetensors_interop.py write-torch first";
  const nlohmann::json expected = nlohmann::json::parse(in);
  Tensor<half> w(Shape{10, 10}), gw(Shape{10, 10});
  Tensor<float> b(Shape{4, 12}), gb(Shape{4, 12});
  optim::SGD opt({{"fc1.weight", TensorRef(w), TensorRef(gw)}, {"fc1.bias", TensorRef(b), TensorRef(gb)}});
  // The file holds inf and NaN weights (to test the format's bits):
  // load_weights refuses them, naming the first, and changes nothing.
  try {
    load_weights(g_dir + "/torch.safetensors", opt, "model.", /*allow_unused=*/true);
    ADD_FAILURE() << "non-finite weights loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must be finite"), std::string::npos) << e.what();
  }
  // The same file with every non-finite value replaced by 0 loads, every
  // finite value's bits kept.
  const SafetensorsFile f = SafetensorsFile::read(g_dir + "/torch.safetensors");
  std::vector<std::vector<std::uint8_t>> data;
  SafetensorsWriter finite;
  for (const TensorInfo& t : f.tensors()) data.emplace_back(f.data(t), f.data(t) + t.nbytes());
  std::size_t k = 0;
  for (const TensorInfo& t : f.tensors()) {
    std::vector<std::uint8_t>& d = data[k++];
    if (t.dtype == StDType::F16) {
      for (std::size_t i = 0; i + 1 < d.size(); i += 2) {
        std::uint16_t u;
        std::memcpy(&u, &d[i], 2);
        if ((u & 0x7c00u) == 0x7c00u) std::memset(&d[i], 0, 2);
      }
    } else if (t.dtype == StDType::BF16) {
      for (std::size_t i = 0; i + 1 < d.size(); i += 2) {
        std::uint16_t u;
        std::memcpy(&u, &d[i], 2);
        if ((u & 0x7f80u) == 0x7f80u) std::memset(&d[i], 0, 2);
      }
    } else if (t.dtype == StDType::F64) {
      for (std::size_t i = 0; i + 7 < d.size(); i += 8) {
        double x;
        std::memcpy(&x, &d[i], 8);
        if (!std::isfinite(x)) std::memset(&d[i], 0, 8);
      }
    } else if (t.dtype == StDType::F32) {
      for (std::size_t i = 0; i + 3 < d.size(); i += 4) {
        float x;
        std::memcpy(&x, &d[i], 4);
        if (!std::isfinite(x)) std::memset(&d[i], 0, 4);
      }
    }
    finite.add(t.name, t.dtype, t.shape, d.data(), d.size());
  }
  finite.write(g_dir + "/torch_finite.safetensors");
  load_weights(g_dir + "/torch_finite.safetensors", opt, "model.", /*allow_unused=*/true);
  const auto& wbits = expected["tensors"]["model.fc1.weight"]["bits"];
  for (std::size_t i = 0; i < 100; ++i) {
    const auto want = static_cast<std::uint16_t>(wbits[i].get<std::uint64_t>());
    const float master = opt.master(0).data()[i];
    if (!std::isfinite(to_float(from_bits<half>(want)))) {
      EXPECT_EQ(master, 0.0f) << i;  // replaced above
      EXPECT_EQ(to_bits(w.data()[i]), 0u) << i;
    } else {
      ASSERT_EQ(to_bits(w.data()[i]), want) << "element " << i;
      ASSERT_EQ(to_bits(half(master)), want) << "element " << i;
    }
  }
  const auto& bvalues = expected["tensors"]["model.fc1.bias"]["values"];
  for (std::size_t i = 0; i < 48; ++i) {
    if (bvalues[i].is_null()) continue;  // not finite
    ASSERT_EQ(static_cast<double>(b.data()[i]), bvalues[i].get<double>()) << "element " << i;
    ASSERT_EQ(opt.master(1).data()[i], b.data()[i]) << "element " << i;
  }
}

}  // namespace
}  // namespace mixprec::io

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR (written by tests/io/safetensors_interop.py write-torch DIR)\n", argv[0]);
    return 2;
  }
  mixprec::io::g_dir = argv[1];
  return RUN_ALL_TESTS();
}
