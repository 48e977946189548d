// SPDX-License-Identifier: Apache-2.0
// Command-line helpers the example programs share, over CLI11 (Debian's
// libcli11-dev, header-only): on|off switches, finite-number checks, and
// the exit codes every program keeps (0 after --help, 2 on a usage error).
#pragma once

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>

#include <CLI/CLI.hpp>

namespace mixprec::examples {

/// Parses argv into `app`'s options. Returns -1 when the program goes on;
/// otherwise CLI11 has printed the help (stdout) or the error (stderr) and
/// the program should return the code given: 0 after --help, 2 on a usage
/// error (an unknown flag, a missing value, a value outside its choices or
/// range). CLI11's own codes (105, 106, ...) are folded into 2, the code
/// these programs have always used for bad usage.
inline int parse_flags(CLI::App& app, int argc, const char* const* argv) {
  try {
    app.parse(argc, argv);
    return -1;
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
}

/// `--name on|off` into `value`; --help shows the current value as the
/// default, and an error lists the two choices.
inline CLI::Option* add_on_off(CLI::App& app, const std::string& name, bool& value, const std::string& what) {
  return app
      .add_option_function<std::string>(
          name, [&value](const std::string& v) { value = v == "on"; }, what)
      ->check(CLI::IsMember({"on", "off"}))
      ->type_name("TEXT")
      ->default_str(value ? "on" : "off");
}

/// A number that strtod reads whole, finite and >= low (CLI11 alone would
/// take "inf" and "nan": both compare false against a range).
inline CLI::Validator finite_at_least(double low) {
  std::ostringstream bound;
  bound << low;
  const std::string b = bound.str();
  return CLI::Validator(
      [low, b](std::string& v) -> std::string {
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        if (v.empty() || end != v.c_str() + v.size() || !std::isfinite(x) || x < low) {
          return v + " is not a finite number >= " + b;
        }
        return {};
      },
      "finite, >= " + b);
}

}  // namespace mixprec::examples
