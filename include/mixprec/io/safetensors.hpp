// SPDX-License-Identifier: Apache-2.0
// The safetensors file format: a writer that saves named tensors atomically,
// and a reader that validates every byte of a possibly hostile file before
// handing out a pointer into it (docs/checkpoints.md, "The file format").
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <new>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "mixprec/core/atomic_file.hpp"
#include "mixprec/core/dtype.hpp"
#include "mixprec/core/error.hpp"
#include "mixprec/core/utf8.hpp"
#include "mixprec/core/config.hpp"

// Tensor bytes are stored little-endian and handed out as they lie in the
// file: a big-endian host would need a byte swap on every element, which
// this layer does not do.
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "mixprec/io/safetensors.hpp: safetensors data is little-endian; this host is not");
#define MIXPREC_SAFETENSORS_ENDIAN_CHECKED 1
#else
#define MIXPREC_SAFETENSORS_ENDIAN_CHECKED 0
#endif

MIXPREC_NAMESPACE_BEGIN namespace io {

/// The element types of the safetensors format, by their names in the file
/// ("F16", "BF16", ...). BOOL is one byte per element (0 or 1); F8_E4M3 and
/// F8_E5M2 are the OCP 8-bit floats, carried as opaque bytes.
enum class StDType { F16, BF16, F32, F64, I8, I16, I32, I64, U8, U16, U32, U64, BOOL, F8_E4M3, F8_E5M2 };

/// The format's name of d: "F16", "BF16", "F32", ...
inline const char* to_string(StDType d) {
  switch (d) {
    case StDType::F16: return "F16";
    case StDType::BF16: return "BF16";
    case StDType::F32: return "F32";
    case StDType::F64: return "F64";
    case StDType::I8: return "I8";
    case StDType::I16: return "I16";
    case StDType::I32: return "I32";
    case StDType::I64: return "I64";
    case StDType::U8: return "U8";
    case StDType::U16: return "U16";
    case StDType::U32: return "U32";
    case StDType::U64: return "U64";
    case StDType::BOOL: return "BOOL";
    case StDType::F8_E4M3: return "F8_E4M3";
    case StDType::F8_E5M2: return "F8_E5M2";
  }
  return "unknown";
}

/// Bytes per element of d (1, 2, 4 or 8). Throws mixprec::Error for a value
/// outside the enumeration.
inline std::size_t size_of(StDType d) {
  switch (d) {
    case StDType::I8:
    case StDType::U8:
    case StDType::BOOL:
    case StDType::F8_E4M3:
    case StDType::F8_E5M2: return 1;
    case StDType::F16:
    case StDType::BF16:
    case StDType::I16:
    case StDType::U16: return 2;
    case StDType::F32:
    case StDType::I32:
    case StDType::U32: return 4;
    case StDType::F64:
    case StDType::I64:
    case StDType::U64: return 8;
  }
  detail::throw_error("size_of: StDType value ", static_cast<int>(d), " is not a safetensors dtype");
}

/// The dtype whose file name is `name` ("F16", ...), case-sensitive as the
/// format is. Returns false, leaving `out` alone, for any other string.
inline bool st_dtype_from_string(const std::string& name, StDType& out) {
  static constexpr StDType all[] = {StDType::F16,  StDType::BF16,    StDType::F32,    StDType::F64, StDType::I8,
                                    StDType::I16,  StDType::I32,     StDType::I64,    StDType::U8,  StDType::U16,
                                    StDType::U32,  StDType::U64,     StDType::BOOL,   StDType::F8_E4M3,
                                    StDType::F8_E5M2};
  for (StDType d : all) {
    if (name == to_string(d)) {
      out = d;
      return true;
    }
  }
  return false;
}

/// The file dtype of mixprec's element types: float16 -> F16, bfloat16 ->
/// BF16, float32 -> F32. The 16 bits of an F16 or BF16 element are those of
/// mixprec::half / mixprec::bfloat16.
inline StDType st_dtype(DType d) {
  switch (d) {
    case DType::float16: return StDType::F16;
    case DType::bfloat16: return StDType::BF16;
    case DType::float32: return StDType::F32;
  }
  detail::throw_error("st_dtype: DType value ", static_cast<int>(d), " has no safetensors dtype");
}

/// st_dtype_of<T>::value: the file dtype that stores a C++ T element by
/// element (half, bfloat16, float, double, the fixed-width integers, bool).
template <class T>
struct st_dtype_of;
template <> struct st_dtype_of<half> { static constexpr StDType value = StDType::F16; };
template <> struct st_dtype_of<bfloat16> { static constexpr StDType value = StDType::BF16; };
template <> struct st_dtype_of<float> { static constexpr StDType value = StDType::F32; };
template <> struct st_dtype_of<double> { static constexpr StDType value = StDType::F64; };
template <> struct st_dtype_of<std::int8_t> { static constexpr StDType value = StDType::I8; };
template <> struct st_dtype_of<std::int16_t> { static constexpr StDType value = StDType::I16; };
template <> struct st_dtype_of<std::int32_t> { static constexpr StDType value = StDType::I32; };
template <> struct st_dtype_of<std::int64_t> { static constexpr StDType value = StDType::I64; };
template <> struct st_dtype_of<std::uint8_t> { static constexpr StDType value = StDType::U8; };
template <> struct st_dtype_of<std::uint16_t> { static constexpr StDType value = StDType::U16; };
template <> struct st_dtype_of<std::uint32_t> { static constexpr StDType value = StDType::U32; };
template <> struct st_dtype_of<std::uint64_t> { static constexpr StDType value = StDType::U64; };
template <> struct st_dtype_of<bool> { static constexpr StDType value = StDType::BOOL; };

/// One tensor of a file: its name, dtype, shape and its byte range
/// [begin, end) relative to the start of the data section.
struct TensorInfo {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;

  /// Product of the shape (1 for a scalar, shape []). A TensorInfo from
  /// SafetensorsFile is validated: the product fits in int64.
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
  /// end - begin: numel() * size_of(dtype) for a validated tensor.
  std::uint64_t nbytes() const { return end - begin; }
};

/// Headers longer than this are refused before anything is allocated for
/// them; the reference implementation uses the same limit.
inline constexpr std::uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

}  // namespace io
MIXPREC_NAMESPACE_END

// Helpers of this header only: in mixprec::detail, with an st_ prefix, so
// that no mixprec::io::detail shadows mixprec::detail for other io headers.
MIXPREC_NAMESPACE_BEGIN namespace detail {

/// s in double quotes for an error message: control bytes, quotes and
/// backslashes escaped, cut after 80 bytes (a hostile name can be megabytes).
inline std::string st_quoted(const std::string& s) {
  static constexpr std::size_t kMax = 80;
  std::string out = "\"";
  std::size_t n = std::min(s.size(), kMax);
  // Do not cut a UTF-8 sequence in half.
  while (n < s.size() && n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F || c == '"' || c == '\\') {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (n < s.size()) out += "...(" + std::to_string(s.size()) + " bytes)";
  out += '"';
  return out;
}

inline std::string st_shape_string(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

/// a * b, or false where the product exceeds `limit`.
inline bool st_checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t limit, std::uint64_t& out) {
  if (a != 0 && b > limit / a) return false;
  out = a * b;
  return true;
}

inline std::uint64_t st_read_u64_le(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline void st_check_little_endian_host(const char* what) {
#if !MIXPREC_SAFETENSORS_ENDIAN_CHECKED
  const std::uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  MIXPREC_CHECK(first == 1, what, ": safetensors data is little-endian and this host is not");
#else
  (void)what;
#endif
}

/// The checks on the first 8 bytes that need only the file size: shared by
/// SafetensorsFile::read (before it allocates the whole file) and parse.
/// Returns the header length.
inline std::uint64_t st_check_prefix(const std::uint8_t* first8, std::uint64_t file_size, const std::string& where) {
  MIXPREC_CHECK(file_size >= 8, where, ": file is ", file_size,
                " bytes, shorter than the 8-byte header length that starts every safetensors file");
  const std::uint64_t n = st_read_u64_le(first8);
  MIXPREC_CHECK(n <= io::kSafetensorsMaxHeaderBytes, where, ": header length ", n, " exceeds the limit of ",
                io::kSafetensorsMaxHeaderBytes, " bytes");
  MIXPREC_CHECK(n <= file_size - 8, where, ": header length ", n, " exceeds the ", file_size - 8,
                " bytes that follow the length field (file size ", file_size, ")");
  MIXPREC_CHECK(n >= 2, where, ": header length ", n, " is too short for a JSON object");
  return n;
}

/// Builds the header's JSON value through nlohmann's SAX interface rather
/// than json::parse, for three things the DOM parser does not do: it rejects
/// a repeated key (json::parse keeps the last one silently, so a file could
/// show one tensor to us and another to a different reader), it stops at
/// the nesting the format uses (3 levels: header, entry, shape) instead of
/// building whatever depth the input asks for, and it caps arrays at
/// kMaxArray elements, which bounds the memory a 100 MB header can make us
/// allocate.
class StHeaderSax {
 public:
  using json = nlohmann::json;
  static constexpr std::size_t kMaxDepth = 3;
  static constexpr std::size_t kMaxArray = 1024;

  json root;
  std::string error;  // why parsing stopped, when it did

  bool null() { return put(json(nullptr)); }
  bool boolean(bool v) { return put(json(v)); }
  bool number_integer(json::number_integer_t v) { return put(json(v)); }
  bool number_unsigned(json::number_unsigned_t v) { return put(json(v)); }
  bool number_float(json::number_float_t v, const json::string_t&) { return put(json(v)); }
  bool string(json::string_t& v) { return put(json(std::move(v))); }
  bool binary(json::binary_t&) {
    error = "header is not valid JSON: binary value";
    return false;
  }
  bool start_object(std::size_t) { return open(json::object()); }
  bool start_array(std::size_t) { return open(json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(json::string_t& k) {
    if (stack_.back()->contains(k)) {
      error = "duplicate key " + st_quoted(k) + (stack_.size() == 1 ? " in the header" : " in the entry of " + st_quoted(outer_key_));
      return false;
    }
    if (stack_.size() == 1) outer_key_ = k;
    key_ = std::move(k);
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const json::exception& e) {
    error = "header is not valid JSON at byte " + std::to_string(position) + " of the header: " + e.what();
    return false;
  }

 private:
  std::vector<json*> stack_;  // the open containers, outermost first
  std::string key_;           // the key the next value of an object goes to
  std::string outer_key_;     // the last key of the top-level object

  json* slot() {
    if (stack_.empty()) return &root;
    json& parent = *stack_.back();
    if (parent.is_array()) {
      if (parent.size() >= kMaxArray) {
        error = "an array of more than " + std::to_string(kMaxArray) + " elements in the entry of " + st_quoted(outer_key_);
        return nullptr;
      }
      parent.push_back(json());
      return &parent.back();
    }
    return &parent[key_];
  }
  bool put(json&& v) {
    json* s = slot();
    if (s == nullptr) return false;
    *s = std::move(v);
    return true;
  }
  bool open(json&& v) {
    if (stack_.size() >= kMaxDepth) {
      error = "header nests deeper than " + std::to_string(kMaxDepth) + " levels (in the entry of " +
              st_quoted(outer_key_) + ")";
      return false;
    }
    json* s = slot();
    if (s == nullptr) return false;
    *s = std::move(v);
    stack_.push_back(s);
    return true;
  }
  bool close() {
    stack_.pop_back();
    return true;
  }
};

}  // namespace detail
MIXPREC_NAMESPACE_END

MIXPREC_NAMESPACE_BEGIN namespace io {

/// Collects named tensors and writes them as one safetensors file.
///
/// It holds pointers, not copies: every `data` passed to add() must stay
/// valid and unchanged until write() or serialize() returns. Tensors are
/// laid out by descending element size (in the order added among equal
/// sizes) after a header padded with spaces to a multiple of 8 bytes, so
/// every tensor starts at a file offset that is a multiple of its element
/// size.
class SafetensorsWriter {
 public:
  /// Adds tensor `name` of `dtype` and `shape`, whose `bytes` bytes start at
  /// `data` (little-endian elements, row-major). Throws mixprec::Error,
  /// adding nothing, when the name is empty, "__metadata__", already added
  /// or not UTF-8; when a dimension is negative or the element count
  /// overflows; when `bytes` is not numel * size_of(dtype); or when `data`
  /// is null with bytes > 0.
  void add(const std::string& name, StDType dtype, std::vector<std::int64_t> shape, const void* data,
           std::size_t bytes) {
    detail::st_check_little_endian_host("SafetensorsWriter::add");
    MIXPREC_CHECK(!name.empty(), "SafetensorsWriter::add: name is empty");
    MIXPREC_CHECK(name != "__metadata__", "SafetensorsWriter::add: name \"__metadata__\" is reserved for the "
                                          "file's metadata");
    MIXPREC_CHECK(detail::is_utf8(name), "SafetensorsWriter::add: name ", detail::st_quoted(name),
                  " is not valid UTF-8");
    MIXPREC_CHECK(index_.find(name) == index_.end(), "SafetensorsWriter::add: name ", detail::st_quoted(name),
                  " was already added");
    const std::size_t element = size_of(dtype);
    std::uint64_t numel = 1;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      MIXPREC_CHECK(shape[i] >= 0, "SafetensorsWriter::add: ", detail::st_quoted(name), ": shape[", i, "] = ", shape[i],
                    ", must be >= 0");
      MIXPREC_CHECK(detail::st_checked_mul(numel, static_cast<std::uint64_t>(shape[i]),
                                        std::numeric_limits<std::int64_t>::max(), numel),
                    "SafetensorsWriter::add: ", detail::st_quoted(name), ": shape ", detail::st_shape_string(shape),
                    " has more elements than fit in int64");
    }
    std::uint64_t expected = 0;
    MIXPREC_CHECK(detail::st_checked_mul(numel, element, std::numeric_limits<std::uint64_t>::max(), expected),
                  "SafetensorsWriter::add: ", detail::st_quoted(name), ": shape ", detail::st_shape_string(shape),
                  " of ", to_string(dtype), " needs more than 2^64 bytes");
    MIXPREC_CHECK(bytes == expected, "SafetensorsWriter::add: ", detail::st_quoted(name), ": bytes = ", bytes,
                  ", but ", to_string(dtype), " shape ", detail::st_shape_string(shape), " needs ", expected);
    MIXPREC_CHECK(data != nullptr || bytes == 0, "SafetensorsWriter::add: ", detail::st_quoted(name),
                  ": data is null for ", bytes, " bytes");
    // Allocate everything first: only the final, non-throwing move changes
    // entries_ after index_ has the name.
    Entry entry{name, dtype, std::move(shape), data, bytes};
    entries_.reserve(entries_.size() + 1);
    index_.emplace(name, entries_.size());
    entries_.push_back(std::move(entry));
  }

  /// add() for `count` elements of T at `data` (T one of st_dtype_of's types).
  template <class T>
  void add(const std::string& name, std::vector<std::int64_t> shape, const T* data, std::size_t count) {
    MIXPREC_CHECK(count <= std::numeric_limits<std::size_t>::max() / sizeof(T), "SafetensorsWriter::add: ",
                  detail::st_quoted(name), ": count = ", count, " elements overflow size_t");
    add(name, st_dtype_of<T>::value, std::move(shape), data, count * sizeof(T));
  }

  /// Sets `key` of the "__metadata__" map to `value` (replacing an earlier
  /// value). Both must be UTF-8.
  void set_metadata(const std::string& key, const std::string& value) {
    MIXPREC_CHECK(detail::is_utf8(key), "SafetensorsWriter::set_metadata: key ", detail::st_quoted(key),
                  " is not valid UTF-8");
    MIXPREC_CHECK(detail::is_utf8(value), "SafetensorsWriter::set_metadata: value of ", detail::st_quoted(key),
                  " is not valid UTF-8");
    metadata_[key] = value;
  }

  /// The whole file in memory.
  std::vector<std::uint8_t> serialize() const {
    const Plan plan = make_plan();
    std::vector<std::uint8_t> out;
    try {
      out.reserve(plan.prefix.size() + plan.data_bytes);
    } catch (const std::bad_alloc&) {
      detail::throw_error("SafetensorsWriter::serialize: cannot allocate ", plan.prefix.size() + plan.data_bytes,
                          " bytes");
    }
    out.insert(out.end(), plan.prefix.begin(), plan.prefix.end());
    for (const Entry* e : plan.order) {
      const auto* p = static_cast<const std::uint8_t*>(e->data);
      if (e->bytes > 0) out.insert(out.end(), p, p + e->bytes);
    }
    return out;
  }

  /// Writes the file to `path` atomically: into a new temporary file in the
  /// same directory (named `path` + ".tmp-<pid>-<n>"), fsync, rename over
  /// `path`, fsync the directory. On any error before the rename the
  /// temporary file is removed and `path` is untouched; a crash or SIGKILL
  /// in that window leaves `path` untouched too, but may leave the
  /// temporary file behind (readers never look at it). Streams the tensors
  /// from their pointers: no copy of the data is made.
  void write(const std::string& path) const {
    const Plan plan = make_plan();  // every check before the file system is touched
    detail::AtomicFile file(path, "SafetensorsWriter::write");
    file.append(plan.prefix.data(), plan.prefix.size());
    for (const Entry* e : plan.order) {
      if (e->bytes > 0) file.append(e->data, e->bytes);
    }
    file.commit();
  }

  /// Number of tensors added.
  std::size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string name;
    StDType dtype;
    std::vector<std::int64_t> shape;
    const void* data;
    std::size_t bytes;
  };
  struct Plan {
    std::vector<std::uint8_t> prefix;  // length field + padded header
    std::vector<const Entry*> order;   // data-section order
    std::uint64_t data_bytes = 0;
  };

  std::vector<Entry> entries_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;

  Plan make_plan() const {
    Plan plan;
    for (const Entry& e : entries_) plan.order.push_back(&e);
    // Largest elements first: with the header padded to 8 bytes and every
    // size a power of two, each tensor then starts aligned to its element.
    std::stable_sort(plan.order.begin(), plan.order.end(),
                     [](const Entry* a, const Entry* b) { return size_of(a->dtype) > size_of(b->dtype); });
    // ordered_json keeps "__metadata__" first and the tensors in data order,
    // which is what a person reading the header expects.
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json meta = nlohmann::ordered_json::object();
      for (const auto& [k, v] : metadata_) meta[k] = v;
      header["__metadata__"] = std::move(meta);
    }
    std::uint64_t offset = 0;
    for (const Entry* e : plan.order) {
      nlohmann::ordered_json entry = nlohmann::ordered_json::object();
      entry["dtype"] = to_string(e->dtype);
      entry["shape"] = e->shape;
      entry["data_offsets"] = {offset, offset + e->bytes};
      header[e->name] = std::move(entry);
      offset += e->bytes;
    }
    plan.data_bytes = offset;
    std::string text;
    try {
      text = header.dump();
    } catch (const nlohmann::ordered_json::exception& ex) {  // unreachable: add() checked UTF-8
      detail::throw_error("SafetensorsWriter: cannot encode the header: ", ex.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');
    MIXPREC_CHECK(text.size() <= kSafetensorsMaxHeaderBytes, "SafetensorsWriter: the header is ", text.size(),
                  " bytes, over the ", kSafetensorsMaxHeaderBytes, "-byte limit that readers enforce");
    const std::uint64_t n = text.size();
    plan.prefix.resize(8 + text.size());
    for (int i = 0; i < 8; ++i) plan.prefix[i] = static_cast<std::uint8_t>(n >> (8 * i));
    std::memcpy(plan.prefix.data() + 8, text.data(), text.size());
    return plan;
  }
};

/// A safetensors file held in memory, validated.
///
/// read() and parse() accept only a file that follows the format exactly
/// (docs/checkpoints.md, "Hostile files"): any other input, whatever its
/// bytes, throws mixprec::Error naming the source, the check that failed
/// and the offending values, and nothing is read out of bounds. In
/// particular the tensors' byte ranges must tile the data section exactly:
/// no overlap, no gap, no trailing bytes.
class SafetensorsFile {
 public:
  /// Reads and validates the whole file at `path`. The header length is
  /// checked against the file size before the file is loaded.
  static SafetensorsFile read(const std::string& path) {
    const std::string where = "safetensors file '" + path + "'";
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      detail::throw_error(where, ": cannot open: ", std::generic_category().message(err));
    }
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      detail::throw_error(where, ": cannot stat: ", std::generic_category().message(err));
    }
    MIXPREC_CHECK(S_ISREG(st.st_mode), where, ": not a regular file");
    const auto size = static_cast<std::uint64_t>(st.st_size);
    std::uint8_t first8[8] = {};
    read_at(fd, first8, std::min<std::uint64_t>(size, 8), 0, where);
    detail::st_check_prefix(first8, size, where);
    MIXPREC_CHECK(size <= std::numeric_limits<std::size_t>::max(), where, ": ", size, " bytes do not fit in memory");
    std::vector<std::uint8_t> bytes;
    try {
      bytes.resize(static_cast<std::size_t>(size));
    } catch (const std::bad_alloc&) {
      detail::throw_error(where, ": cannot allocate ", size, " bytes to read it");
    }
    read_at(fd, bytes.data(), size, 0, where);
    // A file that grew while we read it: refuse rather than validate a
    // prefix of it.
    std::uint8_t extra;
    MIXPREC_CHECK(::pread(fd, &extra, 1, static_cast<off_t>(size)) == 0, where, ": the file changed while being read");
    return parse(std::move(bytes), path);
  }

  /// Validates `bytes` as a safetensors file; `source` names it in errors.
  static SafetensorsFile parse(std::vector<std::uint8_t> bytes, std::string source = "<memory>") {
    const std::string where = "safetensors file '" + source + "'";
    try {
      SafetensorsFile file;
      file.bytes_ = std::move(bytes);
      file.source_ = std::move(source);
      file.validate(where);
      return file;
    } catch (const Error&) {
      throw;
    } catch (const std::bad_alloc&) {
      // The header's JSON may need several times its length: out of memory
      // is an answer about this file, not a crash.
      detail::throw_error(where, ": out of memory while parsing the header");
    } catch (const std::exception& e) {
      // Never expected; still, nothing but mixprec::Error leaves this function.
      detail::throw_error(where, ": ", e.what());
    }
  }

  /// The "__metadata__" map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Every tensor, in data-offset order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  /// The tensor called `name`, or null.
  const TensorInfo* find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// The tensor called `name`; throws mixprec::Error naming it and the file
  /// when there is none.
  const TensorInfo& at(const std::string& name) const {
    const TensorInfo* t = find(name);
    MIXPREC_CHECK(t != nullptr, "safetensors file '", source_, "': no tensor named ", detail::st_quoted(name), " (",
                  tensors_.size(), " tensors)");
    return *t;
  }
  /// The first of t's nbytes() bytes in the data section. The data section
  /// starts 8 + header length bytes into the file, which the format does not
  /// require to be a multiple of anything: copy elements out (memcpy,
  /// copy_to, values) rather than casting this pointer. Throws when t's
  /// range is not inside this file's data section (a TensorInfo of another
  /// file, say).
  const std::uint8_t* data(const TensorInfo& t) const {
    MIXPREC_CHECK(t.begin <= t.end && t.end <= data_size_, "safetensors file '", source_, "': tensor ",
                  detail::st_quoted(t.name), " data_offsets [", t.begin, ", ", t.end,
                  "] are not inside this file's data section of ", data_size_, " bytes");
    return bytes_.data() + data_start_ + t.begin;
  }
  /// Copies t's bytes to `dst`, which holds `bytes` bytes; throws unless
  /// bytes == t.nbytes().
  void copy_to(const TensorInfo& t, void* dst, std::size_t bytes) const {
    const std::uint8_t* src = data(t);
    MIXPREC_CHECK(bytes == t.nbytes(), "safetensors file '", source_, "': tensor ", detail::st_quoted(t.name), " has ",
                  t.nbytes(), " bytes, the destination ", bytes);
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  /// t's elements as T; throws unless t.dtype is st_dtype_of<T>::value.
  template <class T>
  std::vector<T> values(const TensorInfo& t) const {
    static_assert(!std::is_same_v<T, bool>,
                  "values<bool>: std::vector<bool> packs bits; copy a BOOL tensor with copy_to");
    MIXPREC_CHECK(t.dtype == st_dtype_of<T>::value, "safetensors file '", source_, "': tensor ",
                  detail::st_quoted(t.name), " is ", to_string(t.dtype), ", not ", to_string(st_dtype_of<T>::value));
    std::vector<T> out(static_cast<std::size_t>(t.nbytes() / sizeof(T)));
    copy_to(t, out.data(), out.size() * sizeof(T));
    return out;
  }
  /// Where the bytes came from: the path given to read(), or parse's source.
  const std::string& source() const { return source_; }
  /// The whole file.
  const std::vector<std::uint8_t>& bytes() const { return bytes_; }

 private:
  std::vector<std::uint8_t> bytes_;
  std::string source_;
  std::uint64_t data_start_ = 0, data_size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;

  SafetensorsFile() = default;

  static void read_at(int fd, std::uint8_t* dst, std::uint64_t bytes, std::uint64_t offset, const std::string& where) {
    while (bytes > 0) {
      const std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(bytes, std::uint64_t{1} << 30));
      const ssize_t n = ::pread(fd, dst, chunk, static_cast<off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        detail::throw_error(where, ": read failed at byte ", offset, ": ", std::generic_category().message(err));
      }
      MIXPREC_CHECK(n > 0, where, ": the file changed while being read (ended at byte ", offset, ")");
      dst += n;
      offset += static_cast<std::uint64_t>(n);
      bytes -= static_cast<std::uint64_t>(n);
    }
  }

  void validate(const std::string& where) {
    using json = nlohmann::json;
    detail::st_check_little_endian_host("SafetensorsFile::parse");
    const std::uint8_t none[8] = {};  // never read: a file under 8 bytes fails the size check first
    const std::uint64_t n = detail::st_check_prefix(bytes_.size() >= 8 ? bytes_.data() : none, bytes_.size(), where);
    const std::uint8_t* header = bytes_.data() + 8;
    data_start_ = 8 + n;
    data_size_ = bytes_.size() - data_start_;

    const std::size_t bad =
        detail::utf8_invalid_at(std::string_view(reinterpret_cast<const char*>(header), static_cast<std::size_t>(n)));
    MIXPREC_CHECK(bad == n, where, ": header is not valid UTF-8 (byte ", bad, " of the header)");
    // JSON allows no NUL byte anywhere, but nlohmann's lexer takes one for
    // the end of the input and would accept "{}\0<anything>".
    const void* nul = std::memchr(header, 0, static_cast<std::size_t>(n));
    MIXPREC_CHECK(nul == nullptr, where, ": header is not valid JSON: NUL byte at byte ",
                  nul ? static_cast<const std::uint8_t*>(nul) - header : 0, " of the header");

    detail::StHeaderSax sax;
    const bool ok = json::sax_parse(header, header + n, &sax, json::input_format_t::json, /*strict=*/true,
                                    /*ignore_comments=*/false);
    MIXPREC_CHECK(ok && sax.error.empty(), where, ": ", sax.error.empty() ? "header is not valid JSON" : sax.error);
    const json& root = sax.root;
    MIXPREC_CHECK(root.is_object(), where, ": header must be a JSON object, got ", root.type_name());

    tensors_.reserve(root.size());
    for (const auto& [name, entry] : root.items()) {
      if (name == "__metadata__") {
        read_metadata(entry, where);
      } else {
        tensors_.push_back(read_entry(name, entry, where));
      }
    }

    // The ranges must tile [0, data_size_) exactly, as the reference
    // implementation requires: an overlap would let two tensors alias, and
    // a gap or trailing bytes would be data no tensor accounts for.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end != b.end ? a.end < b.end : a.name < b.name;
    });
    std::uint64_t covered = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo& t : tensors_) {
      MIXPREC_CHECK(t.begin >= covered, where, ": tensor ", detail::st_quoted(t.name), " data_offsets [", t.begin, ", ",
                    t.end, "] overlap tensor ", detail::st_quoted(previous ? previous->name : std::string()),
                    " data_offsets [", previous ? previous->begin : 0, ", ", covered, "]");
      MIXPREC_CHECK(t.begin == covered, where, ": gap in the data section: no tensor covers bytes [", covered, ", ",
                    t.begin, ") before tensor ", detail::st_quoted(t.name));
      covered = t.end;
      previous = &t;
    }
    MIXPREC_CHECK(covered == data_size_, where, ": ", data_size_ - covered,
                  " trailing bytes: the data section is ", data_size_, " bytes, its tensors cover ", covered);
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  void read_metadata(const nlohmann::json& entry, const std::string& where) {
    MIXPREC_CHECK(entry.is_object(), where, ": __metadata__ must be an object of strings, got ", entry.type_name());
    for (const auto& [key, value] : entry.items()) {
      MIXPREC_CHECK(value.is_string(), where, ": __metadata__ ", detail::st_quoted(key), " must be a string, got ",
                    value.type_name());
      metadata_.emplace(key, value.get<std::string>());
    }
  }

  TensorInfo read_entry(const std::string& name, const nlohmann::json& entry, const std::string& where) const {
    const std::string what = where + ": tensor " + detail::st_quoted(name);
    MIXPREC_CHECK(entry.is_object(), what, ": entry must be an object, got ", entry.type_name());
    for (const auto& field : entry.items()) {
      MIXPREC_CHECK(field.key() == "dtype" || field.key() == "shape" || field.key() == "data_offsets", what,
                    ": unknown field ", detail::st_quoted(field.key()));
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      MIXPREC_CHECK(entry.contains(field), what, ": missing field \"", field, "\"");
    }
    TensorInfo t;
    t.name = name;

    const nlohmann::json& dtype = entry["dtype"];
    MIXPREC_CHECK(dtype.is_string(), what, ": dtype must be a string, got ", dtype.type_name());
    MIXPREC_CHECK(st_dtype_from_string(dtype.get<std::string>(), t.dtype), what, ": unknown dtype ",
                  detail::st_quoted(dtype.get<std::string>()));

    const nlohmann::json& shape = entry["shape"];
    MIXPREC_CHECK(shape.is_array(), what, ": shape must be an array, got ", shape.type_name());
    std::uint64_t numel = 1;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const nlohmann::json& d = shape[i];
      MIXPREC_CHECK(d.is_number_integer(), what, ": shape[", i, "] must be an integer, got ",
                    d.is_number() ? "a fraction or exponent" : d.type_name());
      // nlohmann stores non-negative integers as unsigned, negative ones as
      // signed.
      MIXPREC_CHECK(d.is_number_unsigned(), what, ": shape[", i, "] = ", d.get<std::int64_t>(), ", must be >= 0");
      const std::uint64_t v = d.get<std::uint64_t>();
      MIXPREC_CHECK(v <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), what, ": shape[", i,
                    "] = ", v, " does not fit in int64");
      t.shape.push_back(static_cast<std::int64_t>(v));
      MIXPREC_CHECK(detail::st_checked_mul(numel, v, std::numeric_limits<std::int64_t>::max(), numel), what, ": shape ",
                    shape.dump(), " has more elements than fit in int64");
    }

    const nlohmann::json& offsets = entry["data_offsets"];
    MIXPREC_CHECK(offsets.is_array() && offsets.size() == 2, what,
                  ": data_offsets must be an array of 2 integers, got ", offsets.dump().substr(0, 80));
    for (std::size_t i = 0; i < 2; ++i) {
      MIXPREC_CHECK(offsets[i].is_number_unsigned(), what, ": data_offsets[", i, "] = ",
                    offsets[i].dump().substr(0, 80), ", must be an integer in [0, 2^64)");
    }
    t.begin = offsets[0].get<std::uint64_t>();
    t.end = offsets[1].get<std::uint64_t>();
    MIXPREC_CHECK(t.begin <= t.end, what, ": data_offsets [", t.begin, ", ", t.end, "] begin after they end");
    MIXPREC_CHECK(t.end <= data_size_, what, ": data_offsets [", t.begin, ", ", t.end,
                  "] run past the end of the data section of ", data_size_, " bytes");
    std::uint64_t nbytes = 0;
    MIXPREC_CHECK(detail::st_checked_mul(numel, size_of(t.dtype), std::numeric_limits<std::uint64_t>::max(), nbytes),
                  what, ": ", to_string(t.dtype), " shape ", detail::st_shape_string(t.shape),
                  " needs more than 2^64 bytes");
    MIXPREC_CHECK(t.end - t.begin == nbytes, what, ": data_offsets [", t.begin, ", ", t.end, "] hold ",
                  t.end - t.begin, " bytes, but ", to_string(t.dtype), " shape ", detail::st_shape_string(t.shape),
                  " needs ", nbytes);
    return t;
  }
};

}  // namespace io
MIXPREC_NAMESPACE_END
