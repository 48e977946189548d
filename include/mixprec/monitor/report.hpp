// SPDX-License-Identifier: Apache-2.0
// The instability monitor's HTML report: one self-contained page (inline CSS
// and JavaScript drawing inline SVG, nothing fetched) built from the JSONL log
// that docs/monitor.md describes. Not part of <mixprec/mixprec.hpp> (a
// program that writes reports includes this header itself); its stylesheet
// and script live in assets/report/ and reach it through the generated
// monitor/report_assets.hpp.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "mixprec/core/atomic_file.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/monitor/report_assets.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace monitor {

/// The schema this report reads, as the log's header names it.
inline constexpr std::string_view report_schema = "mixprec.monitor/1";

namespace detail {

// --- one log line, checked with nlohmann-json's SAX parser -----------------
//
// The report's page parses the log with the browser's JSON.parse; the C++
// side checks the syntax (RFC 8259, UTF-8) first so that a broken log fails
// here, naming the line, rather than as a blank page. Events, not a
// document: it keeps only the top-level "type" and "schema" strings (the
// rest is the page's business) and refuses nesting deeper than a log's.

struct JsonLineFacts {
  std::string type, schema;
  bool has_type = false, has_schema = false;
};

struct JsonSyntaxError {
  std::size_t column = 0;  // 1-based byte offset in the line; 0: not known
  std::string what;
  bool at_end = false;  // the line ended inside a value: a truncated write
};

class JsonLineChecker final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit JsonLineChecker(std::string_view line) : line_(line) {}

  /// Throws JsonSyntaxError unless the line is exactly one JSON object.
  JsonLineFacts check() {
    // nlohmann skips a byte-order mark that starts its input; the page's
    // JSON.parse does not. (validate_log drops one before the first line.)
    if (line_.substr(0, 3) == "\xEF\xBB\xBF") {
      throw JsonSyntaxError{1, "a byte-order mark starts the line", false};
    }
    const bool ok = nlohmann::json::sax_parse(line_, this, nlohmann::json::input_format_t::json, true);
    if (error_) throw *error_;
    if (!ok) throw JsonSyntaxError{0, "not a JSON object", false};  // unreachable: every refusal sets error_
    return facts_;
  }

  bool null() override { return value(nullptr); }
  bool boolean(bool) override { return value(nullptr); }
  bool number_integer(number_integer_t) override { return value(nullptr); }
  bool number_unsigned(number_unsigned_t) override { return value(nullptr); }
  bool number_float(number_float_t, const string_t&) override { return value(nullptr); }
  bool string(string_t& text) override { return value(&text); }
  bool binary(binary_t&) override { return value(nullptr); }
  bool key(string_t& name) override {
    key_ = depth_ == 1 ? name : std::string();
    return true;
  }
  bool start_object(std::size_t) override { return open(true); }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(false); }
  bool end_array() override { return close(); }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::json::exception& e) override {
    // nlohmann's message: "[json.exception.parse_error.101] parse error at
    // line 1, column N: <what>"; the column is `position`, given apart.
    std::string what = e.what();
    const std::size_t colon = what.find(": ");
    if (colon != std::string::npos) what.erase(0, colon + 2);
    // A position past the last byte: the line stopped inside a value.
    error_ = JsonSyntaxError{position, printable(what), position > line_.size()};
    return false;
  }

 private:
  // A log line nests four deep; the cap keeps hostile input cheap.
  static constexpr int max_depth = 64;

  std::string_view line_;
  JsonLineFacts facts_;
  std::string key_;
  int depth_ = 0;
  bool started_ = false;
  std::optional<JsonSyntaxError> error_;

  // Refuses a line whose value is not an object (the first event says).
  bool first(bool is_object, const char* found) {
    if (started_) return true;
    started_ = true;
    if (!is_object) error_ = JsonSyntaxError{1, std::string("expected a JSON object, found ") + found, false};
    return is_object;
  }
  bool value(string_t* text) {
    if (!first(false, text != nullptr ? "a string" : "a single value")) return false;
    if (depth_ == 1 && text != nullptr && (key_ == "type" || key_ == "schema")) {
      if (key_ == "type") {
        facts_.type = *text;
        facts_.has_type = true;
      } else {
        facts_.schema = *text;
        facts_.has_schema = true;
      }
    }
    key_.clear();
    return true;
  }
  bool open(bool is_object) {
    if (!first(is_object, "an array")) return false;
    key_.clear();  // a container as a member's value: not a "type" string
    if (++depth_ > max_depth) {
      error_ = JsonSyntaxError{0, "nested deeper than 64 levels", false};
      return false;
    }
    return true;
  }
  bool close() {
    --depth_;
    return true;
  }

  // Bytes of the input quoted in nlohmann's message ("last read: ..."):
  // control bytes and non-ASCII shown as \xNN, so that a message is text.
  static std::string printable(const std::string& text) {
    static const char hex[] = "0123456789abcdef";
    std::string out;
    for (const char c : text) {
      const auto u = static_cast<unsigned char>(c);
      if (u < 0x20 || u >= 0x7f) {
        out += "\\x";
        out += hex[u >> 4];
        out += hex[u & 15];
      } else {
        out += c;
      }
    }
    return out;
  }
};

// The log's text made safe to sit inside <script type="application/json">.
// The syntax check has shown every '<' to be inside a JSON string, where the
// escape \u003c means the same character; writing every '<' that way (not
// just "</") also defuses "<!--" and "<script", which would otherwise switch
// the HTML tokenizer into its escaped script states and let the element run
// past its real end tag. U+2028 and U+2029 are valid raw in JSON strings but
// are line terminators to older JavaScript engines: escaped as well.
inline std::string escape_json_for_script(std::string_view text) {
  std::string out;
  out.reserve(text.size() + text.size() / 16);
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '<') {
      out += "\\u003c";
    } else if (c == '>') {
      out += "\\u003e";
    } else if (c == '\xe2' && i + 2 < text.size() && text[i + 1] == '\x80' &&
               (text[i + 2] == '\xa8' || text[i + 2] == '\xa9')) {
      out += text[i + 2] == '\xa8' ? "\\u2028" : "\\u2029";
      i += 2;
    } else {
      out += c;
    }
  }
  return out;
}

inline std::string escape_html(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

/// What validate_log found: the text to embed (the log, less a truncated
/// last line) and a note for the reader about anything left out.
struct ValidatedLog {
  std::string text;
  std::string note;
};

inline std::string quote_for_message(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      out += '?';
    } else {
      out += c;
    }
    if (out.size() > 80) {
      out += "...";
      break;
    }
  }
  return out + "\"";
}

// Checks the log line by line: JSON objects only, the first a header of
// report_schema, every later one a "log" record. A last line that stops in
// the middle of a value and has no newline is what a run killed while
// writing leaves behind: it is dropped with a note instead of failing the
// whole report, which is most wanted for exactly such runs.
inline ValidatedLog validate_log(std::string_view log) {
  // A byte-order mark, as some editors write, is no part of the JSON.
  if (log.substr(0, 3) == "\xEF\xBB\xBF") log.remove_prefix(3);
  ValidatedLog result;
  bool seen_header = false;
  std::size_t line_no = 0, pos = 0;
  while (pos < log.size()) {
    ++line_no;
    const std::size_t nl = log.find('\n', pos);
    const bool last_unterminated = nl == std::string_view::npos;
    const std::size_t end = last_unterminated ? log.size() : nl;
    std::string_view line = log.substr(pos, end - pos);
    const std::size_t line_start = pos;
    pos = last_unterminated ? log.size() : nl + 1;

    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    JsonLineFacts facts;
    try {
      facts = JsonLineChecker(line).check();
    } catch (const JsonSyntaxError& e) {
      if (last_unterminated && e.at_end && seen_header) {
        result.text = std::string(log.substr(0, line_start));
        result.note = mixprec::detail::concat(
            "Line ", line_no, " of the log is incomplete (the run probably stopped while writing it) and was left out.");
        return result;
      }
      mixprec::detail::throw_error("render_report: line ", line_no,
                                   e.column > 0 ? ", column " + std::to_string(e.column) : std::string(),
                                   ": not valid JSON: ", e.what);
    }
    if (!seen_header) {
      MIXPREC_CHECK(facts.has_type && facts.type == "header", "render_report: line ", line_no,
                    ": the log must start with its header record ({\"type\": \"header\", \"schema\": \"",
                    report_schema, "\", ...}), found ",
                    facts.has_type ? "type " + quote_for_message(facts.type) : std::string("no \"type\""));
      MIXPREC_CHECK(facts.has_schema, "render_report: line ", line_no, ": the header has no \"schema\" (expected \"",
                    report_schema, "\")");
      MIXPREC_CHECK(facts.schema == report_schema, "render_report: line ", line_no, ": schema ",
                    quote_for_message(facts.schema), " is not one this report reads (\"", report_schema, "\")");
      seen_header = true;
    } else {
      MIXPREC_CHECK(facts.has_type, "render_report: line ", line_no, ": the record has no \"type\"");
      MIXPREC_CHECK(facts.type == "log", "render_report: line ", line_no, ": type ", quote_for_message(facts.type),
                    facts.type == "header" ? " again: a log holds one header (were two runs appended to one file?)"
                                           : ", expected \"log\"");
    }
  }
  MIXPREC_CHECK(seen_header, "render_report: the log is empty: expected a header line {\"type\": \"header\", "
                "\"schema\": \"", report_schema, "\", ...} first");
  result.text = std::string(log);
  return result;
}


}  // namespace detail

/// Renders the monitor's JSONL log (docs/monitor.md) as one HTML page that
/// needs nothing but a browser: inline CSS, and inline JavaScript that parses
/// the embedded log and draws inline SVG charts (loss, loss scale and skipped
/// steps, gradient norm, update ratios, fp16 shares, the exponent heatmap),
/// the events and the last forecast. A Content-Security-Policy forbids every
/// fetch. `title` goes into `<title>` and the heading (HTML-escaped; empty: a
/// generic title).
///
/// Checks first, throwing mixprec::Error naming the line (and column): every
/// non-blank line is one JSON object (UTF-8), the first is the header with
/// "schema": "mixprec.monitor/1", the others are "log" records. An incomplete
/// last line without its newline (a run killed mid-write) is left out, with a
/// note on the page. The page itself reports what it cannot draw.
inline std::string render_report(const std::string& jsonl_text, const std::string& title) {
  const detail::ValidatedLog log = detail::validate_log(jsonl_text);
  const std::string heading = detail::escape_html(title.empty() ? std::string("mixprec monitor report") : title);

  std::string page;
  page.reserve(log.text.size() + 64 * 1024);
  page +=
      "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
      "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
      "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n"
      "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
      "<meta name=\"generator\" content=\"mixprec render_report\">\n<title>";
  page += heading;
  page += "</title>\n<style>\n";
  for (const std::string_view piece : detail::report_css_parts) page += piece;
  page += "</style>\n</head>\n<body data-rendered=\"no\">\n<header>\n<h1>";
  page += heading;
  page += "</h1>\n<div id=\"run-info\"></div>\n</header>\n";
  if (!log.note.empty()) {
    page += "<p class=\"banner\">";
    page += detail::escape_html(log.note);
    page += "</p>\n";
  }
  page +=
      "<noscript><p class=\"banner error\">This report draws its charts with JavaScript: "
      "enable it to see them.</p></noscript>\n"
      "<main id=\"report\"></main>\n"
      "<footer>mixprec instability monitor report &middot; <span id=\"render-status\">not rendered</span></footer>\n"
      "<script type=\"application/json\" id=\"monitor-log\">\n";
  page += detail::escape_json_for_script(log.text);
  page += "\n</script>\n<script>\n";
  for (const std::string_view piece : detail::report_js_parts) page += piece;
  page += "</script>\n</body>\n</html>\n";
  return page;
}

/// What write_report may read.
struct ReportOptions {
  /// The largest log write_report reads, in bytes; a larger one is refused
  /// (naming the file, its size and this limit) before anything is
  /// allocated or read. 256 MiB: the page embeds the whole log, and a
  /// browser holds it as one JavaScript string before JSON.parse makes
  /// objects several times its size; Chrome's longest string is 2^29 - 24
  /// characters (V8's String::kMaxLength), so a log of much more than
  /// 512 MiB could not be drawn at all, and 256 MiB keeps a factor of two
  /// from that. write_report itself holds the log about three times (the
  /// text read, the checked text, the page): some 800 MB at the limit. A
  /// logged step takes roughly 1 KB plus 0.5 KB per parameter, so the
  /// default holds about 10,000 logged steps of a 50-parameter model. Raise
  /// it for a longer run and a machine (and browser) with the memory, or
  /// log less often (MonitorOptions::every).
  std::uint64_t max_log_bytes = std::uint64_t{256} << 20;
};

/// Reads the log at `jsonl_path`, renders it (render_report; an empty title
/// becomes "mixprec monitor: <file name>") and writes the page to
/// `html_path` atomically (core/atomic_file.hpp): into a temporary file of its
/// own in the same directory (`html_path` + ".tmp-<pid>-<n>"), fsync'd and
/// renamed over `html_path`, the directory fsync'd after. A reader never
/// sees half a page; concurrent calls for one `html_path` (threads or
/// processes) all succeed and the last rename wins. On any error before
/// the rename `html_path` is left as it was and the temporary file is
/// removed (after it, only the directory's fsync can still fail: the page
/// is in place, and the error says so).
///
/// Throws mixprec::Error naming the path and the reason when the log cannot
/// be read, is larger than `options.max_log_bytes` (checked from its size
/// before it is read), is not a valid log, the page cannot be written, or
/// `html_path` is the log itself.
inline void write_report(const std::string& jsonl_path, const std::string& html_path,
                         const std::string& title = "", const ReportOptions& options = ReportOptions{}) {
  namespace fs = std::filesystem;
  MIXPREC_CHECK(!jsonl_path.empty(), "write_report: jsonl_path is empty");
  MIXPREC_CHECK(!html_path.empty(), "write_report: html_path is empty");
  MIXPREC_CHECK(html_path.back() != '/', "write_report: html_path '", html_path, "' names a directory");
  std::error_code ec;
  MIXPREC_CHECK(!fs::is_directory(jsonl_path, ec), "write_report: cannot read the log '", jsonl_path,
                "': it is a directory");
  MIXPREC_CHECK(!(fs::exists(html_path, ec) && fs::equivalent(jsonl_path, html_path, ec)),
                "write_report: html_path '", html_path, "' is the log itself; refusing to overwrite it");

  std::string text;
  {
    const int fd = ::open(jsonl_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      mixprec::detail::throw_error("write_report: cannot open the log '", jsonl_path, "': ",
                                   std::generic_category().message(err));
    }
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    const std::uint64_t limit = options.max_log_bytes;
    auto too_big = [&](const std::string& size) {
      mixprec::detail::throw_error("write_report: the log '", jsonl_path, "' is ", size,
                                   " bytes, more than the limit of ", limit,
                                   " bytes (ReportOptions::max_log_bytes); raise the limit to render it, "
                                   "or log less often (MonitorOptions::every)");
    };
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      mixprec::detail::throw_error("write_report: cannot stat the log '", jsonl_path, "': ",
                                   std::generic_category().message(err));
    }
    // Refused from its size, before a byte is allocated. A pipe or a file
    // that grows while it is read has no size to trust: the loop below
    // stops at the limit too.
    if (S_ISREG(st.st_mode)) {
      const std::uint64_t size = static_cast<std::uint64_t>(st.st_size);
      if (size > limit) too_big(std::to_string(size));
      text.reserve(static_cast<std::size_t>(size));
    }
    char buffer[64 * 1024];
    for (;;) {
      const ssize_t n = ::read(fd, buffer, sizeof buffer);
      if (n < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        mixprec::detail::throw_error("write_report: reading the log '", jsonl_path, "' failed: ",
                                     std::generic_category().message(err));
      }
      if (n == 0) break;
      if (static_cast<std::uint64_t>(n) > limit - text.size()) too_big("more than " + std::to_string(limit));
      text.append(buffer, static_cast<std::size_t>(n));
    }
  }

  std::string page;
  try {
    page = render_report(text, title.empty() ? "mixprec monitor: " + fs::path(jsonl_path).filename().string() : title);
  } catch (const Error& e) {
    // Name the file too: "render_report: line 3: ..." alone says which line,
    // not of what.
    mixprec::detail::throw_error("write_report: '", jsonl_path, "': ", e.what());
  }
  text = std::string();  // not needed any more: the page holds its own copy

  mixprec::detail::AtomicFile file(html_path, "write_report");
  file.append(page.data(), page.size());
  file.commit();
}

}  // namespace monitor
MIXPREC_NAMESPACE_END
