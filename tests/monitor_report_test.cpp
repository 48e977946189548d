// SPDX-License-Identifier: Apache-2.0
// The monitor's HTML report: self-contained (nothing fetched), the log
// embedded so that no content can end its script element, and logs that are
// empty or malformed rejected with the line named. tests/monitor/
// render_report.py checks in a browser that the page really draws.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "mixprec/monitor/report.hpp"
#include "test_util.hpp"

#ifndef MIXPREC_MONITOR_SAMPLE
#error "MIXPREC_MONITOR_SAMPLE must name tests/monitor/sample.jsonl"
#endif

namespace mixprec::monitor {
namespace {

using test::expect_error;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.is_open()) << path;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::size_t count(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

std::string lower(std::string s) {
  for (char& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

// The text between <script type="application/json" id="monitor-log"> and the
// first "</script" after it, as the HTML tokenizer would end it.
std::string embedded_log(const std::string& page) {
  const std::string open = "<script type=\"application/json\" id=\"monitor-log\">";
  const std::size_t start = page.find(open);
  EXPECT_NE(start, std::string::npos);
  if (start == std::string::npos) return {};
  const std::size_t body = start + open.size();
  const std::size_t end = lower(page).find("</script", body);
  EXPECT_NE(end, std::string::npos);
  return page.substr(body, end - body);
}

const char* header_line =
    R"({"type":"header","schema":"mixprec.monitor/1","optimizer":"SGD","device":"cpu","scaling":"dynamic",)"
    R"("init_scale":65536,"min_scale":1,"max_scale":"inf","every":1,)"
    R"("bins":{"count":64,"zero":0,"nonfinite":63,"min_exponent":-45,"max_exponent":16,"offset":46},)"
    R"("params":[{"name":"w","numel":4,"dtype":"float16"}]})";

// One record of one step; `name_or_message` goes into an event's message.
std::string record(int step, const std::string& message = "ok") {
  std::string hist = "[4";
  for (int b = 1; b < 64; ++b) hist += ",0";
  hist += "]";
  return R"({"type":"log","step":)" + std::to_string(step) + R"(,"steps":{"first":)" + std::to_string(step) +
         R"(,"loss":[1.5],"scale":[65536],"skipped":[0],"grad_norm":[0.5],"nonfinite_params":[[]]},)"
         R"("params":[{"grad_norm":0.5,"update_ratio":0.001,"eps_share":null,"nonfinite":false,)"
         R"("underflow":1,"subnormal":0,"overflow":0,"hist":)" +
         hist + R"(}],"overall":{"underflow":1,"subnormal":0,"overflow":0,"hist":)" + hist +
         R"(},"forecast":null,"events":[{"kind":"underflow","step":)" + std::to_string(step) +
         R"(,"param":null,"value":1,"threshold":0.25,"message":")" + message + R"(","suggestion":"x"}]})";
}

TEST(MonitorReport, FixtureIsOneSelfContainedPage) {
  const std::string log = read_file(MIXPREC_MONITOR_SAMPLE);
  ASSERT_GT(log.size(), 1000u);
  const std::string page = render_report(log, "sample run");
  const std::string low = lower(page);

  EXPECT_EQ(page.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_NE(page.find("<title>sample run</title>"), std::string::npos);
  // Nothing from outside: no URL, no src attribute, no stylesheet link, no
  // CSS import or url(); the CSP forbids any fetch besides.
  EXPECT_EQ(count(low, "http://"), 0u);
  EXPECT_EQ(count(low, "https://"), 0u);
  EXPECT_EQ(count(low, "src="), 0u);
  EXPECT_EQ(count(low, "<link"), 0u);
  EXPECT_EQ(count(low, "@import"), 0u);
  EXPECT_EQ(count(low, "url("), 0u);
  EXPECT_EQ(count(low, "<img"), 0u);
  EXPECT_EQ(count(low, "<iframe"), 0u);
  EXPECT_NE(page.find("Content-Security-Policy\" content=\"default-src 'none'"), std::string::npos);
  // Two script elements: the data and the code that draws it.
  EXPECT_EQ(count(low, "<script"), 2u);
  EXPECT_EQ(count(low, "</script"), 2u);
  // What the checks below look for in a browser.
  EXPECT_NE(page.find("id=\"render-status\""), std::string::npos);
  EXPECT_NE(page.find("dataset.rendered = 'ok'"), std::string::npos);

  // The log, whole, as the data block (it has no '<' to escape).
  ASSERT_EQ(log.find('<'), std::string::npos);
  EXPECT_EQ(embedded_log(page), "\n" + log + "\n");
}

TEST(MonitorReport, TitleIsEscaped) {
  const std::string page = render_report(std::string(header_line) + "\n", "a <b> & \"c\"");
  EXPECT_NE(page.find("<title>a &lt;b&gt; &amp; &quot;c&quot;</title>"), std::string::npos);
  EXPECT_NE(page.find("<h1>a &lt;b&gt; &amp; &quot;c&quot;</h1>"), std::string::npos);
  EXPECT_EQ(page.find("<b>"), std::string::npos);
  // An empty title gets a generic one.
  EXPECT_NE(render_report(std::string(header_line), "").find("<title>mixprec monitor report</title>"),
            std::string::npos);
}

TEST(MonitorReport, LogContentCannotLeaveTheScriptElement) {
  // A parameter name and messages that would end the script element, open
  // an HTML comment (which makes the tokenizer skip the real end tag), or
  // hold the JavaScript line terminators U+2028/U+2029.
  std::string log = header_line;
  const std::string evil_name = "</script><script>alert(1)</script>";
  log.replace(log.find("\"name\":\"w\""), 10, "\"name\":\"" + evil_name + "\"");
  log += "\n" + record(1, "<!--<script>x</SCRIPT >") + "\n" + record(2, "line\xe2\x80\xa8sep\xe2\x80\xa9par") + "\n";

  const std::string page = render_report(log, "t");
  const std::string low = lower(page);
  EXPECT_EQ(count(low, "<script"), 2u);
  EXPECT_EQ(count(low, "</script"), 2u);
  EXPECT_EQ(count(page, "<!--"), 0u);
  EXPECT_EQ(page.find("\xe2\x80\xa8"), std::string::npos);
  EXPECT_EQ(page.find("\xe2\x80\xa9"), std::string::npos);

  // Decoding the escapes gives the log back: the JSON means the same.
  std::string data = embedded_log(page);
  ASSERT_FALSE(data.empty());
  for (const auto& [from, to] : {std::pair<std::string, std::string>{"\\u003c", "<"}, {"\\u003e", ">"},
                                 {"\\u2028", "\xe2\x80\xa8"}, {"\\u2029", "\xe2\x80\xa9"}}) {
    for (std::size_t at = data.find(from); at != std::string::npos; at = data.find(from, at + to.size())) {
      data.replace(at, from.size(), to);
    }
  }
  EXPECT_EQ(data, "\n" + log + "\n");
}

TEST(MonitorReport, EmptyLogsThrow) {
  expect_error([] { render_report("", "t"); }, {"render_report", "empty", "header"});
  expect_error([] { render_report("\n  \n\t\r\n", "t"); }, {"empty"});
}

TEST(MonitorReport, MalformedLogsThrowNamingTheLine) {
  const std::string h = header_line;
  // The first record must be the header, of this schema.
  expect_error([] { render_report(record(1) + "\n", "t"); }, {"line 1", "header", "\"log\""});
  expect_error([&] { render_report("\n\n" + record(1) + "\n", "t"); }, {"line 3", "header"});
  std::string other = h;
  other.replace(other.find("mixprec.monitor/1"), 17, "mixprec.monitor/2");
  expect_error([&] { render_report(other + "\n", "t"); }, {"line 1", "mixprec.monitor/2", "mixprec.monitor/1"});
  std::string no_schema = h;
  no_schema.replace(no_schema.find("\"schema\""), 8, "\"schemo\"");
  expect_error([&] { render_report(no_schema + "\n", "t"); }, {"line 1", "no \"schema\""});
  expect_error([&] { render_report("[1, 2]\n", "t"); }, {"line 1", "JSON object"});

  // Broken JSON in a later line: the line and the column.
  const std::string good = h + "\n" + record(1) + "\n";
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"step\":2,}\n", "t"); }, {"line 3", "column 24", "object key"});
  expect_error([&] { render_report(good + "{\"type\":\"log\"} trailing\n", "t"); }, {"line 3", "column 18", "expected end of input"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":NaN}\n", "t"); }, {"line 3", "not valid JSON"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":01}\n", "t"); }, {"line 3"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"a\tb\"}\n", "t"); }, {"line 3", "control"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"\\q\"}\n", "t"); }, {"line 3", "after backslash"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"\xff\"}\n", "t"); }, {"line 3", "UTF-8", "\\xff"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"\\ud800\"}\n", "t"); }, {"line 3", "surrogate"});
  // A byte-order mark is allowed before the first line only (JSON.parse in
  // the page would fail on one later).
  expect_error([&] { render_report(good + "\xEF\xBB\xBF" + record(2) + "\n", "t"); }, {"line 3", "byte-order mark"});
  // Every later record is a "log"; a second header is named as such.
  expect_error([&] { render_report(good + "{\"type\":\"lag\"}\n", "t"); }, {"line 3", "\"lag\"", "\"log\""});
  expect_error([&] { render_report(good + "{\"step\":3}\n", "t"); }, {"line 3", "no \"type\""});
  expect_error([&] { render_report(good + h + "\n", "t"); }, {"line 3", "one header"});
  // A truncated line that is not the last one (it has its newline) fails.
  expect_error([&] { render_report(h + "\n" + record(1).substr(0, 50) + "\n" + record(2) + "\n", "t"); },
               {"line 2"});
  // Deep nesting is refused, not a stack overflow.
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":" + std::string(100000, '[') + "\n", "t"); },
               {"line 3", "nested deeper"});
}

TEST(MonitorReport, TruncatedLastLineIsLeftOutWithANote) {
  // What a run killed while writing leaves: the last line cut short, no
  // newline. The page shows the rest and says what it left out.
  const std::string complete = std::string(header_line) + "\n" + record(1) + "\n";
  const std::string page = render_report(complete + record(2).substr(0, 120), "t");
  EXPECT_NE(page.find("Line 3 of the log is incomplete"), std::string::npos);
  EXPECT_EQ(embedded_log(page), "\n" + complete + "\n");
}

TEST(MonitorReport, HeaderOnlyRenders) {
  // A run that has not logged a step yet is still a valid report.
  const std::string page = render_report(std::string(header_line) + "\n", "t");
  EXPECT_NE(page.find("mixprec.monitor/1"), std::string::npos);
  // So is one saved with a byte-order mark, or with CRLF line ends.
  EXPECT_EQ(embedded_log(render_report("\xEF\xBB\xBF" + std::string(header_line) + "\n", "t")),
            "\n" + std::string(header_line) + "\n\n");
  EXPECT_NO_THROW(render_report(std::string(header_line) + "\r\n" + record(1) + "\r\n", "t"));
}

class WriteReport : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("mixprec_report_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
};

TEST_F(WriteReport, WritesThePageAndNoTemporary) {
  const std::string html = path("run.html");
  write_report(MIXPREC_MONITOR_SAMPLE, html);
  const std::string page = read_file(html);
  EXPECT_EQ(page, render_report(read_file(MIXPREC_MONITOR_SAMPLE), "mixprec monitor: sample.jsonl"));
  EXPECT_FALSE(std::filesystem::exists(html + ".tmp"));
  // An existing page is replaced; the title given is used.
  write_report(MIXPREC_MONITOR_SAMPLE, html, "again");
  EXPECT_NE(read_file(html).find("<title>again</title>"), std::string::npos);
}

TEST_F(WriteReport, IoErrorsNameThePathAndTheReason) {
  const std::string missing = path("missing.jsonl");
  expect_error([&] { write_report(missing, path("out.html")); }, {"write_report", missing.c_str(), "No such file"});
  expect_error([&] { write_report(dir_.string(), path("out.html")); }, {dir_.string().c_str(), "directory"});
  const std::string nowhere = path("no/such/dir/out.html");
  expect_error([&] { write_report(MIXPREC_MONITOR_SAMPLE, nowhere); }, {(nowhere + ".tmp").c_str()});
  // The output may not be the log itself.
  const std::string log = path("log.jsonl");
  std::filesystem::copy_file(MIXPREC_MONITOR_SAMPLE, log);
  expect_error([&] { write_report(log, log); }, {"is the log itself"});
  EXPECT_EQ(read_file(log), read_file(MIXPREC_MONITOR_SAMPLE));
}

TEST_F(WriteReport, BadLogNamesTheFileAndTheLine) {
  const std::string log = path("bad.jsonl");
  {
    std::ofstream out(log, std::ios::binary);
    out << header_line << "\n" << record(1) << "\n{oops}\n";
  }
  const std::string html = path("bad.html");
  expect_error([&] { write_report(log, html); }, {log.c_str(), "line 3"});
  EXPECT_FALSE(std::filesystem::exists(html));
  EXPECT_FALSE(std::filesystem::exists(html + ".tmp"));
}

// Concurrent writers to one page: each call writes a temporary file of its
// own, so none renames another's half-written file or loses its own; a
// reader of the page sees one whole page or another, never a part of one.
TEST_F(WriteReport, ConcurrentWritersToOnePageEachLeaveAWholePage) {
  constexpr int threads = 8, iterations = 20;
  // Logs of different lengths (the sample's records repeated), so that the
  // pages differ in their size as well as in their title; big enough
  // (0.3-0.8 MB) that the writes overlap.
  const std::string sample = read_file(MIXPREC_MONITOR_SAMPLE);
  const std::size_t first_nl = sample.find('\n');
  ASSERT_NE(first_nl, std::string::npos);
  const std::string header = sample.substr(0, first_nl + 1), records = sample.substr(first_nl + 1);
  std::vector<std::string> logs, expected;
  for (int t = 0; t < threads; ++t) {
    logs.push_back(path("log" + std::to_string(t) + ".jsonl"));
    std::ofstream out(logs.back(), std::ios::binary);
    out << header;
    for (int r = 0; r < 4 + t; ++r) out << records;
  }
  // The page a single call writes for each log.
  for (int t = 0; t < threads; ++t) {
    const std::string solo = path("solo.html");
    write_report(logs[t], solo);
    expected.push_back(read_file(solo));
    std::filesystem::remove(solo);
  }
  ASSERT_EQ(std::set<std::string>(expected.begin(), expected.end()).size(), expected.size());

  const std::string html = path("run.html");
  std::mutex mutex;
  std::vector<std::string> failures;
  auto is_expected = [&](const std::string& page) {
    for (const std::string& e : expected) {
      if (page == e) return true;
    }
    return false;
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < iterations; ++i) {
        std::string failure;
        try {
          write_report(logs[t], html);
          // Another thread may have replaced it since, but with a whole page.
          std::ifstream in(html, std::ios::binary);
          const std::string page((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
          if (!is_expected(page)) {
            failure = "thread " + std::to_string(t) + ", iteration " + std::to_string(i) + ": read a page of " +
                      std::to_string(page.size()) + " bytes that no single call writes";
          }
        } catch (const std::exception& e) {
          failure = "thread " + std::to_string(t) + ", iteration " + std::to_string(i) + ": " + e.what();
        }
        if (!failure.empty()) {
          std::lock_guard<std::mutex> lock(mutex);
          failures.push_back(failure);
        }
      }
    });
  }
  for (std::thread& th : pool) th.join();
  EXPECT_TRUE(failures.empty()) << failures.size() << " of " << threads * iterations
                                << " calls failed; the first: " << failures.front();
  EXPECT_TRUE(is_expected(read_file(html)));
  // Nothing left behind: the logs and the page only.
  std::set<std::string> left;
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) left.insert(entry.path().filename().string());
  std::set<std::string> want = {"run.html"};
  for (int t = 0; t < threads; ++t) want.insert("log" + std::to_string(t) + ".jsonl");
  EXPECT_EQ(left, want);
}

// A log over the limit is refused before it is read, naming the file, its
// size and the limit, and the page already there stays as it was.
TEST_F(WriteReport, LogOverTheLimitIsRefusedAndThePageKept) {
  const std::string log = path("run.jsonl");
  std::filesystem::copy_file(MIXPREC_MONITOR_SAMPLE, log);
  const std::uint64_t size = std::filesystem::file_size(log);
  const std::string html = path("run.html");
  write_report(log, html);
  const std::string before = read_file(html);
  ASSERT_FALSE(before.empty());

  ReportOptions small;
  small.max_log_bytes = size - 1;
  expect_error([&] { write_report(log, html, "again", small); },
               {"write_report", log.c_str(), std::to_string(size).c_str(), std::to_string(size - 1).c_str(),
                "max_log_bytes"});
  EXPECT_EQ(read_file(html), before);
  // A log of exactly the limit is fine.
  small.max_log_bytes = size;
  write_report(log, html, "again", small);
  EXPECT_NE(read_file(html).find("<title>again</title>"), std::string::npos);
  const std::string again = read_file(html);

  // The documented default, 256 MiB, on a sparse file one byte over it: the
  // size is refused before anything is allocated or read.
  EXPECT_EQ(ReportOptions{}.max_log_bytes, std::uint64_t{256} << 20);
  const std::string big = path("big.jsonl");
  {
    std::ofstream out(big, std::ios::binary);
    out << header_line << "\n";
  }
  std::filesystem::resize_file(big, (std::uint64_t{256} << 20) + 1);
  expect_error([&] { write_report(big, html); },
               {"write_report", big.c_str(), "268435457 bytes", "268435456", "max_log_bytes"});
  EXPECT_EQ(read_file(html), again);
  std::set<std::string> left;
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) left.insert(entry.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{"run.jsonl", "run.html", "big.jsonl"}));
}

// A page that cannot be put in place (html_path is a directory) leaves no
// temporary file behind, and what was at html_path is untouched.
TEST_F(WriteReport, FailedRenameLeavesNoTemporary) {
  const std::string html = path("page.html");
  std::filesystem::create_directories(html + "/inside");
  expect_error([&] { write_report(MIXPREC_MONITOR_SAMPLE, html); }, {"write_report", html.c_str()});
  EXPECT_TRUE(std::filesystem::is_directory(html + "/inside"));
  std::set<std::string> left;
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) left.insert(entry.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{"page.html"}));
}

}  // namespace
}  // namespace mixprec::monitor
