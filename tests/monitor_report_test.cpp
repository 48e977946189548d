// SPDX-License-Identifier: Apache-2.0
// The monitor's HTML report: self-contained (nothing fetched), the log
// embedded so that no content can end its script element, and logs that are
// empty or malformed rejected with the line named. tests/monitor/
// render_report.py checks in a browser that the page really draws.
#include <gtest/gtest.h>

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

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
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"step\":2,}\n", "t"); }, {"line 3", "column 24", "member name"});
  expect_error([&] { render_report(good + "{\"type\":\"log\"} trailing\n", "t"); }, {"line 3", "after the object"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":NaN}\n", "t"); }, {"line 3", "not valid JSON"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":01}\n", "t"); }, {"line 3"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"a\tb\"}\n", "t"); }, {"line 3", "control"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"\\q\"}\n", "t"); }, {"line 3", "escape"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"\xff\"}\n", "t"); }, {"line 3", "UTF-8"});
  expect_error([&] { render_report(good + "{\"type\":\"log\",\"x\":\"\\ud800\"}\n", "t"); }, {"line 3", "surrogate"});
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

}  // namespace
}  // namespace mixprec::monitor
