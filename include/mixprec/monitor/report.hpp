// SPDX-License-Identifier: Apache-2.0
// The instability monitor's HTML report: one self-contained page (inline CSS
// and JavaScript drawing inline SVG, nothing fetched) built from the JSONL log
// that docs/monitor.md describes.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mixprec/core/atomic_file.hpp"
#include "mixprec/core/error.hpp"

namespace mixprec::monitor {

/// The schema this report reads, as the log's header names it.
inline constexpr std::string_view report_schema = "mixprec.monitor/1";

namespace detail {

// --- a JSON syntax check for one log line --------------------------------
//
// The report's page parses the log with the browser's JSON.parse; the C++
// side checks the syntax (RFC 8259, UTF-8) first so that a broken log fails
// here, naming the line, rather than as a blank page. It keeps only the
// top-level "type" and "schema" strings: the rest is the page's business.

struct JsonLineFacts {
  std::string type, schema;
  bool has_type = false, has_schema = false;
};

struct JsonSyntaxError {
  std::size_t column = 0;  // 1-based byte offset in the line
  std::string what;
  bool at_end = false;  // the line ended inside a value: a truncated write
};

class JsonLineChecker {
 public:
  explicit JsonLineChecker(std::string_view line) : s_(line) {}

  /// Throws JsonSyntaxError unless the line is exactly one JSON object.
  JsonLineFacts check() {
    JsonLineFacts facts;
    skip_ws();
    if (i_ >= s_.size()) fail("empty line");
    if (s_[i_] != '{') fail(std::string("expected a JSON object, found ") + describe_here());
    object(0, &facts);
    skip_ws();
    if (i_ < s_.size()) fail(std::string("unexpected ") + describe_here() + " after the object");
    return facts;
  }

 private:
  // A log line nests four deep; the cap keeps hostile input off the stack.
  static constexpr int max_depth = 64;

  std::string_view s_;
  std::size_t i_ = 0;

  [[noreturn]] void fail(std::string what) const {
    throw JsonSyntaxError{i_ + 1, std::move(what), i_ >= s_.size()};
  }

  std::string describe_here() const {
    if (i_ >= s_.size()) return "the end of the line";
    const unsigned char c = static_cast<unsigned char>(s_[i_]);
    if (c >= 0x20 && c < 0x7f) return std::string("'") + static_cast<char>(c) + "'";
    static const char hex[] = "0123456789abcdef";
    return std::string("byte 0x") + hex[c >> 4] + hex[c & 15];
  }

  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r' || s_[i_] == '\n')) ++i_;
  }

  void expect(char c) {
    if (i_ >= s_.size() || s_[i_] != c) fail(std::string("expected '") + c + "', found " + describe_here());
    ++i_;
  }

  void value(int depth) {
    skip_ws();
    if (i_ >= s_.size()) fail("expected a value, found the end of the line");
    switch (s_[i_]) {
      case '{': object(depth + 1, nullptr); return;
      case '[': array(depth + 1); return;
      case '"': string_value(nullptr); return;
      case 't': literal("true"); return;
      case 'f': literal("false"); return;
      case 'n': literal("null"); return;
      default: number(); return;
    }
  }

  void object(int depth, JsonLineFacts* facts) {
    if (depth > max_depth) fail("nested deeper than 64 levels");
    expect('{');
    skip_ws();
    if (i_ < s_.size() && s_[i_] == '}') {
      ++i_;
      return;
    }
    for (;;) {
      skip_ws();
      if (i_ >= s_.size() || s_[i_] != '"') fail(std::string("expected a member name, found ") + describe_here());
      std::string key;
      string_value(&key);
      skip_ws();
      expect(':');
      skip_ws();
      const bool wanted = facts != nullptr && (key == "type" || key == "schema");
      if (wanted && i_ < s_.size() && s_[i_] == '"') {
        std::string text;
        string_value(&text);
        if (key == "type") {
          facts->type = std::move(text);
          facts->has_type = true;
        } else {
          facts->schema = std::move(text);
          facts->has_schema = true;
        }
      } else {
        value(depth);
      }
      skip_ws();
      if (i_ < s_.size() && s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (i_ < s_.size() && s_[i_] == '}') {
        ++i_;
        return;
      }
      fail(std::string("expected ',' or '}', found ") + describe_here());
    }
  }

  void array(int depth) {
    if (depth > max_depth) fail("nested deeper than 64 levels");
    expect('[');
    skip_ws();
    if (i_ < s_.size() && s_[i_] == ']') {
      ++i_;
      return;
    }
    for (;;) {
      value(depth);
      skip_ws();
      if (i_ < s_.size() && s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (i_ < s_.size() && s_[i_] == ']') {
        ++i_;
        return;
      }
      fail(std::string("expected ',' or ']', found ") + describe_here());
    }
  }

  void literal(std::string_view word) {
    if (s_.substr(i_, word.size()) == word) {
      i_ += word.size();
      return;
    }
    // A prefix of the word that reaches the end of the line was cut short.
    if (word.substr(0, s_.size() - i_) == s_.substr(i_)) {
      i_ = s_.size();
      fail(std::string("the line ends inside '") + std::string(word) + "'");
    }
    fail(std::string("unexpected ") + describe_here());
  }

  bool digit() const { return i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9'; }

  void digits(const char* where) {
    if (!digit()) fail(std::string("expected a digit ") + where + ", found " + describe_here());
    while (digit()) ++i_;
  }

  void number() {
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    if (i_ < s_.size() && s_[i_] == '0') {
      ++i_;
    } else {
      if (!digit()) fail(std::string("expected a value, found ") + describe_here());
      digits("in the number");
    }
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      digits("after the decimal point");
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      digits("in the exponent");
    }
  }

  static void append_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  std::uint32_t hex4() {
    std::uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      if (i_ >= s_.size()) fail("the line ends inside a \\u escape");
      const char c = s_[i_];
      std::uint32_t d;
      if (c >= '0' && c <= '9') {
        d = static_cast<std::uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        d = static_cast<std::uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        d = static_cast<std::uint32_t>(c - 'A' + 10);
      } else {
        fail(std::string("expected a hex digit in a \\u escape, found ") + describe_here());
      }
      v = v * 16 + d;
      ++i_;
    }
    return v;
  }

  // One UTF-8 sequence starting at i_ (a byte >= 0x80), copied to out.
  void utf8_sequence(std::string* out) {
    const std::size_t start = i_;
    const unsigned char c = static_cast<unsigned char>(s_[i_]);
    int more = 0;
    unsigned char lo = 0x80, hi = 0xbf;  // the range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      more = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
      more = 2;
      if (c == 0xe0) lo = 0xa0;  // no overlong forms
      if (c == 0xed) hi = 0x9f;  // no surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      more = 3;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;  // nothing above U+10FFFF
    } else {
      fail("invalid UTF-8 (" + describe_here() + ")");
    }
    ++i_;
    for (int k = 0; k < more; ++k) {
      if (i_ >= s_.size()) fail("the line ends inside a UTF-8 sequence");
      const unsigned char b = static_cast<unsigned char>(s_[i_]);
      const unsigned char l = k == 0 ? lo : 0x80, h = k == 0 ? hi : 0xbf;
      if (b < l || b > h) fail("invalid UTF-8 (" + describe_here() + ")");
      ++i_;
    }
    if (out != nullptr) out->append(s_.substr(start, i_ - start));
  }

  void string_value(std::string* out) {
    expect('"');
    for (;;) {
      if (i_ >= s_.size()) fail("the line ends inside a string");
      const unsigned char c = static_cast<unsigned char>(s_[i_]);
      if (c == '"') {
        ++i_;
        return;
      }
      if (c < 0x20) fail("a control character (" + describe_here() + ") inside a string");
      if (c >= 0x80) {
        utf8_sequence(out);
        continue;
      }
      if (c != '\\') {
        if (out != nullptr) *out += static_cast<char>(c);
        ++i_;
        continue;
      }
      ++i_;
      if (i_ >= s_.size()) fail("the line ends inside an escape");
      const char e = s_[i_++];
      char plain = 0;
      switch (e) {
        case '"': plain = '"'; break;
        case '\\': plain = '\\'; break;
        case '/': plain = '/'; break;
        case 'b': plain = '\b'; break;
        case 'f': plain = '\f'; break;
        case 'n': plain = '\n'; break;
        case 'r': plain = '\r'; break;
        case 't': plain = '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xd800 && cp <= 0xdbff) {
            // A high surrogate must be followed by an escaped low one.
            if (s_.substr(i_, 2) != "\\u") fail("a lone surrogate in a \\u escape");
            i_ += 2;
            const std::uint32_t low = hex4();
            if (low < 0xdc00 || low > 0xdfff) fail("a lone surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          } else if (cp >= 0xdc00 && cp <= 0xdfff) {
            fail("a lone surrogate in a \\u escape");
          }
          if (out != nullptr) append_utf8(*out, cp);
          continue;
        }
        default:
          --i_;
          fail("an invalid escape \\" + describe_here());
      }
      if (out != nullptr) *out += plain;
    }
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
      mixprec::detail::throw_error("render_report: line ", line_no, ", column ", e.column,
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

// The page's stylesheet and script, defined at the end of this file.
inline const char* report_css();
inline const char* report_js_base();
inline const char* report_js_charts();
inline const char* report_js_page();

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
  page += detail::report_css();
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
  page += detail::report_js_base();
  page += detail::report_js_charts();
  page += detail::report_js_page();
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

}  // namespace mixprec::monitor

// --- the page's stylesheet and script (report_css, report_js_*) ----------------
// Kept as separate literals, each well under the 16 KiB that MSVC allows one.
// Doxygen (which documents no detail::) skips them: its parser misreads the
// JavaScript inside the raw strings (docs/Doxyfile.in defines MIXPREC_DOXYGEN).
#ifndef MIXPREC_DOXYGEN
namespace mixprec::monitor::detail {

// The stylesheet.
inline const char* report_css() {
  return R"mixprec(* { box-sizing: border-box; }
body { margin: 0; background: #eef1f5; color: #1b2430;
       font: 14px/1.45 "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; }
header { background: #fff; border-bottom: 1px solid #d5dbe3; padding: 14px 28px 12px; }
h1 { font-size: 21px; margin: 0 0 6px; font-weight: 600; }
#run-info { display: flex; flex-wrap: wrap; gap: 4px 26px; font-size: 13px; }
#run-info .k { color: #5a6778; margin-right: 6px; }
#run-info .params { flex-basis: 100%; display: flex; flex-wrap: wrap; gap: 4px 8px; align-items: baseline; }
#run-info .chip { background: #f0f3f7; border: 1px solid #dde2e9; border-radius: 4px; padding: 0 7px;
                  font-size: 12px; white-space: nowrap; }
#run-info .chip .d { color: #5a6778; }
main { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 14px; padding: 14px 28px 6px; }
.card { background: #fff; border: 1px solid #d5dbe3; border-radius: 6px; padding: 10px 14px 10px; min-width: 0; }
.card.full { grid-column: 1 / -1; }
.card h2 { font-size: 15px; margin: 0; font-weight: 600; }
.card h3 { font-size: 13px; margin: 0 0 4px; font-weight: 600; color: #333d4a; }
.card .note { margin: 1px 0 4px; color: #5a6778; font-size: 12.5px; }
.legend { display: flex; flex-wrap: wrap; gap: 2px 18px; font-size: 12.5px; color: #2b3440; margin-top: 2px; }
.legend .key { display: inline-flex; align-items: center; gap: 6px; }
.legend .sw { display: inline-block; width: 18px; height: 3px; border-radius: 1px; }
.legend .sw.dot { width: 9px; height: 9px; border-radius: 50%; }
.legend .sw.tri { width: 0; height: 0; border-left: 6px solid transparent; border-right: 6px solid transparent;
                  border-top: 9px solid; border-radius: 0; background: none !important; }
svg { display: block; overflow: visible; }
svg text { font-size: 11px; fill: #4a5563; }
svg text.title { font-size: 12px; fill: #2b3440; }
svg text.mark { font-size: 10.5px; font-weight: 600; }
.overview { display: flex; flex-wrap: wrap; gap: 12px 40px; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 0; }
.stat { padding: 0 20px 0 0; margin-right: 20px; border-right: 1px solid #e3e7ec; }
.stat:last-child { border-right: none; }
.stat .v { font-size: 19px; font-weight: 600; white-space: nowrap; }
.stat .k { font-size: 12px; color: #5a6778; white-space: nowrap; }
.stat.bad .v { color: #c62828; }
.stat.warn .v { color: #b26a00; }
.stat.good .v { color: #2e7d32; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e6e9ee; vertical-align: top; }
th { background: #f4f6f9; font-weight: 600; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.nowrap { white-space: nowrap; }
.kind { display: inline-block; padding: 0 8px; border-radius: 9px; font-size: 11.5px; white-space: nowrap;
        color: #fff; }
.scroll { max-height: 560px; overflow: auto; margin-top: 6px; }
.banner { margin: 14px 28px 0; padding: 10px 14px; background: #fff8e1; border: 1px solid #f0d48a;
          border-radius: 6px; }
.banner.error { background: #fdecea; border-color: #f3b4ae; color: #8a1c13; font-weight: 600; }
main > .banner { grid-column: 1 / -1; margin: 0; }
.empty { color: #6b7685; font-style: italic; padding: 16px 0; }
footer { padding: 4px 28px 18px; color: #6b7685; font-size: 12px; }
sup { font-size: 0.68em; line-height: 0; }
)mixprec";
}

// The script, 1/3: helpers, the log's parser, axes and the plot frame.
inline const char* report_js_base() {
  return R"mixprec((function () {
'use strict';
// The monitor's report: parses the log embedded above (docs/monitor.md) and
// draws it as inline SVG. Plain ES2015, no libraries; nothing is fetched.
var SCHEMA = 'mixprec.monitor/1';
// The SVG namespace as the HTML parser assigns it, so the page names no URL.
var SVG_NS = (function () {
  var d = document.createElement('div');
  d.innerHTML = '<svg></svg>';
  return d.firstChild.namespaceURI;
})();
var PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b',
               '#e377c2', '#7f7f7f', '#bcbd22'];
var KIND_COLOURS = {
  nonfinite_loss: '#b71c1c', loss_spike: '#e65100', grad_norm_explosion: '#ad1457',
  scale_collapse: '#6a1b9a', underflow: '#1565c0', stalled_updates: '#00838f',
  repeated_overflow: '#c62828'
};
// Viridis' anchor colours, for the heatmap: dark = rare, yellow = common.
var RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function sv(parent, tag, attrs) {
  var e = document.createElementNS(SVG_NS, tag);
  for (var k in attrs) {
    if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
  }
  if (parent) parent.appendChild(e);
  return e;
}
function tip(node, text) {
  var t = document.createElementNS(SVG_NS, 'title');
  t.textContent = text;
  node.appendChild(t);
}
// The log writes a value that is not finite as "nan", "inf" or "-inf", and
// an absent one as null.
function num(v) {
  if (typeof v === 'number') return v;
  if (v === 'inf') return Infinity;
  if (v === '-inf') return -Infinity;
  return NaN;
}
function isNum(v) { return typeof v === 'number' && isFinite(v); }
function groups(s) { return s.replace(/\B(?=(\d{3})+(?!\d))/g, ','); }
function fmt(v) {
  if (v === null || v === undefined) return '\u2014';
  if (typeof v !== 'number') v = num(v);
  if (v !== v) return 'NaN';
  if (v === Infinity) return 'inf';
  if (v === -Infinity) return '-inf';
  if (v === 0) return '0';
  var a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e15) return groups(String(v));
  if (a >= 1e6 || a < 1e-3) return v.toExponential(2).replace(/\.?0+e/, 'e').replace('e+', 'e');
  return String(+v.toPrecision(4));
}
function fmtPct(v) {
  if (!isNum(v)) return fmt(v);
  var p = v * 100;
  if (p === 0) return '0%';
  if (Math.abs(p) < 0.01) return p.toExponential(1) + '%';
  return String(+p.toPrecision(3)) + '%';
}
function fmtScale(v) {
  if (!isNum(v) || v <= 0) return fmt(v);
  var e = Math.log2(v);
  return Number.isInteger(e) ? '2^' + e + ' (' + fmt(v) + ')' : fmt(v);
}
// The same as HTML, with the exponent raised: 2<sup>16</sup> (65,536).
function scaleNode(v) {
  var f = document.createDocumentFragment(), e = isNum(v) && v > 0 ? Math.log2(v) : NaN;
  if (!Number.isInteger(e)) {
    f.appendChild(document.createTextNode(fmt(v)));
    return f;
  }
  f.appendChild(document.createTextNode('2'));
  f.appendChild(el('sup', null, String(e)));
  f.appendChild(document.createTextNode(' (' + fmt(v) + ')'));
  return f;
}

// --- the log -------------------------------------------------------------
function parseLog(text) {
  // The page starts the log on the line after the data block's opening tag.
  if (text.charAt(0) === '\n') text = text.slice(1);
  var lines = text.split('\n'), header = null, records = [];
  for (var i = 0; i < lines.length; ++i) {
    var line = lines[i].trim(), where = 'line ' + (i + 1);
    if (!line) continue;
    var obj;
    try {
      obj = JSON.parse(line);
    } catch (e) {
      throw new Error(where + ' is not valid JSON (' + e.message + ')');
    }
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
      throw new Error(where + ' is not a JSON object');
    }
    if (!header) {
      if (obj.type !== 'header') throw new Error(where + ': the log must start with its header record');
      if (obj.schema !== SCHEMA) throw new Error(where + ': schema "' + obj.schema + '" is not ' + SCHEMA);
      if (!Array.isArray(obj.params)) throw new Error(where + ': the header has no "params" list');
      header = obj;
    } else if (obj.type === 'log') {
      checkRecord(obj, where, header);
      records.push(obj);
    } else {
      throw new Error(where + ': unexpected record type "' + obj.type + '"');
    }
  }
  if (!header) throw new Error('the log is empty: it has no header line');
  return { header: header, records: records };
}

function checkRecord(r, where, header) {
  function need(ok, what) {
    if (!ok) throw new Error(where + (isNum(r.step) ? ' (step ' + r.step + ')' : '') + ': ' + what);
  }
  var nbins = (header.bins && header.bins.count) || 64;
  need(isNum(r.step), '"step" is missing or not a number');
  var s = r.steps;
  need(s && typeof s === 'object', '"steps" is missing');
  need(isNum(s.first), '"steps.first" is missing');
  ['loss', 'scale', 'skipped', 'grad_norm'].forEach(function (k) {
    need(Array.isArray(s[k]), '"steps.' + k + '" is not an array');
  });
  var n = s.loss.length;
  need(n > 0, '"steps" holds no step');
  need(s.scale.length === n && s.skipped.length === n && s.grad_norm.length === n,
       'the "steps" arrays differ in length');
  need(s.first + n - 1 === r.step,
       '"steps" runs from ' + s.first + ' over ' + n + ' steps, so its last is not "step"');
  need(Array.isArray(r.params) && r.params.length === header.params.length,
       '"params" has ' + (Array.isArray(r.params) ? r.params.length : 'no') + ' entries, the header lists ' +
       header.params.length);
  r.params.forEach(function (p, i) {
    need(p && Array.isArray(p.hist) && p.hist.length === nbins, 'params[' + i + '].hist is not ' + nbins + ' counts');
  });
  need(r.overall && Array.isArray(r.overall.hist) && r.overall.hist.length === nbins,
       '"overall.hist" is not ' + nbins + ' counts');
  need(r.events === undefined || r.events === null || Array.isArray(r.events), '"events" is not a list');
}

// The log as columns: every step, and every logged step.
function collect(log) {
  var P = log.header.params.length;
  var d = {
    header: log.header, records: log.records.length,
    step: [], loss: [], scale: [], skipped: [], gnorm: [],
    lfirst: [], lstep: [], ratio: [], under: [], sub: [], over: [], hist: [],
    events: [], forecast: null, forecastStep: null
  };
  for (var p = 0; p < P; ++p) d.ratio.push([]);
  log.records.forEach(function (r) {
    var s = r.steps;
    for (var j = 0; j < s.loss.length; ++j) {
      d.step.push(s.first + j);
      d.loss.push(num(s.loss[j]));
      d.scale.push(num(s.scale[j]));
      d.skipped.push(!!s.skipped[j]);
      d.gnorm.push(num(s.grad_norm[j]));
    }
    d.lfirst.push(s.first);
    d.lstep.push(r.step);
    for (var q = 0; q < P; ++q) d.ratio[q].push(num(r.params[q].update_ratio));
    d.under.push(num(r.overall.underflow));
    d.sub.push(num(r.overall.subnormal));
    d.over.push(num(r.overall.overflow));
    d.hist.push(r.overall.hist);
    (r.events || []).forEach(function (e) { if (e && typeof e === 'object') d.events.push(e); });
    if (r.forecast && typeof r.forecast === 'object') {
      d.forecast = r.forecast;
      d.forecastStep = r.step;
    }
  });
  return d;
}

// --- axes ----------------------------------------------------------------
function niceStep(span, count) {
  var raw = span / Math.max(1, count), mag = Math.pow(10, Math.floor(Math.log10(raw))), r = raw / mag;
  return (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
}
function tickText(v, step) {
  if (Math.abs(v) < step * 1e-6) return '0';
  var a = Math.abs(v);
  if (a >= 1e6 || a < 1e-3) return v.toExponential(1).replace('.0e', 'e').replace('e+', 'e');
  var decimals = Math.max(0, Math.min(8, -Math.floor(Math.log10(step) + 1e-9)));
  var t = v.toFixed(decimals);
  return decimals === 0 ? groups(t) : t;
}
// A linear axis over [lo, hi], widened to whole ticks, about `count` of them.
function linearAxis(lo, hi, count, format) {
  if (!isNum(lo) || !isNum(hi)) return null;
  if (hi <= lo) {
    var pad = lo === 0 ? 1 : Math.abs(lo) * 0.05;
    lo -= pad;
    hi += pad;
  }
  var step = niceStep(hi - lo, count);
  var a = Math.floor(lo / step + 1e-9) * step, b = Math.ceil(hi / step - 1e-9) * step, ticks = [];
  for (var k = 0; a + k * step <= b + step * 1e-6; ++k) {
    var v = a + k * step;
    ticks.push({ v: v, label: (format || tickText)(v, step) });
  }
  return { lo: a, hi: b, ticks: ticks, pos: function (x) { return (x - a) / (b - a); } };
}
// A log axis (base 2 or 10) over the positive finite values, whole powers at
// both ends; null when there are none.
function logAxis(values, base, count) {
  var lo = Infinity, hi = -Infinity, L = Math.log(base);
  values.forEach(function (v) {
    if (isNum(v) && v > 0) {
      var e = Math.log(v) / L;
      if (e < lo) lo = e;
      if (e > hi) hi = e;
    }
  });
  if (lo === Infinity) return null;
  var a = Math.floor(lo + 1e-9), b = Math.ceil(hi - 1e-9);
  if (b <= a) {
    a -= 1;
    b += 1;
  }
  var step = Math.max(1, Math.ceil((b - a) / count));
  a = Math.floor(a / step) * step;
  b = Math.ceil(b / step) * step;
  // Decimals where every tick is between 0.01 and 1000, powers otherwise.
  var plain = base === 10 && a >= -2 && b <= 3, ticks = [];
  for (var e = a; e <= b; e += step) {
    var lab = plain ? String(Math.pow(10, e)) : { base: String(base), exp: String(e) };
    ticks.push({ v: Math.pow(base, e), label: lab });
  }
  return { lo: a, hi: b, ticks: ticks, pos: function (v) { return v > 0 ? (Math.log(v) / L - a) / (b - a) : NaN; } };
}

// SVG text; a label may be {base, exp, after} for a power such as 2^-24.
function label(parent, x, y, lab, attrs) {
  attrs = Object.assign({ x: x, y: y }, attrs || {});
  if (attrs.fill) {
    // As a style: the stylesheet's fill for svg text outranks an attribute.
    attrs.style = 'fill:' + attrs.fill;
    delete attrs.fill;
  }
  var t = sv(parent, 'text', attrs);
  if (typeof lab === 'string') {
    t.textContent = lab;
  } else {
    t.appendChild(document.createTextNode(lab.base));
    sv(t, 'tspan', { dy: '-0.5em', 'font-size': '0.78em' }).textContent = lab.exp;
    if (lab.after) sv(t, 'tspan', { dy: '0.5em' }).textContent = lab.after;
  }
  return t;
}

// A plot area with its grid, ticks and axis titles; returns the mapping from
// data to pixels.
function frame(card, opt) {
  var W = opt.width, H = opt.height, m = opt.margin;
  var s = sv(null, 'svg', { width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, role: 'img' });
  card.appendChild(s);
  var pw = W - m.l - m.r, ph = H - m.t - m.b;
  var f = {
    svg: s, x0: m.l, x1: m.l + pw, y0: m.t, y1: m.t + ph,
    px: function (v) { return m.l + opt.x.pos(v) * pw; },
    py: opt.y ? function (v) { return m.t + (1 - opt.y.pos(v)) * ph; } : null
  };
  sv(s, 'rect', { x: m.l, y: m.t, width: pw, height: ph, fill: '#fbfcfd', stroke: '#c9d0d9' });
  if (opt.y) {
    opt.y.ticks.forEach(function (t) {
      var y = f.py(t.v);
      sv(s, 'line', { x1: m.l, x2: m.l + pw, y1: y, y2: y, stroke: '#e3e7ec' });
      label(s, m.l - 6, y + 4, t.label, { 'text-anchor': 'end' });
    });
  }
  opt.x.ticks.forEach(function (t) {
    var x = f.px(t.v);
    if (opt.xGrid !== false) sv(s, 'line', { x1: x, x2: x, y1: m.t, y2: m.t + ph, stroke: '#eef1f4' });
    sv(s, 'line', { x1: x, x2: x, y1: m.t + ph, y2: m.t + ph + 4, stroke: '#9aa5b1' });
    label(s, x, m.t + ph + 16, t.label, { 'text-anchor': 'middle' });
  });
  if (opt.xTitle) label(s, m.l + pw / 2, H - 3, opt.xTitle, { 'text-anchor': 'middle', 'class': 'title' });
  if (opt.yTitle) {
    label(s, 0, 0, opt.yTitle, {
      'text-anchor': 'middle', 'class': 'title',
      transform: 'translate(13,' + (m.t + ph / 2) + ') rotate(-90)'
    });
  }
  return f;
}

// A polyline through the finite points, broken where a value is not finite
// (or not positive on a log axis). Past a few points per pixel it keeps each
// pixel column's extremes, which looks the same and keeps the SVG small.
function linePath(xs, ys, f, stepped) {
  var parts = [], pen = false, n = xs.length;
  var thin = n > 3 * (f.x1 - f.x0);
  function at(X, Y) {
    if (!pen) parts.push('M' + X.toFixed(1) + ' ' + Y.toFixed(1));
    else if (stepped && !thin) parts.push('H' + X.toFixed(1) + 'V' + Y.toFixed(1));
    else parts.push('L' + X.toFixed(1) + ' ' + Y.toFixed(1));
    pen = true;
  }
  if (!thin) {
    for (var i = 0; i < n; ++i) {
      var X = f.px(xs[i]), Y = f.py(ys[i]);
      if (isNum(X) && isNum(Y)) at(X, Y);
      else pen = false;
    }
    return parts.join('');
  }
  var col = null, lo = null, hi = null, broke = false;
  function flush() {
    if (col === null) return;
    if (lo !== null) {
      at(col, lo[0] < hi[0] ? lo[1] : hi[1]);
      at(col, lo[0] < hi[0] ? hi[1] : lo[1]);
    }
    if (broke) pen = false;
  }
  for (var k = 0; k < n; ++k) {
    var x = Math.round(f.px(xs[k])), y = f.py(ys[k]);
    if (x !== col) {
      flush();
      col = x;
      lo = hi = null;
      broke = false;
    }
    if (!isNum(y)) {
      broke = true;
      continue;
    }
    if (lo === null || y > lo[1]) lo = [k, y];
    if (hi === null || y < hi[1]) hi = [k, y];
  }
  flush();
  return parts.join('');
}

function ramp(t) {
  t = Math.max(0, Math.min(1, t));
  var x = t * (RAMP.length - 1), i = Math.min(RAMP.length - 2, Math.floor(x)), w = x - i;
  var a = RAMP[i], b = RAMP[i + 1];
  return 'rgb(' + Math.round(a[0] + (b[0] - a[0]) * w) + ',' + Math.round(a[1] + (b[1] - a[1]) * w) + ',' +
         Math.round(a[2] + (b[2] - a[2]) * w) + ')';
}

function legend(card, items) {
  var box = el('div', 'legend');
  items.forEach(function (it) {
    var key = el('span', 'key'), sw = el('span', 'sw' + (it.shape ? ' ' + it.shape : ''));
    if (it.shape === 'tri') sw.style.borderTopColor = it.colour;
    else sw.style.background = it.colour;
    key.appendChild(sw);
    key.appendChild(document.createTextNode(it.label));
    box.appendChild(key);
  });
  card.appendChild(box);
}

function card(parent, title, note, full) {
  var c = el('section', 'card' + (full ? ' full' : ''));
  c.appendChild(el('h2', null, title));
  if (note) c.appendChild(el('p', 'note', note));
  parent.appendChild(c);
  return c;
}
function plotWidth(c) { return Math.max(320, Math.floor(c.getBoundingClientRect().width) - 30); }
function nothing(c, why) {
  c.appendChild(el('p', 'empty', why));
  return false;
}
)mixprec";
}

// The script, 2/3: the charts.
inline const char* report_js_charts() {
  return R"mixprec(// --- charts ----------------------------------------------------------------
// The x axis every chart shares: the steps the log covers.
function stepAxis(d, width) {
  return linearAxis(d.lfirst[0] - 1, d.lstep[d.lstep.length - 1], Math.max(3, Math.round(width / 110)));
}

// spec: title, note, y ('linear', 'log2', 'log10'), yTitle, yFormat, zeroBased,
// series [{label, colour, xs, ys, stepped, dots, width}], markers [{x, y, colour,
// text, tip}] (y null: a marker above the plot for a value that is not
// finite), legend (extra legend items), full, height.
function lineChart(parent, d, spec) {
  var c = card(parent, spec.title, spec.note, spec.full);
  var values = [], hlines = spec.hlines || [];
  spec.series.forEach(function (s) { values = values.concat(s.ys); });
  hlines.forEach(function (h) { values.push(h.y); });
  var yAxis;
  if (spec.y === 'linear') {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (v) {
      if (isNum(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    });
    if (lo === Infinity) return nothing(c, 'Nothing to draw: no finite values.');
    if (spec.zeroBased) lo = Math.min(lo, 0);
    yAxis = linearAxis(lo, hi, 5, spec.yFormat);
  } else {
    yAxis = logAxis(values, spec.y === 'log2' ? 2 : 10, 6);
    if (!yAxis) return nothing(c, 'Nothing to draw: no finite positive values.');
  }
  var W = plotWidth(c), markers = spec.markers || [];
  var above = markers.some(function (m) { return m.y === null; });  // markers above the plot need room
  var margin = spec.margin || { l: 64, r: 14, t: above ? 24 : 10, b: 36 };
  var f = frame(c, {
    width: W, height: spec.height || 260, margin: margin, x: stepAxis(d, W - margin.l - margin.r), y: yAxis,
    xTitle: 'step', yTitle: spec.yTitle
  });
  hlines.forEach(function (h) {
    var Y = f.py(h.y);
    sv(f.svg, 'line', {
      x1: f.x0, x2: f.x1, y1: Y, y2: Y, stroke: h.colour, 'stroke-width': 1.2, 'stroke-dasharray': '6 4'
    });
    label(f.svg, f.x0 + 6, Y - 5, h.text, { fill: h.colour, 'class': 'mark' });
  });
  spec.series.forEach(function (s) {
    sv(f.svg, 'path', {
      d: linePath(s.xs, s.ys, f, s.stepped), fill: 'none', stroke: s.colour,
      'stroke-width': s.width || 1.6, 'stroke-linejoin': 'round'
    });
    if (s.dots) {
      for (var i = 0; i < s.xs.length; ++i) {
        var X = f.px(s.xs[i]), Y = f.py(s.ys[i]);
        if (!isNum(X) || !isNum(Y)) continue;
        tip(sv(f.svg, 'circle', { cx: X, cy: Y, r: 2.6, fill: s.colour }),
            s.label + ' at step ' + s.xs[i] + ': ' + (spec.yFormat ? spec.yFormat(s.ys[i]) : fmt(s.ys[i])));
      }
    }
  });
  // Guide lines down from the markers while they are few enough to tell apart.
  var labelled = 0, guides = markers.filter(function (m) { return m.y === null; }).length <= 40;
  markers.forEach(function (m) {
    var X = f.px(m.x), node;
    if (!isNum(X)) return;
    if (m.y === null) {
      var top = f.y0 - 12;
      node = sv(f.svg, 'path', {
        d: 'M' + (X - 5) + ' ' + top + 'L' + (X + 5) + ' ' + top + 'L' + X + ' ' + (top + 9) + 'Z', fill: m.colour
      });
      if (guides) {
        sv(f.svg, 'line', {
          x1: X, x2: X, y1: f.y0, y2: f.y1, stroke: m.colour, 'stroke-dasharray': '3 3', opacity: 0.55
        });
      }
      if (m.text && labelled++ < 8) {
        label(f.svg, X + 7, top + 8, m.text, { 'class': 'mark', fill: m.colour });
      }
    } else {
      var Y = f.py(m.y);
      if (!isNum(Y)) return;
      node = sv(f.svg, 'circle', { cx: X, cy: Y, r: 3.8, fill: m.colour, stroke: '#fff', 'stroke-width': 1 });
    }
    if (m.tip) tip(node, m.tip);
  });
  var items = spec.series.map(function (s) { return { label: s.label, colour: s.colour }; });
  legend(c, items.concat(spec.legend || []));
  return true;
}

function lossChart(parent, d) {
  var markers = [], bad = 0;
  d.loss.forEach(function (v, i) {
    if (isNum(v)) return;
    ++bad;
    markers.push({
      x: d.step[i], y: null, colour: '#c62828', text: fmt(v), tip: 'step ' + d.step[i] + ': loss ' + fmt(v)
    });
  });
  return lineChart(parent, d, {
    title: 'Loss', note: 'Per step, as the trainer gave it.' + (bad ? ' \u25BC: a loss that is not finite.' : ''),
    y: 'linear', yTitle: 'loss',
    series: [{ label: 'loss', colour: PALETTE[0], xs: d.step, ys: d.loss, width: 1.4 }],
    markers: markers,
    legend: bad ? [{ label: 'NaN or inf loss (' + bad + ')', colour: '#c62828', shape: 'tri' }] : []
  });
}

function scaleChart(parent, d) {
  var markers = [], skipped = 0;
  d.skipped.forEach(function (s, i) {
    if (!s) return;
    ++skipped;
    markers.push({
      x: d.step[i], y: d.scale[i], colour: '#d62728',
      tip: 'step ' + d.step[i] + ' skipped at scale ' + fmtScale(d.scale[i])
    });
  });
  return lineChart(parent, d, {
    title: 'Loss scale',
    note: 'The scale each step\u2019s gradients carried (log\u2082 axis); a dot marks a skipped step.',
    y: 'log2', yTitle: 'loss scale',
    series: [{ label: 'loss scale', colour: PALETTE[2], xs: d.step, ys: d.scale, stepped: true, width: 1.8 }],
    markers: markers,
    legend: [{ label: 'skipped step (' + skipped + ')', colour: '#d62728', shape: 'dot' }]
  });
}

function gradNormChart(parent, d) {
  var markers = [], bad = 0;
  d.gnorm.forEach(function (v, i) {
    if (isNum(v)) return;
    ++bad;
    markers.push({
      x: d.step[i], y: null, colour: '#ef6c00', tip: 'step ' + d.step[i] + ': gradient norm ' + fmt(v)
    });
  });
  return lineChart(parent, d, {
    title: 'Gradient norm', note: 'L2 norm of all unscaled gradients, per step (log axis).' +
      (bad ? ' \u25BC: not finite (the step was skipped).' : ''),
    y: 'log10', yTitle: '\u2016g\u2016\u2082',
    series: [{ label: 'global gradient norm', colour: PALETTE[3], xs: d.step, ys: d.gnorm, width: 1.3 }],
    markers: markers,
    legend: bad ? [{ label: 'inf or NaN (' + bad + ')', colour: '#ef6c00', shape: 'tri' }] : []
  });
}

function ratioChart(parent, d) {
  var params = d.header.params;
  return lineChart(parent, d, {
    title: 'Update ratio per parameter',
    note: '\u2016\u0394w\u2016 / \u2016w\u2016 of the fp32 masters at each logged step (log axis); ' +
          'a skipped step\u2019s 0 is left out.',
    y: 'log10', yTitle: 'update ratio',
    series: params.map(function (p, i) {
      return {
        label: String(p.name), colour: PALETTE[i % PALETTE.length], xs: d.lstep, ys: d.ratio[i],
        dots: d.lstep.length <= 200
      };
    })
  });
}

function sharesChart(parent, d, margin) {
  // The log's header does not say the detectors' underflow threshold; the
  // whole-model underflow events do.
  var threshold = null;
  d.events.forEach(function (e) {
    var model = e.param === null || e.param === undefined;
    if (e.kind === 'underflow' && model && isNum(num(e.threshold))) threshold = num(e.threshold);
  });
  return lineChart(parent, d, {
    hlines: threshold === null ? [] : [{
      y: threshold, colour: '#c62828', text: 'underflow threshold ' + fmtPct(threshold) + ' (from the events)'
    }],
    title: 'fp16 shares of the gradients',
    note: 'Share of all gradient elements, as stored (multiplied by the loss scale), at each logged step: ' +
          'lost in fp16 (zero or below 2\u207B\u00B2\u2074), fp16 subnormal [2\u207B\u00B2\u2074, 2\u207B\u00B9\u2074), ' +
          'overflow (2\u00B9\u2076 and up, or not finite).',
    y: 'linear', yTitle: 'share', zeroBased: true, full: true, height: 230, margin: margin,
    yFormat: function (v, step) {
      // A tick (with its step): as many decimals as the step needs; a value: fmtPct.
      if (step === undefined) return fmtPct(v);
      return (v * 100).toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step * 100) + 1e-9)))) + '%';
    },
    series: [
      { label: 'underflow (lost)', colour: '#c62828', xs: d.lstep, ys: d.under, dots: d.lstep.length <= 200 },
      { label: 'subnormal', colour: '#ef8f00', xs: d.lstep, ys: d.sub, dots: d.lstep.length <= 200 },
      { label: 'overflow', colour: '#6a1b9a', xs: d.lstep, ys: d.over, dots: d.lstep.length <= 200 }
    ]
  });
}

// The exponent histogram over time: a column per logged step (covering the
// steps since the previous one), a row per bin, colour = share of elements
// on a log scale.
function heatmap(parent, d, margin) {
  var c = card(parent, 'Exponent histogram of the gradients',
    'All gradients as stored (multiplied by the loss scale): a column per logged step, a row per power of two ' +
    '(the lowest row also holds everything smaller, the highest everything from 2\u00B9\u2076 up); ' +
    'colour: share of elements.',
    true);
  var bins = d.header.bins || {}, nb = bins.count || 64, offset = bins.offset || 46;
  function get(key, fallback) { return isNum(bins[key]) ? bins[key] : fallback; }
  var minE = get('min_exponent', -45), maxE = get('max_exponent', 16);
  var zeroBin = get('zero', 0), nfBin = get('nonfinite', nb - 1);
  var rows = maxE - minE + 1, rowH = 5, gap = 7;
  var W = plotWidth(c), H = margin.t + rowH + gap + rows * rowH + gap + rowH + margin.b;
  var xAxis = stepAxis(d, W - margin.l - margin.r);
  var f = frame(c, {
    width: W, height: H, margin: margin, x: xAxis, y: null, xTitle: 'step', yTitle: '|gradient| \u00D7 scale',
    xGrid: false
  });
  var s = f.svg, yTopRange = f.y0 + rowH + gap;
  // The top of a bin's row: the non-finite row on top, then 2^maxE down to
  // 2^minE, then the zeros.
  function rowTop(b) {
    if (b === nfBin) return f.y0;
    if (b === zeroBin) return yTopRange + rows * rowH + gap;
    return yTopRange + (maxE - (b - offset)) * rowH;
  }
  sv(s, 'rect', { x: f.x0, y: yTopRange - gap / 2, width: f.x1 - f.x0, height: gap / 2, fill: '#fff' });
  // Columns: one per record, or per pixel when there are more records than pixels.
  var cols = [];
  for (var k = 0; k < d.lstep.length; ++k) {
    var x0 = f.px(d.lfirst[k] - 1), x1 = f.px(d.lstep[k]), h = d.hist[k], total = 0;
    for (var b = 0; b < nb; ++b) total += h[b];
    if (!(total > 0)) continue;
    var last = cols[cols.length - 1];
    if (last && x1 - last.x0 < 1.5) {
      for (var b2 = 0; b2 < nb; ++b2) last.share[b2] += h[b2] / total;
      last.x1 = x1;
      last.n += 1;
      last.to = d.lstep[k];
    } else {
      var share = [];
      for (var b3 = 0; b3 < nb; ++b3) share.push(h[b3] / total);
      cols.push({ x0: x0, x1: x1, share: share, n: 1, from: d.lfirst[k], to: d.lstep[k] });
    }
  }
  var withTips = cols.length <= 400;
  cols.forEach(function (col) {
    for (var b = 0; b < nb; ++b) {
      var v = col.share[b] / col.n;
      if (!(v > 0)) continue;
      var r = sv(s, 'rect', {
        // Half a pixel wider than the column: no anti-aliased seams between them.
        x: col.x0.toFixed(2), y: rowTop(b), width: Math.max(0.8, col.x1 - col.x0 + 0.5).toFixed(2), height: rowH,
        fill: ramp((Math.log10(v) + 5) / 5)
      });
      if (withTips) {
        var what = b === zeroBin ? 'zeros' : b === nfBin ? 'inf or NaN' :
          '2^' + (b - offset) + ' \u2264 |g| < 2^' + (b - offset + 1);
        tip(r, 'steps ' + col.from + '\u2013' + col.to + ', ' + what + ': ' + fmtPct(v));
      }
    }
  });
  // Row labels: every fifth power, the zeros and the non-finite values.
  // (Not the lowest edge: that row holds everything smaller.)
  for (var e = minE + 1; e < maxE; ++e) {
    if (e % 5 !== 0) continue;
    var y = rowTop(e + offset) + rowH;
    sv(s, 'line', { x1: f.x0 - 4, x2: f.x0, y1: y, y2: y, stroke: '#9aa5b1' });
    label(s, f.x0 - 6, y + 4, { base: '2', exp: String(e) }, { 'text-anchor': 'end' });
  }
  label(s, f.x0 - 6, rowTop(zeroBin) + rowH, '0', { 'text-anchor': 'end' });
  label(s, f.x0 - 6, rowTop(nfBin) + rowH, 'inf/NaN', { 'text-anchor': 'end' });
  // fp16's boundaries, at the lower edge of their bins.
  [
    { e: -24, colour: '#d32f2f', text: ' fp16 smallest subnormal' },
    { e: -14, colour: '#ef6c00', text: ' fp16 smallest normal' },
    { e: 16, colour: '#d32f2f', text: ' fp16 overflow (max 65504)' }
  ].forEach(function (line) {
    if (line.e < minE || line.e > maxE) return;
    var y = rowTop(line.e + offset) + rowH;
    sv(s, 'line', {
      x1: f.x0, x2: f.x1 + 6, y1: y, y2: y, stroke: line.colour, 'stroke-width': 1.6, 'stroke-dasharray': '6 3'
    });
    label(s, f.x1 + 9, y + 4, { base: '2', exp: String(line.e), after: line.text },
          { fill: line.colour, 'class': 'mark' });
  });
  // The colour bar, above the plot on the right.
  var barW = 220, bx = f.x1 - barW, by = 6;
  for (var i = 0; i < 60; ++i) {
    sv(s, 'rect', {
      x: (bx + i * barW / 60).toFixed(2), y: by, width: (barW / 60 + 0.3).toFixed(2), height: 9, fill: ramp(i / 59)
    });
  }
  ['0.001%', '0.01%', '0.1%', '1%', '10%', '100%'].forEach(function (t, j) {
    label(s, bx + j * barW / 5, by + 21, t, { 'text-anchor': 'middle' });
  });
  sv(s, 'rect', { x: bx - 52, y: by, width: 12, height: 9, fill: '#fbfcfd', stroke: '#c9d0d9' });
  label(s, bx - 36, by + 9, 'none', {});
  label(s, bx - 64, by + 9, 'share of elements:', { 'text-anchor': 'end', 'class': 'title' });
  return true;
}
)mixprec";
}

// The script, 3/3: the text panels, drawing the page and reporting how it went.
inline const char* report_js_page() {
  return R"mixprec(// --- text panels -------------------------------------------------------------
function stat(parent, value, key, tone) {
  var s = el('div', 'stat' + (tone ? ' ' + tone : '')), v = el('div', 'v');
  if (typeof value === 'string') v.textContent = value;
  else v.appendChild(value);
  s.appendChild(v);
  s.appendChild(el('div', 'k', key));
  parent.appendChild(s);
}

function overview(parent, d) {
  var c = card(parent, 'Overview', null, true), row = el('div', 'overview');
  c.appendChild(row);
  var left = el('div'), right = el('div');
  row.appendChild(left);
  row.appendChild(right);
  left.appendChild(el('h3', null, 'The run'));
  var stats = el('div', 'stats');
  left.appendChild(stats);
  var n = d.step.length, skipped = 0, badLoss = 0, lastLoss = NaN;
  for (var i = 0; i < n; ++i) {
    if (d.skipped[i]) ++skipped;
    if (!isNum(d.loss[i])) ++badLoss;
    else lastLoss = d.loss[i];
  }
  stat(stats, fmt(d.lstep[d.lstep.length - 1]), 'steps monitored');
  stat(stats, fmt(d.records), 'logged steps');
  stat(stats, fmt(skipped) + (n ? ' (' + fmtPct(skipped / n) + ')' : ''), 'skipped steps', skipped ? 'warn' : 'good');
  stat(stats, fmt(badLoss), 'NaN/inf losses', badLoss ? 'bad' : 'good');
  stat(stats, fmt(lastLoss), 'last finite loss');
  stat(stats, scaleNode(d.scale[n - 1]), 'last loss scale');
  stat(stats, fmt(d.events.length), 'events', d.events.length ? 'warn' : 'good');

  var fc = d.forecast;
  right.appendChild(el('h3', null, fc ? 'Last forecast (step ' + fmt(d.forecastStep) + ')' : 'Forecast'));
  var fstats = el('div', 'stats');
  right.appendChild(fstats);
  if (!fc) {
    fstats.appendChild(el('div', 'empty', 'The log holds no forecast.'));
    return;
  }
  // Absent: the trend does not point that way; 0: already there.
  function steps(v) {
    if (v === null || v === undefined) return 'not in sight';
    return num(v) === 0 ? 'reached' : fmt(num(v)) + ' steps';
  }
  var toMin = num(fc.steps_to_min_scale), toUnder = num(fc.steps_to_underflow);
  stat(fstats, steps(fc.steps_to_min_scale), 'to the minimum loss scale', isNum(toMin) ? 'bad' : null);
  stat(fstats, steps(fc.steps_to_underflow), 'to the underflow threshold',
       isNum(toUnder) ? (toUnder === 0 ? 'bad' : 'warn') : null);
  var slope = fc.loss_slope === null || fc.loss_slope === undefined ? '\u2014' : fmt(num(fc.loss_slope));
  stat(fstats, slope, 'loss slope per step');
  stat(fstats, fc.diverging ? 'yes' : 'no', 'diverging', fc.diverging ? 'bad' : 'good');
}

function eventsTable(parent, d) {
  var c = card(parent, 'Events (' + d.events.length + ')',
    'What the detectors found, oldest first. Parameter \u201C\u2014\u201D: the whole model.', true);
  if (!d.events.length) return nothing(c, 'No events: the detectors found nothing.');
  var wrap = el('div', 'scroll'), t = el('table'), head = el('tr');
  ['step', 'kind', 'parameter', 'value', 'threshold', 'message', 'suggestion'].forEach(function (h) {
    head.appendChild(el('th', null, h));
  });
  var thead = el('thead');
  thead.appendChild(head);
  t.appendChild(thead);
  var body = el('tbody');
  d.events.forEach(function (e) {
    var tr = el('tr');
    tr.appendChild(el('td', 'num', fmt(e.step)));
    var kindCell = el('td', 'nowrap'), badge = el('span', 'kind', e.kind);
    badge.style.background = KIND_COLOURS[e.kind] || '#546e7a';
    kindCell.appendChild(badge);
    tr.appendChild(kindCell);
    var whole = e.param === null || e.param === undefined || e.param === '';
    tr.appendChild(el('td', 'nowrap', whole ? '\u2014' : String(e.param)));
    tr.appendChild(el('td', 'num', fmt(e.value)));
    tr.appendChild(el('td', 'num', fmt(e.threshold)));
    tr.appendChild(el('td', null, e.message || ''));
    tr.appendChild(el('td', null, e.suggestion || ''));
    body.appendChild(tr);
  });
  t.appendChild(body);
  wrap.appendChild(t);
  c.appendChild(wrap);
  return true;
}

function runInfo(box, h) {
  box.textContent = '';
  function item(k, v) {
    var s = el('span');
    s.appendChild(el('span', 'k', k));
    s.appendChild(typeof v === 'string' ? document.createTextNode(v) : v);
    box.appendChild(s);
  }
  item('optimizer', h.optimizer === undefined ? '\u2014' : String(h.optimizer));
  item('device', h.device === undefined ? '\u2014' : String(h.device));
  item('scaling', h.scaling === undefined ? '\u2014' : String(h.scaling));
  item('initial scale', scaleNode(num(h.init_scale)));
  item('scale range', '[' + fmt(h.min_scale) + ', ' + fmt(h.max_scale) + ']');
  item('logged every', fmt(h.every) + ' steps');
  var total = 0;
  h.params.forEach(function (p) { total += isNum(p.numel) ? p.numel : 0; });
  item('parameters', fmt(h.params.length) + ' (' + fmt(total) + ' elements)');
  var list = el('div', 'params');
  h.params.forEach(function (p) {
    var chip = el('span', 'chip', String(p.name) + ' ');
    chip.appendChild(el('span', 'd', fmt(p.numel) + ' \u00B7 ' + String(p.dtype)));
    list.appendChild(chip);
  });
  if (h.params.length > 12) {
    var det = el('details');
    det.appendChild(el('summary', null, 'the ' + h.params.length + ' parameters'));
    det.appendChild(list);
    det.style.flexBasis = '100%';
    box.appendChild(det);
  } else {
    box.appendChild(list);
  }
}

// --- the page ----------------------------------------------------------------
var root = document.getElementById('report'), statusEl = document.getElementById('render-status');
var data = null;

function fail(message) {
  root.textContent = '';
  var b = el('div', 'banner error', 'This report cannot be drawn: ' + message);
  root.appendChild(b);
  statusEl.textContent = 'error: ' + message;
  document.body.dataset.rendered = 'error';
}

function draw() {
  root.textContent = '';
  overview(root, data);
  var charts = 0;
  if (lossChart(root, data)) ++charts;
  if (scaleChart(root, data)) ++charts;
  if (gradNormChart(root, data)) ++charts;
  if (ratioChart(root, data)) ++charts;
  // The two full-width charts share their margins, so their steps line up.
  var margin = { l: 64, r: 200, t: 30, b: 36 };
  if (heatmap(root, data, margin)) ++charts;
  if (sharesChart(root, data, { l: margin.l, r: margin.r, t: 10, b: 36 })) ++charts;
  eventsTable(root, data);
  return charts;
}

function render() {
  try {
    var log = parseLog(document.getElementById('monitor-log').textContent);
    runInfo(document.getElementById('run-info'), log.header);
    if (!log.records.length) {
      root.textContent = '';
      root.appendChild(el('div', 'banner', 'The log has its header but no logged step yet: the first record is ' +
                                            'written after ' + fmt(log.header.every) + ' steps.'));
      statusEl.textContent = '0 charts';
      statusEl.dataset.charts = '0';
      document.body.dataset.rendered = 'ok';
      return;
    }
    data = collect(log);
    var charts = draw();
    statusEl.textContent = charts + ' charts';
    statusEl.dataset.charts = String(charts);
    document.body.dataset.rendered = 'ok';
  } catch (e) {
    fail(e && e.message ? e.message : String(e));
  }
}

render();
// Redraw at the new width when the window is resized.
var lastWidth = window.innerWidth, pending = null;
window.addEventListener('resize', function () {
  if (!data || window.innerWidth === lastWidth) return;
  lastWidth = window.innerWidth;
  clearTimeout(pending);
  pending = setTimeout(function () {
    try {
      draw();
    } catch (e) {
      fail(e && e.message ? e.message : String(e));
    }
  }, 150);
});
})();
)mixprec";
}

}  // namespace mixprec::monitor::detail
#endif  // MIXPREC_DOXYGEN
