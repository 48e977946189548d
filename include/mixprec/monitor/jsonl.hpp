// SPDX-License-Identifier: Apache-2.0
// The instability monitor's JSONL log (docs/monitor.md): the header and
// record lines as JSON text, with no JSON library, and a writer that appends
// them to a file one flushed line at a time.
#pragma once

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <clocale>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "mixprec/core/error.hpp"
#include "mixprec/core/utf8.hpp"
#include "mixprec/monitor/record.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace monitor {
namespace detail {

/// The shortest of %.15g, %.16g and %.17g that reads back as x (17
/// significant digits always do), with '.' as the decimal point whatever
/// the C locale says. The fallback where std::to_chars has no double.
inline std::string json_double_printf(double x) {
  char buf[40];
  for (int digits = 15; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, x);
    if (std::strtod(buf, nullptr) == x) break;  // same locale as snprintf
  }
  std::string s(buf);
  const char point = std::localeconv()->decimal_point[0];
  if (point != '.') std::replace(s.begin(), s.end(), point, '.');
  return s;
}

/// A finite x as the shortest JSON number that reads back as the same
/// double ("0.1", "65536", "1e-05"): locale-independent std::to_chars where
/// the library has it for double, json_double_printf otherwise.
inline std::string json_double(double x) {
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
  char buf[40];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof buf, x);
  if (r.ec == std::errc()) return std::string(buf, r.ptr);
#endif
  return json_double_printf(x);
}

/// Appends x: a JSON number, or "nan", "inf", "-inf" as strings (JSON has
/// no non-finite numbers).
inline void json_append_number(std::string& out, double x) {
  if (std::isnan(x)) {
    out += "\"nan\"";
  } else if (std::isinf(x)) {
    out += x > 0 ? "\"inf\"" : "\"-inf\"";
  } else {
    out += json_double(x);
  }
}

/// Appends x, or null when it is NaN (an absent value).
inline void json_append_optional(std::string& out, double x) {
  if (std::isnan(x)) {
    out += "null";
  } else {
    json_append_number(out, x);
  }
}

/// Appends s as a JSON string: quotes and backslashes escaped, control
/// characters as \n, \t, ... or \u00XX, well-formed UTF-8 kept as it is and
/// each byte of malformed UTF-8 replaced by \ufffd, so that every line is
/// valid JSON whatever a parameter is called.
inline void json_append_string(std::string& out, const std::string& s) {
  static const char hex[] = "0123456789abcdef";
  out += '"';
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const std::size_t n =
          mixprec::detail::utf8_sequence_length(reinterpret_cast<const unsigned char*>(s.data()) + i, s.size() - i);
      if (n == 0) {
        out += "\\ufffd";
        ++i;
      } else {
        out.append(s, i, n);
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xF];
        } else {
          out += static_cast<char>(c);
        }
    }
    ++i;
  }
  out += '"';
}

/// Appends `"key": ` (keys are plain ASCII literals).
inline void json_key(std::string& out, const char* key) {
  out += '"';
  out += key;
  out += "\": ";
}

inline void json_append_hist(std::string& out, const Histogram& h) {
  out += '[';
  for (std::size_t b = 0; b < h.size(); ++b) {
    if (b > 0) out += ", ";
    out += std::to_string(h[b]);
  }
  out += ']';
}

inline void json_append_shares(std::string& out, const Histogram& h) {
  const Fp16Shares s = fp16_shares(h);
  json_key(out, "underflow");
  json_append_number(out, s.underflow);
  out += ", ";
  json_key(out, "subnormal");
  json_append_number(out, s.subnormal);
  out += ", ";
  json_key(out, "overflow");
  json_append_number(out, s.overflow);
  out += ", ";
  json_key(out, "hist");
  json_append_hist(out, h);
}

/// Appends [f(a[0]), f(a[1]), ...] for the record's steps.
template <class F>
void json_append_steps(std::string& out, const std::vector<StepSample>& steps, F&& f) {
  out += '[';
  for (std::size_t k = 0; k < steps.size(); ++k) {
    if (k > 0) out += ", ";
    f(steps[k]);
  }
  out += ']';
}

}  // namespace detail

/// The log's first line (docs/monitor.md, "Header"), without a newline.
inline std::string header_json(const RunInfo& info) {
  std::string out = "{\"type\": \"header\", \"schema\": \"mixprec.monitor/1\", ";
  detail::json_key(out, "optimizer");
  detail::json_append_string(out, info.optimizer);
  out += ", ";
  detail::json_key(out, "device");
  detail::json_append_string(out, info.device);
  out += ", ";
  detail::json_key(out, "scaling");
  detail::json_append_string(out, info.scaling);
  out += ", ";
  detail::json_key(out, "init_scale");
  detail::json_append_number(out, info.init_scale);
  out += ", ";
  detail::json_key(out, "min_scale");
  detail::json_append_number(out, info.min_scale);
  out += ", ";
  detail::json_key(out, "max_scale");
  detail::json_append_number(out, info.max_scale);
  out += ", ";
  detail::json_key(out, "every");
  out += std::to_string(info.every);
  out += ", \"bins\": {\"count\": " + std::to_string(Bins::count) + ", \"zero\": " + std::to_string(Bins::zero) +
         ", \"nonfinite\": " + std::to_string(Bins::nonfinite) +
         ", \"min_exponent\": " + std::to_string(Bins::min_exponent) +
         ", \"max_exponent\": " + std::to_string(Bins::max_exponent) +
         ", \"offset\": " + std::to_string(Bins::offset) + "}, ";
  detail::json_key(out, "params");
  out += '[';
  for (std::size_t i = 0; i < info.params.size(); ++i) {
    const ParamInfo& p = info.params[i];
    if (i > 0) out += ", ";
    out += '{';
    detail::json_key(out, "name");
    detail::json_append_string(out, p.name);
    out += ", ";
    detail::json_key(out, "numel");
    out += std::to_string(p.numel);
    out += ", ";
    detail::json_key(out, "dtype");
    detail::json_append_string(out, p.dtype);
    out += '}';
  }
  out += "]}";
  return out;
}

/// One record line (docs/monitor.md, "Record"), without a newline: the
/// record's steps as parallel arrays, its parameters with their fp16 shares
/// and histograms, the shares of all parameters together, the forecast made
/// at it (absent figures null) and the events raised in it (`param` null
/// for the whole model). Throws mixprec::Error when the record has no steps
/// or not one ParamSample per parameter of `info`.
inline std::string record_json(const RunInfo& info, const LogRecord& r, const Forecast& forecast,
                               const std::vector<Event>& events) {
  MIXPREC_CHECK(!r.steps.empty(), "record_json: the record has no steps");
  MIXPREC_CHECK(r.params.size() == info.params.size(), "record_json: the record has ", r.params.size(),
                " parameter samples, the run has ", info.params.size(), " parameters");
  std::string out = "{\"type\": \"log\", ";
  detail::json_key(out, "step");
  out += std::to_string(r.last().step);
  out += ", \"steps\": {";
  detail::json_key(out, "first");
  out += std::to_string(r.steps.front().step);
  out += ", ";
  detail::json_key(out, "loss");
  detail::json_append_steps(out, r.steps, [&out](const StepSample& s) { detail::json_append_number(out, s.loss); });
  out += ", ";
  detail::json_key(out, "scale");
  detail::json_append_steps(out, r.steps, [&out](const StepSample& s) { detail::json_append_number(out, s.scale); });
  out += ", ";
  detail::json_key(out, "skipped");
  detail::json_append_steps(out, r.steps, [&out](const StepSample& s) { out += s.skipped ? '1' : '0'; });
  out += ", ";
  // Only in records with a spike-guard skip: logs of runs without one
  // read as before.
  if (std::any_of(r.steps.begin(), r.steps.end(), [](const StepSample& s) { return s.guard_skipped; })) {
    detail::json_key(out, "guard_skipped");
    detail::json_append_steps(out, r.steps, [&out](const StepSample& s) { out += s.guard_skipped ? '1' : '0'; });
    out += ", ";
  }
  detail::json_key(out, "grad_norm");
  detail::json_append_steps(out, r.steps,
                            [&out](const StepSample& s) { detail::json_append_number(out, s.grad_norm); });
  out += ", ";
  detail::json_key(out, "nonfinite_params");
  detail::json_append_steps(out, r.steps, [&out](const StepSample& s) {
    out += '[';
    for (std::size_t k = 0; k < s.nonfinite_params.size(); ++k) {
      if (k > 0) out += ", ";
      out += std::to_string(s.nonfinite_params[k]);
    }
    out += ']';
  });
  out += "}, ";

  detail::json_key(out, "params");
  out += '[';
  for (std::size_t i = 0; i < r.params.size(); ++i) {
    const ParamSample& p = r.params[i];
    if (i > 0) out += ", ";
    out += '{';
    detail::json_key(out, "grad_norm");
    detail::json_append_number(out, p.grad_norm);
    out += ", ";
    detail::json_key(out, "update_ratio");
    detail::json_append_number(out, p.update_ratio);
    out += ", ";
    detail::json_key(out, "eps_share");
    detail::json_append_optional(out, p.eps_share);
    out += ", ";
    detail::json_key(out, "v_ratio_rms");
    detail::json_append_optional(out, p.v_ratio_rms);
    out += ", ";
    detail::json_key(out, "lost_update_share");
    detail::json_append_optional(out, p.lost_update_share);
    out += ", ";
    detail::json_key(out, "nonfinite");
    out += p.nonfinite ? "true" : "false";
    out += ", ";
    detail::json_append_shares(out, p.hist);
    out += '}';
  }
  out += "], ";

  detail::json_key(out, "overall");
  out += '{';
  detail::json_append_shares(out, r.overall());
  out += "}, ";

  detail::json_key(out, "forecast");
  out += '{';
  detail::json_key(out, "steps_to_min_scale");
  detail::json_append_optional(out, forecast.steps_to_min_scale);
  out += ", ";
  detail::json_key(out, "steps_to_underflow");
  detail::json_append_optional(out, forecast.steps_to_underflow);
  out += ", ";
  detail::json_key(out, "loss_slope");
  detail::json_append_optional(out, forecast.loss_slope);
  out += ", ";
  detail::json_key(out, "diverging");
  out += forecast.diverging ? "true" : "false";
  out += "}, ";

  detail::json_key(out, "events");
  out += '[';
  for (std::size_t k = 0; k < events.size(); ++k) {
    const Event& e = events[k];
    if (k > 0) out += ", ";
    out += '{';
    detail::json_key(out, "kind");
    detail::json_append_string(out, to_string(e.kind));
    out += ", ";
    detail::json_key(out, "step");
    out += std::to_string(e.step);
    out += ", ";
    detail::json_key(out, "param");
    if (e.param.empty()) {
      out += "null";
    } else {
      detail::json_append_string(out, e.param);
    }
    out += ", ";
    detail::json_key(out, "value");
    detail::json_append_number(out, e.value);
    out += ", ";
    detail::json_key(out, "threshold");
    detail::json_append_number(out, e.threshold);
    out += ", ";
    detail::json_key(out, "message");
    detail::json_append_string(out, e.message);
    out += ", ";
    detail::json_key(out, "suggestion");
    detail::json_append_string(out, e.suggestion);
    out += '}';
  }
  out += "]}";
  return out;
}

/// Writes a JSONL file: creates (or truncates) it on construction, and
/// write() appends one line and flushes, so the log is complete up to the
/// last record however the run ends. Move-only; closes the file on
/// destruction.
class JsonlWriter {
 public:
  /// Throws mixprec::Error naming the path and the system's reason when the
  /// file cannot be opened for writing. `append`: lines go after what the
  /// file holds (a resumed run's log), else the file starts empty.
  explicit JsonlWriter(const std::string& path, bool append = false) : path_(path) {
    errno = 0;
    std::FILE* f = std::fopen(path.c_str(), append ? "a" : "w");
    const int err = errno;
    MIXPREC_CHECK(f != nullptr, "JsonlWriter: cannot open \"", path, "\" for writing: ",
                  err != 0 ? std::strerror(err) : "unknown error");
    file_.reset(f);
  }

  /// Appends `line` and a newline, then flushes. Throws mixprec::Error when
  /// the line holds a newline (it would be two records) or the write fails.
  void write(const std::string& line) {
    MIXPREC_CHECK(file_ != nullptr, "JsonlWriter::write: the writer was moved from");
    MIXPREC_CHECK(line.find('\n') == std::string::npos, "JsonlWriter::write: the line for \"", path_,
                  "\" holds a newline at offset ", line.find('\n'), "; a JSONL record is one line");
    errno = 0;
    std::FILE* f = file_.get();
    const bool ok = std::fwrite(line.data(), 1, line.size(), f) == line.size() && std::fputc('\n', f) != EOF &&
                    std::fflush(f) == 0;
    const int err = errno;
    MIXPREC_CHECK(ok, "JsonlWriter::write: writing \"", path_, "\" failed: ",
                  err != 0 ? std::strerror(err) : "unknown error");
  }

  const std::string& path() const { return path_; }

 private:
  struct Close {
    void operator()(std::FILE* f) const noexcept { std::fclose(f); }
  };
  std::string path_;
  std::unique_ptr<std::FILE, Close> file_;
};

}  // namespace monitor
MIXPREC_NAMESPACE_END
