// SPDX-License-Identifier: Apache-2.0
// Turns an instability monitor log (JSONL, docs/monitor.md) into one
// self-contained HTML page: charts, events and the last forecast. Installed
// with the package (bin/monitor_report).
//
//   monitor_report LOG.jsonl [-o|--output REPORT.html] [--title TITLE]
//
// Default output: LOG with the extension .html (run.jsonl -> run.html).
// Flags take `-o run.html`, `--output run.html` or `--output=run.html`;
// --help lists them. Exits 0 and prints where it wrote; on a bad log or an
// I/O failure prints the reason (the file, and the line for a bad log) and
// exits 1; on bad arguments prints the reason and exits 2.
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>

#include "common/cli.hpp"
#include "mixprec/monitor/report.hpp"

int main(int argc, char** argv) {
  std::string log, out, title;
  CLI::App app("monitor_report: the instability monitor's JSONL log as one self-contained HTML page",
               "monitor_report");
  app.add_option("log", log, "the monitor's log (MonitorOptions::log_path, an example's --monitor-log)")
      ->type_name("LOG.jsonl")
      ->required();
  app.add_option("-o,--output", out, "the page to write (atomically)")
      ->type_name("REPORT.html")
      ->default_str("LOG with .html");
  app.add_option("--title", title, "the page's title")->default_str("mixprec monitor: LOG's file name");
  if (const int rc = mixprec::examples::parse_flags(app, argc, argv); rc >= 0) return rc;
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
