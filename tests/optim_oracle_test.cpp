// SPDX-License-Identifier: Apache-2.0
// Replays the cases written by tests/oracle/make_trajectories.py (PyTorch's
// optimizers on the CPU) through mixprec's optimizers and GradScaler, and
// compares, at every step: the scale, every skip decision, the lr, and the
// fp32 masters (within torch's fp32 tolerance, rtol 1.3e-6 and atol 1e-5).
//
//   optim_oracle_test ORACLE_DIR [gtest flags]
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "mixprec/mixprec.hpp"

namespace mixprec {
namespace {

std::string g_dir;

struct Case {
  std::vector<std::vector<std::string>> lines;  // config lines, split on spaces
  std::map<std::string, std::pair<std::string, std::pair<std::size_t, std::size_t>>> arrays;
  std::vector<char> blob;

  static Case load(const std::string& name) {
    Case c;
    std::ifstream txt(g_dir + "/" + name + ".txt");
    MIXPREC_CHECK(txt.good(), "oracle: cannot read ", g_dir, "/", name, ".txt");
    std::string line;
    while (std::getline(txt, line)) {
      std::istringstream in(line);
      std::vector<std::string> words;
      for (std::string w; in >> w;) words.push_back(w);
      if (words.empty()) continue;
      if (words[0] == "array") {
        c.arrays[words[1]] = {words[2], {std::stoull(words[3]), std::stoull(words[4])}};
      } else {
        c.lines.push_back(words);
      }
    }
    std::ifstream bin(g_dir + "/" + name + ".bin", std::ios::binary);
    c.blob.assign(std::istreambuf_iterator<char>(bin), {});
    return c;
  }

  // key=value pairs of a config line.
  static std::map<std::string, std::string> kv(const std::vector<std::string>& words) {
    std::map<std::string, std::string> out;
    for (const auto& w : words) {
      const auto eq = w.find('=');
      if (eq != std::string::npos) out[w.substr(0, eq)] = w.substr(eq + 1);
    }
    return out;
  }
  const std::vector<std::string>& line(const std::string& head) const {
    for (const auto& l : lines) {
      if (l[0] == head) return l;
    }
    detail::throw_error("oracle: no '", head, "' line");
  }

  template <class T>
  std::vector<T> get(const std::string& name) const {
    const auto it = arrays.find(name);
    MIXPREC_CHECK(it != arrays.end(), "oracle: no array ", name);
    const auto [count, offset] = it->second.second;
    std::vector<T> out(count);
    // An empty array has no storage: memcpy to its null data() is UB, even of 0 bytes.
    if (count != 0) std::memcpy(out.data(), blob.data() + offset, count * sizeof(T));
    return out;
  }
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, sep);) out.push_back(item);
  return out;
}

double num(const std::map<std::string, std::string>& m, const std::string& k, double fallback) {
  const auto it = m.find(k);
  return it == m.end() ? fallback : std::stod(it->second);
}

// The options of one group, from its config line over the optimizer's
// defaults (every key the script writes is read here).
template <class Options>
Options group_options(const std::map<std::string, std::string>& m) {
  Options o;
  o.lr = num(m, "lr", o.lr);
  o.weight_decay = num(m, "weight_decay", o.weight_decay);
  o.maximize = num(m, "maximize", 0) != 0;
  if constexpr (std::is_same_v<Options, optim::SGDOptions>) {
    o.momentum = num(m, "momentum", 0);
    o.dampening = num(m, "dampening", 0);
    o.nesterov = num(m, "nesterov", 0) != 0;
  } else if constexpr (std::is_same_v<Options, optim::RMSpropOptions>) {
    o.alpha = num(m, "alpha", o.alpha);
    o.eps = num(m, "eps", o.eps);
    o.momentum = num(m, "momentum", 0);
    o.centered = num(m, "centered", 0) != 0;
  } else {
    o.betas = {num(m, "beta1", o.betas[0]), num(m, "beta2", o.betas[1])};
    o.eps = num(m, "eps", o.eps);
    o.amsgrad = num(m, "amsgrad", 0) != 0;
  }
  return o;
}

// A user's model: weight and grad buffers of one dtype per parameter.
template <class T>
struct Model {
  std::map<std::string, Tensor<T>> weight, grad;
};

template <class Opt>
std::unique_ptr<optim::Optimizer> make_optimizer(const Case& c, int k,
                                                 const std::vector<std::vector<optim::Param>>& groups) {
  using Options = typename Opt::options_type;
  std::vector<Options> options;
  for (const auto& l : c.lines) {
    if ((l[0] == "optimizer" || l[0] == "group") && std::stoi(l[1]) == k) {
      options.push_back(group_options<Options>(Case::kv(l)));
    }
  }
  auto opt = std::make_unique<Opt>(groups[0], options[0]);
  for (std::size_t g = 1; g < groups.size(); ++g) opt->add_param_group(groups[g], options[g]);
  return opt;
}

template <class T>
void run_case(const std::string& name) {
  const Case c = Case::load(name);
  const auto run = Case::kv(c.line("run"));
  const int steps = std::stoi(run.at("steps"));
  const int accumulate = std::stoi(run.at("accumulate"));
  const double clip = num(run, "clip", 0);

  Model<T> model;
  std::vector<std::string> names;
  for (const auto& [key, entry] : c.arrays) {
    if (key.rfind("init/", 0) != 0) continue;
    const std::string p = key.substr(5);
    names.push_back(p);
    const auto init = c.get<T>(key);
    Shape shape({static_cast<std::int64_t>(init.size())});
    model.weight.emplace(p, Tensor<T>(shape));
    model.grad.emplace(p, Tensor<T>(shape));
    std::copy(init.begin(), init.end(), model.weight.at(p).data());
  }

  // Optimizers and their groups, as the case lists them.
  std::vector<std::unique_ptr<optim::Optimizer>> opts;
  for (const auto& l : c.lines) {
    if (l[0] != "optimizer") continue;
    const int k = std::stoi(l[1]);
    std::vector<std::vector<optim::Param>> groups;
    for (const auto& g : c.lines) {
      if ((g[0] == "optimizer" || g[0] == "group") && std::stoi(g[1]) == k) {
        groups.emplace_back();
        for (const auto& p : split(Case::kv(g).at("params"), ',')) {
          groups.back().push_back({p, model.weight.at(p), model.grad.at(p)});
        }
      }
    }
    const std::string kind = l[2];
    if (kind == "sgd") opts.push_back(make_optimizer<optim::SGD>(c, k, groups));
    if (kind == "adam") opts.push_back(make_optimizer<optim::Adam>(c, k, groups));
    if (kind == "adamw") opts.push_back(make_optimizer<optim::AdamW>(c, k, groups));
    if (kind == "rmsprop") opts.push_back(make_optimizer<optim::RMSprop>(c, k, groups));
  }
  ASSERT_FALSE(opts.empty());
  if (run.count("schedule")) {
    const auto s = split(run.at("schedule"), ':');
    optim::LRSchedule schedule;
    if (s[0] == "linear_warmup") schedule = optim::LRSchedule::linear_warmup(std::stoll(s[1]), std::stod(s[2]));
    if (s[0] == "cosine") schedule = optim::LRSchedule::cosine(std::stoll(s[1]), std::stod(s[2]));
    if (s[0] == "step_decay") schedule = optim::LRSchedule::step_decay(std::stoll(s[1]), std::stod(s[2]));
    for (auto& o : opts) o->set_schedule(schedule);
  }

  const auto sc = Case::kv(c.line("scaler"));
  amp::GradScalerOptions so = amp::GradScalerOptions::for_dtype(dtype_of<T>);
  const std::string mode = sc.at("mode");
  so.mode = mode == "dynamic" ? amp::ScalingMode::dynamic
            : mode == "static_scale" ? amp::ScalingMode::static_scale
                                     : amp::ScalingMode::disabled;
  so.init_scale = num(sc, "init_scale", so.init_scale);
  so.growth_interval = static_cast<std::int64_t>(num(sc, "growth_interval", 2000));
  amp::GradScaler scaler(so);

  const auto want_scale = c.get<float>("scale");
  const auto want_lr = c.get<double>("lr");
  std::vector<std::vector<std::uint8_t>> want_applied;
  for (std::size_t k = 0; k < opts.size(); ++k) {
    want_applied.push_back(c.get<std::uint8_t>("applied/" + std::to_string(k)));
  }
  std::map<std::string, std::vector<float>> want_master;
  for (const auto& p : names) want_master[p] = c.get<float>("master/" + p);

  double worst = 0;  // largest |diff| / (atol + rtol |want|) seen
  int skipped = 0;
  for (int step = 0; step < steps; ++step) {
    // The user's backward: scaled gradients, accumulated in the model dtype.
    for (const auto& p : names) {
      Tensor<T>& g = model.grad.at(p);
      fill(g, 0.0f);
      for (int j = 0; j < accumulate; ++j) {
        const auto micro = c.get<T>("grad/" + std::to_string(step) + "/" + std::to_string(j) + "/" + p);
        for (std::size_t e = 0; e < micro.size(); ++e) {
          g.data()[e] = from_float<T>(to_float(g.data()[e]) + to_float(micro[e]));
        }
      }
    }
    ASSERT_EQ(scaler.scale(), want_scale[step]) << name << " step " << step;
    ASSERT_NEAR(opts[0]->lr(0), want_lr[step], 1e-12 * want_lr[step]) << name << " step " << step;
    for (std::size_t k = 0; k < opts.size(); ++k) {
      const bool applied = clip > 0 ? scaler.step(*opts[k], clip) : scaler.step(*opts[k]);
      ASSERT_EQ(applied, want_applied[k][step] != 0) << name << " optimizer " << k << " step " << step;
      skipped += k == 0 && !applied;
    }
    scaler.update();
    for (const auto& opt : opts) {
      for (std::size_t i = 0; i < opt->num_params(); ++i) {
        const std::string& p = opt->param(i).name;
        const float* have = opt->master(i).data();
        const auto n = opt->master(i).numel();
        const float* want = want_master[p].data() + static_cast<std::size_t>(step) * n;
        for (std::int64_t e = 0; e < n; ++e) {
          const double tol = 1e-5 + 1.3e-6 * std::fabs(want[e]);
          const double err = std::fabs(static_cast<double>(have[e]) - want[e]);
          worst = std::max(worst, err / tol);
          ASSERT_LE(err, tol) << name << " step " << step << " " << p << "[" << e << "]: mixprec "
                              << have[e] << ", torch " << want[e];
          // The model weight is the master rounded to nearest even.
          ASSERT_EQ(to_bits(model.weight.at(p).data()[e]), to_bits(from_float<T>(have[e])));
        }
      }
    }
  }
  ::testing::Test::RecordProperty("worst_error_over_tolerance", std::to_string(worst));
  std::printf("%-28s %2d skipped, final scale %-8g worst |err|/tol %.3g\n", name.c_str(), skipped,
              static_cast<double>(scaler.scale()), worst);
  EXPECT_GT(skipped, 0) << "every case injects non-finite gradients";
}

class OracleCase : public ::testing::Test {
 public:
  explicit OracleCase(std::string name) : name_(std::move(name)) {}
  void TestBody() override {
    if (name_.find("float16") != std::string::npos && name_.find("bfloat16") == std::string::npos) {
      run_case<half>(name_);
    } else if (name_.find("bfloat16") != std::string::npos) {
      run_case<bfloat16>(name_);
    } else {
      run_case<float>(name_);
    }
  }

 private:
  std::string name_;
};

}  // namespace
}  // namespace mixprec

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s ORACLE_DIR (written by tests/oracle/make_trajectories.py)\n", argv[0]);
    return 2;
  }
  mixprec::g_dir = argv[1];
  std::ifstream cases(mixprec::g_dir + "/cases.txt");
  if (!cases) {
    std::fprintf(stderr, "no %s/cases.txt: run tests/oracle/make_trajectories.py first\n", argv[1]);
    return 1;
  }
  int count = 0;
  for (std::string name; std::getline(cases, name);) {
    if (name.empty() || name[0] == '#') continue;
    ++count;
    ::testing::RegisterTest("Oracle", name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
                            [name]() -> ::testing::Test* { return new mixprec::OracleCase(name); });
  }
  if (count < 50) {
    std::fprintf(stderr, "only %d oracle cases in %s/cases.txt\n", count, argv[1]);
    return 1;
  }
  return RUN_ALL_TESTS();
}
