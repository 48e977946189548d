// SPDX-License-Identifier: Apache-2.0
// dist::Watchdog, the time-out on collectives (issue 16), with work items
// the test finishes or leaves hanging itself, and the communicators' time-out
// settings. The ending of a real MPI job: tests/dist/abort_test.sh (hang).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mixprec/dist/communicator.hpp"
#include "mixprec/dist/watchdog.hpp"
#include "mixprec/tensor/tensor.hpp"

namespace mixprec {
namespace {

using dist::Watchdog;
using std::chrono::milliseconds;

// What the handler saw, and when.
struct Calls {
  std::mutex mutex;
  std::vector<std::string> what;
  std::vector<double> seconds;
  std::size_t count() {
    std::lock_guard<std::mutex> lock(mutex);
    return what.size();
  }
  Watchdog::Expired handler() {
    return [this](const std::string& w, double s) {
      std::lock_guard<std::mutex> lock(mutex);
      what.push_back(w);
      seconds.push_back(s);
    };
  }
};

// Waits up to `limit` for pred(); the machine may be loaded, so limits are generous.
template <class P>
bool eventually(P pred, milliseconds limit = milliseconds(20000)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(milliseconds(5));
  }
  return pred();
}

TEST(Watchdog, WorkThatFinishesInTimeFiresNothing) {
  Calls calls;
  {
    Watchdog dog(milliseconds(2000), calls.handler(), {}, milliseconds(5));
    for (int i = 0; i < 50; ++i) {
      std::atomic<bool> done{false};
      dog.watch("item " + std::to_string(i), [&done] { return done.load(); });
      done = true;
      // Seen finished (and dropped) before `done` goes out of scope.
      ASSERT_TRUE(eventually([&] { return dog.pending() == 0; }));
    }
    EXPECT_FALSE(dog.fired());
  }
  EXPECT_EQ(calls.count(), 0u);
}

TEST(Watchdog, AHangingItemFiresOnceWithItsNameAndTheTimeItWaited) {
  Calls calls;
  const milliseconds timeout(100);
  Watchdog dog(timeout, calls.handler(), {}, milliseconds(5));
  const auto start = std::chrono::steady_clock::now();
  dog.watch("finished", [] { return true; });
  dog.watch("all_reduce_sum", [] { return false; });
  dog.watch("broadcast", [] { return false; });
  ASSERT_TRUE(eventually([&] { return calls.count() > 0; }));
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::this_thread::sleep_for(milliseconds(300));  // no second call, though "broadcast" has expired too
  ASSERT_EQ(calls.count(), 1u);
  EXPECT_EQ(calls.what[0], "all_reduce_sum");  // the oldest first
  EXPECT_GT(calls.seconds[0], 0.1);            // not before the time-out
  EXPECT_LE(calls.seconds[0], waited);
  EXPECT_TRUE(dog.fired());
}

TEST(Watchdog, AnEngineErrorFiresAtOnce) {
  Calls calls;
  std::atomic<bool> broken{false};
  Watchdog dog(milliseconds(60000), calls.handler(),
               [&broken]() -> std::string {
                 return broken ? "NCCL reported an asynchronous error: remote process exited" : "";
               },
               milliseconds(5));
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_EQ(calls.count(), 0u);
  broken = true;
  ASSERT_TRUE(eventually([&] { return calls.count() > 0; }));
  EXPECT_EQ(calls.what[0], "NCCL reported an asynchronous error: remote process exited");
  EXPECT_LT(calls.seconds[0], 0.0);  // an error, not a wait
}

TEST(Watchdog, DestroyedWithWorkPendingItCallsNothing) {
  Calls calls;
  const auto start = std::chrono::steady_clock::now();
  {
    Watchdog dog(milliseconds(50), calls.handler(), {}, milliseconds(1000));
    dog.watch("never", [] { return false; });
  }  // the thread stops without waiting out its poll
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 0.9);
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(calls.count(), 0u);
}

TEST(Watchdog, BadArgumentsAreRefusedByName) {
  Calls calls;
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { Watchdog dog(milliseconds(0), calls.handler()); }).find("timeout = 0 ms, must be > 0"),
            std::string::npos);
  EXPECT_NE(message([&] { Watchdog dog(milliseconds(10), calls.handler(), {}, milliseconds(-1)); })
                .find("poll = -1 ms, must be > 0"),
            std::string::npos);
  EXPECT_NE(message([&] { Watchdog dog(milliseconds(10), Watchdog::Expired{}); }).find("expired is empty"),
            std::string::npos);
  Watchdog dog(milliseconds(10), calls.handler());
  EXPECT_NE(message([&] { dog.watch("x", Watchdog::Done{}); }).find("watch(\"x\"): done is empty"), std::string::npos);
  dist::LocalCommunicator local;
  EXPECT_NE(message([&] { local.set_timeout(milliseconds(-5)); }).find("local set_timeout: timeout = -5 ms"),
            std::string::npos);
}

TEST(Watchdog, ACommunicatorKeepsTheTimeoutItWasGiven) {
  dist::LocalCommunicator local;
  EXPECT_EQ(local.timeout().count(), 0);
  Calls calls;
  local.set_timeout(milliseconds(1500), calls.handler());
  EXPECT_EQ(local.timeout().count(), 1500);
  Tensor<float> t({4});
  local.all_reduce_sum(t, nullptr);  // the identity: nothing to wait for
  local.set_timeout(milliseconds(0));
  EXPECT_EQ(local.timeout().count(), 0);
  EXPECT_EQ(calls.count(), 0u);
}

}  // namespace
}  // namespace mixprec
