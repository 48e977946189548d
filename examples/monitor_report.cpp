// SPDX-License-Identifier: Apache-2.0
// Turns an instability monitor log (JSONL, docs/monitor.md) into one
// self-contained HTML page: charts, events and the last forecast.
//
//   monitor_report LOG.jsonl [-o REPORT.html] [--title TITLE]
//
// Default output: LOG with the extension .html (run.jsonl -> run.html).
// Exits 0 and prints where it wrote; on a bad log or an I/O failure prints
// the reason (the file, and the line for a bad log) and exits 1; on bad
// arguments prints the usage and exits 2.
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>

#include "mixprec/monitor/report.hpp"

namespace {

int usage(const char* why) {
  if (why != nullptr) std::cerr << "monitor_report: " << why << "\n";
  std::cerr << "usage: monitor_report LOG.jsonl [-o REPORT.html] [--title TITLE]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string log, out, title;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      usage(nullptr);
      return 0;
    }
    if (arg == "-o" || arg == "--output" || arg == "--title") {
      if (i + 1 >= argc) return usage((arg + " needs a value").c_str());
      (arg == "--title" ? title : out) = argv[++i];
    } else if (!arg.empty() && arg[0] == '-') {
      return usage(("unknown option " + arg).c_str());
    } else if (log.empty()) {
      log = arg;
    } else {
      return usage(("more than one log given: " + log + ", " + arg).c_str());
    }
  }
  if (log.empty()) return usage("no log given");
  if (out.empty()) out = std::filesystem::path(log).replace_extension(".html").string();

  try {
    mixprec::monitor::write_report(log, out, title);
  } catch (const std::exception& e) {
    std::cerr << "monitor_report: " << e.what() << "\n";
    return 1;
  }
  std::cout << "monitor_report: wrote " << out << "\n";
  return 0;
}
