// transforms.json + vocab/<feature>.arrow in C++: reading (nlohmann/json, Arrow IPC) and the
// request encoding of bundle/FORMAT.md. See transforms.h.

#include "transforms.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <utility>

#include <arrow/api.h>
#include <arrow/compute/api.h>
#include <arrow/io/file.h>
#include <arrow/ipc/reader.h>

namespace fs = std::filesystem;
using nlohmann::json;

namespace recship {

namespace {

constexpr int64_t kTransformsFormatVersion = 1;
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;
constexpr uint64_t kVocabularySeed = 0;

template <typename T>
T ok(arrow::Result<T> result, const std::string& what) {
  if (!result.ok()) {
    throw EncodingError(what + ": " + result.status().ToString());
  }
  return std::move(result).ValueUnsafe();
}

// A raw value in an error message: its JSON text, cut when long.
std::string shown(const json& value) {
  std::string text = value.dump();
  return text.size() <= 80 ? text : text.substr(0, 77) + "...";
}

bool is_integer(const json& value) { return value.is_number_integer(); }

bool is_finite_number(const json& value) {
  return value.is_number() && std::isfinite(value.get<double>());
}

// The text a categorical or hashed feature looks a value up by: a text, or an integer's
// decimal digits.
std::string text_of(const json& value) {
  if (value.is_string()) {
    return value.get<std::string>();
  }
  return value.is_number_unsigned() ? std::to_string(value.get<uint64_t>())
                                    : std::to_string(value.get<int64_t>());
}

// Text read as a number by a numeric kind after a derivation: blank is missing (NaN).
double number_of(const std::string& text, const std::string& field) {
  const auto first = text.find_first_not_of(" \t\n\r\f\v");
  if (first == std::string::npos) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  double number = 0.0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, number);
  if (error != std::errc() || stop != end) {
    throw EncodingError(field + ": needs numbers, got '" + text + "'");
  }
  return number;
}

std::vector<std::string> split(const std::string& text, const std::string& separator) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t at = text.find(separator, start);
    const std::string part = text.substr(start, at == std::string::npos ? at : at - start);
    if (!part.empty()) {
      parts.push_back(part);
    }
    if (at == std::string::npos) {
      return parts;
    }
    start = at + separator.size();
  }
}

// The pattern with its capturing group named, as Arrow's extract_regex requires: the '(' that
// opens the first capturing group, found as a regex engine reads the pattern (an escape takes
// the next character; a character class, where a first ']' is literal, holds no groups), the
// rule of bundle/transforms.py.
std::string named_pattern(const std::string& pattern) {
  if (pattern.find("(?P<") != std::string::npos) {
    return pattern;
  }
  bool in_class = false;
  size_t i = 0;
  while (i < pattern.size()) {
    const char c = pattern[i];
    if (c == '\\') {
      i += 2;
      continue;
    }
    if (in_class) {
      in_class = c != ']';
    } else if (c == '[') {
      in_class = true;
      ++i;
      if (i < pattern.size() && pattern[i] == '^') {
        ++i;
      }
      if (i < pattern.size() && pattern[i] == ']') {
        ++i;
      }
      continue;
    } else if (c == '(' && !(i + 1 < pattern.size() && pattern[i + 1] == '?')) {
      return pattern.substr(0, i) + "(?P<value>" + pattern.substr(i + 1);
    }
    ++i;
  }
  throw EncodingError("pattern '" + pattern + "' needs exactly one (group)");
}

// The id of one element of a categorical, hashed or bucketized feature, given as text after
// its derivation (nullopt: missing).
int64_t text_id(const Feature& feature, const std::optional<std::string>& text,
                const std::string& field, const json& raw) {
  switch (feature.kind) {
    case Kind::kCategorical: {
      std::optional<int64_t> id = text ? feature.vocabulary->find(*text) : std::nullopt;
      if (id) {
        return *id;
      }
      if (!feature.oov_bucket) {
        throw EncodingError(field + ": value " + shown(raw) + " is not in its vocabulary");
      }
      return feature.vocabulary->size();
    }
    case Kind::kHashed:
      return static_cast<int64_t>(fnv1a_64(feature.seed, text.value_or("")) % feature.buckets);
    default:
      throw EncodingError(field + ": expected numbers, got text");
  }
}

// The bucket of one number (NaN: missing, which has a bucket only with missing_bucket).
int64_t bucket_id(const Feature& feature, double number, const std::string& field,
                  const json& raw) {
  if (std::isnan(number)) {
    if (!feature.missing_bucket) {
      throw EncodingError(field + ": value " + shown(raw) +
                          " has no bucket: it is not a number and the feature has no missing "
                          "bucket");
    }
    return 0;
  }
  const auto above = std::upper_bound(feature.boundaries.begin(), feature.boundaries.end(), number);
  return (above - feature.boundaries.begin()) + (feature.missing_bucket ? 1 : 0);
}

float dense_rule(const Feature& feature, double number) {
  if (feature.clip_min) {
    number = std::max(number, *feature.clip_min);
  }
  if (feature.clip_max) {
    number = std::min(number, *feature.clip_max);
  }
  if (feature.log1p) {
    number = std::log1p(number);
  }
  if (feature.std > 0) {
    number = (number - feature.mean) / feature.std;
  }
  return static_cast<float>(number);
}

// Ids of one sent (or default) value of a sparse feature.
std::vector<int64_t> sparse_ids(const Feature& feature, const json& value,
                                const std::string& field) {
  std::vector<json> elements;
  bool derived = false;  // the elements went through the derivation already
  if (feature.multi_valued) {
    if (value.is_string() && !feature.derive.separator.empty()) {
      const std::optional<std::string> text = feature.derive.apply(value.get<std::string>());
      if (text) {
        for (const std::string& part : split(*text, feature.derive.separator)) {
          elements.emplace_back(part);
        }
      } else {
        elements.emplace_back(nullptr);  // refused below, as the server refuses it
      }
      derived = true;
    } else if (value.is_array()) {
      elements.assign(value.begin(), value.end());
      derived = true;  // lists are taken as they are
    } else {
      elements.push_back(value);
      derived = true;  // a list of one, taken as it is
    }
    if (static_cast<int64_t>(elements.size()) > feature.max_length) {
      throw EncodingError(field + ": " + std::to_string(elements.size()) + " values, at most " +
                          std::to_string(feature.max_length));
    }
  } else if (value.is_array()) {
    throw EncodingError(field + ": takes one value, not a list");
  } else {
    elements.push_back(value);
  }
  const bool textual = feature.textual();
  std::vector<int64_t> ids;
  for (const json& element : elements) {
    if (textual && !(element.is_string() || is_integer(element))) {
      throw EncodingError(field + ": takes text or an integer, got " + shown(element));
    }
    if (!textual && !is_finite_number(element)) {
      throw EncodingError(field + ": takes a finite number, got " + shown(element));
    }
    if (!textual) {
      ids.push_back(bucket_id(feature, element.get<double>(), field, element));
      continue;
    }
    const std::string text = text_of(element);
    const std::optional<std::string> cut = derived ? std::optional(text) : feature.derive.apply(text);
    if (feature.kind == Kind::kBucketized) {
      if (feature.multi_valued) {  // list elements are not derived: text is no number here
        throw EncodingError(field + ": expected numbers, got text");
      }
      ids.push_back(bucket_id(
          feature, cut ? number_of(*cut, field) : std::numeric_limits<double>::quiet_NaN(), field,
          element));
    } else {
      ids.push_back(text_id(feature, cut, field, value));
    }
  }
  return ids;
}

// The float32 value of one sent value of a dense feature.
float dense_value(const Feature& feature, const json& value, const std::string& field) {
  double number = std::numeric_limits<double>::quiet_NaN();  // stays NaN: refused
  if (feature.derive.active()) {
    if (value.is_string() || is_integer(value)) {
      const std::optional<std::string> cut = feature.derive.apply(text_of(value));
      number = cut ? number_of(*cut, field) : number;
    }
  } else if (is_finite_number(value)) {
    number = value.get<double>();
  }
  if (!std::isfinite(number)) {
    throw EncodingError(field + ": needs one finite number, got " + shown(value));
  }
  const float encoded = dense_rule(feature, number);
  if (!std::isfinite(encoded)) {  // e.g. log1p of a value <= -1, or beyond float32
    throw EncodingError(field + ": " + shown(value) +
                        " is outside the feature's domain (its transform gives no finite number)");
  }
  return encoded;
}

enum class KeyState { kNone, kKnown, kCold };

KeyState key_state(const Transforms& transforms, const json& query, const std::string& where) {
  if (!transforms.user_key || !query.contains(*transforms.user_key)) {
    return KeyState::kNone;
  }
  const json& key = query.at(*transforms.user_key);
  if (!(key.is_string() || is_integer(key))) {
    throw EncodingError(where + ": " + *transforms.user_key +
                        ": the user key is one text or integer value");
  }
  const Feature& feature = transforms.feature(*transforms.user_key);
  if (!feature.vocabulary) {
    throw EncodingError("transforms.json: the user key " + feature.name + " is not categorical");
  }
  return feature.vocabulary->find(text_of(key)) ? KeyState::kKnown : KeyState::kCold;
}

// The value a query gives a feature: sent, else its default.
const json& value_of(const Feature& feature, const json& query, KeyState state,
                     const std::string& field) {
  if (query.contains(feature.name)) {
    return query.at(feature.name);
  }
  if (state == KeyState::kKnown) {
    throw EncodingError(field + ": missing; a raw golden query naming a known user sends " +
                        "every feature (stored users' values are not part of the record)");
  }
  if (feature.default_value.is_null()) {
    throw EncodingError(field + ": missing, and the feature has no default");
  }
  return feature.default_value;
}

// -- reading transforms.json ------------------------------------------------------------------
Kind kind_of(const std::string& kind) {
  static const std::map<std::string, Kind> kinds = {{"categorical", Kind::kCategorical},
                                                    {"hashed", Kind::kHashed},
                                                    {"bucketized", Kind::kBucketized},
                                                    {"dense", Kind::kDense}};
  const auto found = kinds.find(kind);
  if (found == kinds.end()) {
    throw EncodingError("unknown kind '" + kind + "'");
  }
  return found->second;
}

std::optional<double> optional_number(const json& entry, const char* key) {
  if (!entry.contains(key) || entry.at(key).is_null()) {
    return std::nullopt;
  }
  return entry.at(key).get<double>();
}

Derivation derivation_of(const json& entry) {
  Derivation derive;
  if (!entry.contains("derive") || entry.at("derive").is_null()) {
    return derive;
  }
  const json& keys = entry.at("derive");
  for (const auto& [key, value] : keys.items()) {
    if (key != "prefix" && key != "pattern" && key != "separator") {
      throw EncodingError("derive holds the unknown key '" + key + "'");
    }
    if (value.is_null()) {
      continue;
    }
    if (key == "prefix") {
      derive.prefix = value.get<int64_t>();
    } else if (key == "pattern") {
      derive.pattern = value.get<std::string>();
    } else {
      derive.separator = value.get<std::string>();
    }
  }
  return derive;
}

Feature feature_of(const json& entry, const fs::path& folder) {
  Feature feature;
  feature.name = entry.at("name").get<std::string>();
  feature.kind = kind_of(entry.at("kind").get<std::string>());
  feature.multi_valued = entry.value("multi_valued", false);
  feature.cardinality = entry.value("cardinality", int64_t{0});
  feature.default_value = entry.contains("default") ? entry.at("default") : json();
  feature.max_length = entry.value("max_length", int64_t{64});
  feature.derive = derivation_of(entry);
  if (!feature.derive.separator.empty() && !feature.multi_valued) {
    throw EncodingError("a separator makes a feature multi-valued");
  }
  switch (feature.kind) {
    case Kind::kCategorical: {
      const std::string oov = entry.at("oov").get<std::string>();
      if (oov != "bucket" && oov != "error") {
        throw EncodingError("oov must be bucket or error, not '" + oov + "'");
      }
      feature.oov_bucket = oov == "bucket";
      feature.vocabulary = Vocabulary::read(folder / entry.at("vocabulary").get<std::string>());
      break;
    }
    case Kind::kHashed: {
      if (entry.at("hash").get<std::string>() != "fnv1a_64") {
        throw EncodingError("unknown hash '" + entry.at("hash").get<std::string>() + "'");
      }
      const json& seed = entry.at("seed");  // a negative seed is its two's complement
      feature.seed = seed.is_number_unsigned() ? seed.get<uint64_t>()
                                               : static_cast<uint64_t>(seed.get<int64_t>());
      const int64_t buckets = entry.at("buckets").get<int64_t>();
      if (buckets <= 0) {
        throw EncodingError("buckets must be positive");
      }
      feature.buckets = static_cast<uint64_t>(buckets);
      break;
    }
    case Kind::kBucketized:
      feature.boundaries = entry.at("boundaries").get<std::vector<double>>();
      if (!std::is_sorted(feature.boundaries.begin(), feature.boundaries.end())) {
        throw EncodingError("boundaries must be ascending");
      }
      feature.missing_bucket = entry.value("missing_bucket", false);
      break;
    case Kind::kDense:
      feature.clip_min = optional_number(entry, "clip_min");
      feature.clip_max = optional_number(entry, "clip_max");
      feature.log1p = entry.value("log1p", false);
      feature.mean = entry.value("mean", 0.0);
      feature.std = entry.value("std", 0.0);
      break;
  }
  return feature;
}

}  // namespace

uint64_t fnv1a_64(uint64_t seed, std::string_view text) {
  uint64_t hash = kFnvOffset;
  for (int byte = 0; byte < 8; ++byte) {
    hash = (hash ^ ((seed >> (8 * byte)) & 0xff)) * kFnvPrime;
  }
  for (const char c : text) {
    hash = (hash ^ static_cast<unsigned char>(c)) * kFnvPrime;
  }
  return hash;
}

// -- Vocabulary --------------------------------------------------------------------------------
struct Vocabulary::Columns {
  std::shared_ptr<arrow::Table> table;  // owns the mapped file the arrays point into
  std::shared_ptr<arrow::StringArray> values;
  const uint64_t* hashes = nullptr;
  const int64_t* ids = nullptr;
  int64_t rows = 0;
};

Vocabulary::Vocabulary(std::shared_ptr<const Columns> columns) : columns_(std::move(columns)) {}

Vocabulary Vocabulary::read(const fs::path& path) {
  const std::string where = path.string();
  auto file = ok(arrow::io::MemoryMappedFile::Open(where, arrow::io::FileMode::READ), where);
  auto reader = ok(arrow::ipc::RecordBatchFileReader::Open(file), where);
  auto table = ok(ok(reader->ToTable(), where)->CombineChunks(), where);
  auto column = [&](const char* name, const std::shared_ptr<arrow::DataType>& type) {
    auto found = table->GetColumnByName(name);
    if (!found || !found->type()->Equals(type)) {
      throw EncodingError(where + ": a vocabulary needs columns value (utf8), hash (uint64) " +
                          "and id (int64)");
    }
    return found->num_chunks() ? found->chunk(0) : ok(arrow::MakeEmptyArray(type), where);
  };
  auto columns = std::make_shared<Columns>();
  columns->table = table;
  columns->values = std::static_pointer_cast<arrow::StringArray>(column("value", arrow::utf8()));
  auto hashes = std::static_pointer_cast<arrow::UInt64Array>(column("hash", arrow::uint64()));
  auto ids = std::static_pointer_cast<arrow::Int64Array>(column("id", arrow::int64()));
  columns->rows = columns->values->length();
  columns->hashes = hashes->raw_values();
  columns->ids = ids->raw_values();
  bool consistent = hashes->length() == columns->rows && ids->length() == columns->rows &&
                    hashes->null_count() == 0 && ids->null_count() == 0 &&
                    columns->values->null_count() == 0 &&
                    std::is_sorted(columns->hashes, columns->hashes + columns->rows);
  for (int64_t row = 0; consistent && row < columns->rows; ++row) {
    consistent = columns->ids[row] >= 0 && columns->ids[row] < columns->rows;
  }
  if (!consistent) {
    throw EncodingError(where + ": the vocabulary's lookup index is not consistent");
  }
  return Vocabulary(std::move(columns));
}

std::optional<int64_t> Vocabulary::find(std::string_view value) const {
  const Columns& c = *columns_;
  const uint64_t hash = fnv1a_64(kVocabularySeed, value);
  for (const uint64_t* at = std::lower_bound(c.hashes, c.hashes + c.rows, hash);
       at != c.hashes + c.rows && *at == hash; ++at) {
    const int64_t id = c.ids[at - c.hashes];
    if (c.values->GetView(id) == value) {
      return id;
    }
  }
  return std::nullopt;
}

int64_t Vocabulary::size() const { return columns_->rows; }

// -- Derivation -------------------------------------------------------------------------------
std::optional<std::string> Derivation::apply(const std::string& text) const {
  std::string value = text;
  if (prefix) {
    size_t end = 0;
    for (int64_t points = 0; end < value.size() && points < *prefix; ++points) {
      ++end;  // past a lead byte, then its continuation bytes (10xxxxxx)
      while (end < value.size() && (static_cast<unsigned char>(value[end]) & 0xc0) == 0x80) {
        ++end;
      }
    }
    value.resize(end);
  }
  if (pattern) {
    // RE2, the engine the server applies patterns with (through Arrow's extract_regex).
    arrow::StringBuilder builder;
    if (!builder.Append(value).ok()) {
      throw EncodingError("cannot build a string array");
    }
    const auto input = ok(builder.Finish(), "pattern");
    const arrow::compute::ExtractRegexOptions options(named_pattern(*pattern));
    const auto output = ok(arrow::compute::CallFunction("extract_regex", {input}, &options),
                           "pattern '" + *pattern + "'");
    const auto groups = std::static_pointer_cast<arrow::StructArray>(output.make_array());
    if (groups->IsNull(0)) {
      return std::nullopt;
    }
    value = std::static_pointer_cast<arrow::StringArray>(groups->field(0))->GetString(0);
  }
  return value;
}

// -- Transforms -------------------------------------------------------------------------------
Transforms Transforms::read(const fs::path& version_dir) {
  static const arrow::Status compute = arrow::compute::Initialize();  // registers extract_regex
  if (!compute.ok()) {
    throw EncodingError("Arrow compute: " + compute.ToString());
  }
  const fs::path path = version_dir / "transforms.json";
  std::ifstream stream(path);
  if (!stream) {
    throw EncodingError(path.string() + ": not found");
  }
  json document;
  try {
    document = json::parse(stream);
  } catch (const json::exception& error) {
    throw EncodingError(path.string() + ": not JSON (" + error.what() + ")");
  }
  if (!document.is_object() || document.value("format_version", int64_t{0}) !=
                                   kTransformsFormatVersion) {
    throw EncodingError(path.string() + ": format_version is not 1");
  }
  Transforms transforms;
  if (document.contains("user_key") && document.at("user_key").is_string()) {
    transforms.user_key = document.at("user_key").get<std::string>();
  }
  const json features = document.value("features", json::array());
  for (size_t position = 0; position < features.size(); ++position) {
    const std::string where = path.string() + ": features[" + std::to_string(position) + "]";
    try {
      Feature feature = feature_of(features.at(position), version_dir);
      transforms.features.emplace(feature.name, std::move(feature));
    } catch (const json::exception& error) {
      throw EncodingError(where + ": malformed (" + error.what() + ")");
    } catch (const EncodingError& error) {
      throw EncodingError(where + ": " + error.what());
    }
  }
  return transforms;
}

const Feature& Transforms::feature(const std::string& name) const {
  const auto found = features.find(name);
  if (found == features.end()) {
    throw EncodingError("transforms.json has no feature '" + name + "'");
  }
  return found->second;
}

RawQueries RawQueries::parse(const std::string& text) {
  try {
    const json document = json::parse(text);
    RawQueries raw;
    raw.sparse_features = document.at("sparse_features").get<std::vector<std::string>>();
    raw.dense_features = document.at("dense_features").get<std::vector<std::string>>();
    for (const json& query : document.at("queries")) {
      if (!query.is_object()) {
        throw EncodingError("golden.pt raw_queries: a query is not an object");
      }
      raw.queries.push_back(query);
    }
    return raw;
  } catch (const json::exception& error) {
    throw EncodingError(std::string("golden.pt raw_queries: malformed (") + error.what() + ")");
  }
}

// -- encoding ----------------------------------------------------------------------------------
EncodedQueries encode_queries(const Transforms& transforms, const RawQueries& raw) {
  const size_t rows = raw.queries.size();
  const size_t dense_width = raw.dense_features.size();
  std::set<std::string> accepted(raw.sparse_features.begin(), raw.sparse_features.end());
  accepted.insert(raw.dense_features.begin(), raw.dense_features.end());
  if (transforms.user_key) {
    accepted.insert(*transforms.user_key);
  }
  // bags[feature][query]: the ids of one bag.
  std::vector<std::vector<std::vector<int64_t>>> bags(raw.sparse_features.size(),
                                                      std::vector<std::vector<int64_t>>(rows));
  EncodedQueries encoded;
  encoded.dense.resize(rows * dense_width);
  for (size_t q = 0; q < rows; ++q) {
    const json& query = raw.queries[q];
    const std::string where = "raw query " + std::to_string(q);
    for (const auto& item : query.items()) {
      if (!accepted.count(item.key())) {
        throw EncodingError(where + ": unknown feature '" + item.key() + "'");
      }
    }
    const KeyState state = key_state(transforms, query, where);
    for (size_t f = 0; f < raw.sparse_features.size(); ++f) {
      const Feature& feature = transforms.feature(raw.sparse_features[f]);
      if (transforms.user_key == feature.name && state == KeyState::kCold) {
        continue;  // a cold start: the unknown key is an empty bag, whatever its oov
      }
      const std::string field = where + ": " + feature.name;
      bags[f][q] = sparse_ids(feature, value_of(feature, query, state, field), field);
    }
    for (size_t d = 0; d < dense_width; ++d) {
      const Feature& feature = transforms.feature(raw.dense_features[d]);
      const std::string field = where + ": " + feature.name;
      const json& value = value_of(feature, query, state, field);
      if (query.contains(feature.name)) {
        encoded.dense[q * dense_width + d] = dense_value(feature, value, field);
      } else if (is_finite_number(value)) {  // a default: the number, not derived
        encoded.dense[q * dense_width + d] = dense_rule(feature, value.get<double>());
      } else {
        throw EncodingError(field + ": its default is not a number");
      }
    }
  }
  for (const auto& feature : bags) {
    for (const auto& bag : feature) {
      encoded.values.insert(encoded.values.end(), bag.begin(), bag.end());
      encoded.lengths.push_back(static_cast<int32_t>(bag.size()));
    }
  }
  return encoded;
}

}  // namespace recship
