// SPDX-License-Identifier: Apache-2.0
// Watchdog: a thread that ends a data-parallel job whose collective does not
// finish in time, instead of letting it hang. MPI has no time-out on a
// collective and NCCL none either (it reports errors asynchronously, through
// ncclCommGetAsyncError); the communicators hand each collective to a
// Watchdog when set_timeout() asked for one.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "mixprec/core/error.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace dist {

/// Watches work items, each a description and a query that says whether it
/// has finished, from a thread of its own: every `poll` it drops the items
/// that finished, and when one has waited longer than `timeout` it calls
/// `expired` once, with the item's description and how long it has waited
/// (the communicators' handler prints the rank and the item and ends the
/// job). An optional `health` query runs at every poll too: a non-empty
/// string is an error the engine reported (NCCL's asynchronous errors), and
/// `expired` gets it at once. After `expired` has run the watchdog watches
/// nothing more. Thread-safe; the destructor stops the thread (at most one
/// poll later) without calling anything.
class Watchdog {
 public:
  using Clock = std::chrono::steady_clock;
  using Done = std::function<bool()>;
  /// (what, seconds waited); seconds is negative for a health error.
  using Expired = std::function<void(const std::string& what, double seconds)>;
  using Health = std::function<std::string()>;

  Watchdog(std::chrono::milliseconds timeout, Expired expired, Health health = {},
           std::chrono::milliseconds poll = std::chrono::milliseconds(100))
      : timeout_(timeout), poll_(poll), expired_(std::move(expired)), health_(std::move(health)) {
    MIXPREC_CHECK(timeout.count() > 0, "Watchdog: timeout = ", timeout.count(), " ms, must be > 0");
    MIXPREC_CHECK(poll.count() > 0, "Watchdog: poll = ", poll.count(), " ms, must be > 0");
    MIXPREC_CHECK(static_cast<bool>(expired_), "Watchdog: expired is empty; it says what to do when time runs out");
    thread_ = std::thread([this] { run(); });
  }
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  /// Watches `done` from now: it must turn true within the timeout.
  void watch(std::string what, Done done) {
    MIXPREC_CHECK(static_cast<bool>(done), "Watchdog::watch(\"", what, "\"): done is empty");
    std::lock_guard<std::mutex> lock(mutex_);
    items_.push_back({std::move(what), std::move(done), Clock::now()});
  }
  /// Items not seen finished yet.
  std::size_t pending() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return items_.size();
  }
  /// Whether `expired` has been called.
  bool fired() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return fired_;
  }
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  struct Item {
    std::string what;
    Done done;
    Clock::time_point since;
  };

  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_ && !fired_) {
      wake_.wait_for(lock, poll_, [this] { return stop_; });
      if (stop_) break;
      std::string what;
      double seconds = 0;
      const Clock::time_point now = Clock::now();
      // The queries run under the lock: they are short (an event query), and
      // watch() then waits at most one sweep.
      for (auto it = items_.begin(); it != items_.end();) {
        if (it->done()) {
          it = items_.erase(it);
          continue;
        }
        const double waited = std::chrono::duration<double>(now - it->since).count();
        if (what.empty() && now - it->since > timeout_) {
          what = it->what;
          seconds = waited;
        }
        ++it;
      }
      if (what.empty() && health_) {
        what = health_();
        seconds = -1;
      }
      if (what.empty()) continue;
      fired_ = true;
      lock.unlock();
      expired_(what, seconds);  // typically does not return
      lock.lock();
    }
  }

  const std::chrono::milliseconds timeout_, poll_;
  Expired expired_;
  Health health_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::list<Item> items_;
  bool stop_ = false, fired_ = false;
  std::thread thread_;
};

/// The communicators' message when a watchdog fires: one line on stderr,
/// naming the backend, the rank and what did not finish.
inline void print_expiry(const char* backend, int rank, int size, const std::string& what, double seconds,
                         std::chrono::milliseconds timeout) {
  if (seconds < 0) {
    std::fprintf(stderr, "mixprec: %s rank %d of %d: %s; ending the job\n", backend, rank, size, what.c_str());
  } else {
    std::fprintf(stderr,
                 "mixprec: %s rank %d of %d: %s has not finished after %.1f s (timeout %.1f s): a rank stopped, "
                 "or the ranks called different collectives; ending the job\n",
                 backend, rank, size, what.c_str(), seconds, static_cast<double>(timeout.count()) / 1000.0);
  }
  std::fflush(stderr);
}

}  // namespace dist
MIXPREC_NAMESPACE_END
