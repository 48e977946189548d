// SPDX-License-Identifier: Apache-2.0
// A file written whole or not at all: the data goes into a temporary file of
// its own next to the target, which is fsync'd and renamed over it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <string>
#include <system_error>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mixprec/core/error.hpp"
#include "mixprec/core/config.hpp"

MIXPREC_NAMESPACE_BEGIN namespace detail {

/// A temporary file next to `path` that becomes `path` on commit() and is
/// removed if it never does (the destructor, on any error path).
///
/// The temporary file is `path` + ".tmp-<pid>-<n>" (n a process-wide
/// counter), created with O_EXCL: concurrent writers to one `path`, threads
/// or processes, each write a file of their own, and the last rename wins.
/// A reader of `path` sees the old file or a new one whole, never a part.
/// commit() fsyncs the data before the rename and the directory after it,
/// so that a power loss leaves either file, not an empty one. A crash or
/// SIGKILL before the rename leaves `path` untouched but may leave the
/// temporary file behind.
///
/// `who` opens every error message ("SafetensorsWriter::write: ..."); it
/// must outlive the object (a string literal).
class AtomicFile {
 public:
  AtomicFile(const std::string& path, const char* who) : path_(path), who_(who) {
    MIXPREC_CHECK(!path.empty(), who_, ": path is empty");
    MIXPREC_CHECK(path.back() != '/', who_, ": path '", path, "' names a directory");
    const std::size_t slash = path.rfind('/');
    dir_ = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    // The pid and a process-wide counter keep concurrent writers apart;
    // O_EXCL makes sure we never open someone else's file.
    static std::atomic<unsigned> counter{0};
    for (int attempt = 0; attempt < 100; ++attempt) {
      tmp_ = path + ".tmp-" + std::to_string(static_cast<long>(::getpid())) + "-" + std::to_string(counter++);
      fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ >= 0 || errno != EEXIST) break;
    }
    if (fd_ < 0) {
      const int err = errno;
      throw_error(who_, ": cannot create the temporary file '", tmp_, "' for '", path, "': ",
                  std::generic_category().message(err));
    }
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  /// The temporary file's name.
  const std::string& temp_path() const { return tmp_; }

  void append(const void* data, std::size_t bytes) {
    const char* p = static_cast<const char*>(data);
    while (bytes > 0) {
      // Linux writes at most ~2 GiB per call; ask for 1 GiB at a time.
      const std::size_t chunk = std::min<std::size_t>(bytes, std::size_t{1} << 30);
      const ssize_t n = ::write(fd_, p, chunk);
      if (n < 0) {
        if (errno == EINTR) continue;
        fail("writing", errno);
      }
      if (n == 0) fail("writing", EIO);
      p += n;
      bytes -= static_cast<std::size_t>(n);
    }
  }

  /// fsync the data, rename it over `path`, fsync the directory so that the
  /// rename itself survives a power loss. Call once.
  void commit() {
    if (::fsync(fd_) != 0) fail("fsync of", errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail("closing", errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      throw_error(who_, ": cannot rename '", tmp_, "' to '", path_, "': ", std::generic_category().message(err));
    }
    committed_ = true;
    const int dir = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    const int open_err = errno;
    // `path` already holds the new file here; what can still fail is only
    // the guarantee that the rename is on disk, and that is worth an error.
    MIXPREC_CHECK(dir >= 0, who_, ": '", path_, "' was written, but its directory '", dir_,
                  "' cannot be opened to fsync the rename: ", std::generic_category().message(open_err));
    const int rc = ::fsync(dir);
    const int err = errno;
    ::close(dir);
    // Some file systems cannot fsync a directory (EINVAL); there is nothing
    // more to do on those.
    MIXPREC_CHECK(rc == 0 || err == EINVAL, who_, ": '", path_, "' was written, but the fsync of its directory '",
                  dir_, "' failed: ", std::generic_category().message(err));
  }

 private:
  std::string path_, dir_, tmp_;
  const char* who_;
  int fd_ = -1;
  bool committed_ = false;

  [[noreturn]] void fail(const char* what, int err) {
    throw_error(who_, ": ", what, " the temporary file '", tmp_, "' for '", path_, "' failed: ",
                std::generic_category().message(err));
  }
};

}  // namespace detail
MIXPREC_NAMESPACE_END
