// A bundle version's transforms (transforms.json + vocab/<feature>.arrow) read and applied in
// C++, following bundle/FORMAT.md ("transforms.json", "Encoding a query",
// "vocab/<feature>.arrow") and nothing else: no Python, no recship code.
//
// recship_golden_check uses it to encode the raw golden queries recorded in golden.pt and to
// compare the result with the inputs the server's encoding recorded there. Everything here is
// immutable after reading and may be shared between threads.

#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace recship {

// A transforms file, vocabulary or raw query that does not follow bundle/FORMAT.md, or a raw
// value the server would refuse; the message names the file or the query and feature.
class EncodingError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// FNV-1a 64 of the 8 little-endian bytes of `seed`, then of `text`'s bytes (UTF-8).
uint64_t fnv1a_64(uint64_t seed, std::string_view text);

// vocab/<feature>.arrow: `value` (utf8, row r is id r), `hash` (uint64 fnv1a_64(0, value),
// ascending) and `id` (int64, the id of each hash). The file stays memory-mapped.
class Vocabulary {
 public:
  // Reads and checks the file (columns, types, equal lengths, ids in range, sorted hashes).
  static Vocabulary read(const std::filesystem::path& path);

  // The id of `value`: binary search of its hash, then a comparison of the value at each id
  // with that hash (64-bit collisions are scanned in order).
  std::optional<int64_t> find(std::string_view value) const;
  int64_t size() const;

 private:
  struct Columns;
  explicit Vocabulary(std::shared_ptr<const Columns> columns);
  std::shared_ptr<const Columns> columns_;
};

// `derive`: cut out of a text value before the kind's rule (prefix, then pattern, then split).
struct Derivation {
  std::optional<int64_t> prefix;       // first N Unicode code points
  std::optional<std::string> pattern;  // RE2, one capturing group; no match: missing
  std::string separator;               // empty: none

  bool active() const { return prefix || pattern || !separator.empty(); }
  // The text after prefix and pattern (not split); nullopt when the pattern does not match.
  std::optional<std::string> apply(const std::string& text) const;
};

enum class Kind { kCategorical, kHashed, kBucketized, kDense };

// One entry of transforms.json's `features`.
struct Feature {
  std::string name;
  Kind kind = Kind::kCategorical;
  bool multi_valued = false;
  int64_t cardinality = 0;
  nlohmann::json default_value;  // null: required
  int64_t max_length = 64;
  Derivation derive;
  // categorical
  std::optional<Vocabulary> vocabulary;
  bool oov_bucket = false;
  // hashed
  uint64_t seed = 0;
  uint64_t buckets = 0;
  // bucketized
  std::vector<double> boundaries;
  bool missing_bucket = false;
  // dense
  std::optional<double> clip_min;
  std::optional<double> clip_max;
  bool log1p = false;
  double mean = 0.0;
  double std = 0.0;

  bool textual() const {
    return kind == Kind::kCategorical || kind == Kind::kHashed || derive.active();
  }
};

struct Transforms {
  std::map<std::string, Feature> features;
  std::optional<std::string> user_key;

  // Reads <version_dir>/transforms.json and every vocabulary it names.
  static Transforms read(const std::filesystem::path& version_dir);
  const Feature& feature(const std::string& name) const;
};

// golden.pt's `raw_queries` JSON: the features to encode and the queries (name -> raw value).
struct RawQueries {
  std::vector<std::string> sparse_features;
  std::vector<std::string> dense_features;
  std::vector<nlohmann::json> queries;

  static RawQueries parse(const std::string& text);
};

// The model inputs of B queries, in the entry points' layout.
struct EncodedQueries {
  std::vector<int64_t> values;   // [N], feature-major
  std::vector<int32_t> lengths;  // [F * B]: feature 0's B bags, then feature 1's, ...
  std::vector<float> dense;      // [B * Fd], row-major
};

// Encodes the raw queries as the server does (bundle/FORMAT.md, "Encoding a query"): each
// feature from the query, else its default (a cold start's user key: an empty bag), then the
// derivation and the kind's rule. Throws EncodingError for what the server refuses, and for a
// query that would need a stored user's values (not part of a raw golden record).
EncodedQueries encode_queries(const Transforms& transforms, const RawQueries& raw);

}  // namespace recship
