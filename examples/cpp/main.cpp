// recship_golden_check: reruns a recship bundle version's golden self-test with libtorch alone.
//
// Usage: recship_golden_check <bundle_version_dir> [--fbgemm-dir DIR] [--warmup N]
//                             [--repeats N] [--threads N]
//
// It loads fbgemm_gpu's operator libraries (the quantized embedding lookups the entry points
// call), reads golden.pt (inputs and expected outputs per entry point, plus tolerances), loads
// every entry point the golden file names in each format present in the directory
// (<name>.pt: TorchScript, <name>.pt2: AOTInductor package), warms each up, times it, runs the
// golden inputs and compares with the recorded output:
//   passed  <=>  |actual - expected| <= atol + rtol * |expected|  element-wise.
// When golden.pt records raw golden queries (requests as a client sends them), it also reads
// transforms.json and vocab/<feature>.arrow, encodes those queries itself (transforms.h), checks
// that they give the recorded query tower inputs and query-side dense values, and runs every
// query tower file on its own encoding: the row "query_tower from raw values".
// Exit status: 0 when every check passes, 1 when one fails or an entry point is missing (a
// transforms file that cannot be read or applied fails the raw check), 2 on bad usage or an
// unreadable golden file / fbgemm library.

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include "transforms.h"

namespace fs = std::filesystem;

namespace {

constexpr int kExitPassed = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int64_t kGoldenFormatVersion = 1;
constexpr const char* kQueryTower = "query_tower";
constexpr const char* kRawQueries = "raw_queries";

// The fbgemm_gpu libraries the entry points need, in load order: TBE common code (used by the
// AOTInductor packages' proxy executor), the quantized inference lookups, and the Python-side
// operator registrations (asynchronous_complete_cumsum and friends, torchbind classes).
const std::vector<std::string> kFbgemmLibraries = {
    "fbgemm_gpu_tbe_common.so",
    "fbgemm_gpu_tbe_inference.so",
    "fbgemm_gpu_py.so",
};

constexpr const char* kUsage =
    "usage: recship_golden_check <bundle_version_dir> [--fbgemm-dir DIR] [--warmup N]\n"
    "                            [--repeats N] [--threads N]\n"
    "  --fbgemm-dir DIR  the installed fbgemm_gpu package folder (default: $RECSHIP_FBGEMM_DIR)\n"
    "  --warmup N        untimed calls per entry point before timing (default 20)\n"
    "  --repeats N       timed calls per entry point (default 100)\n"
    "  --threads N       intra-op threads (default: libtorch's choice)\n";

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  fs::path bundle;
  fs::path fbgemm_dir;
  int warmup = 20;
  int repeats = 100;
  int threads = 0;  // 0: leave libtorch's default
};

int parse_count(const std::string& flag, const std::string& text, int minimum) {
  try {
    size_t used = 0;
    int value = std::stoi(text, &used);
    if (used == text.size() && value >= minimum) {
      return value;
    }
  } catch (const std::exception&) {
  }
  throw UsageError(flag + " needs an integer >= " + std::to_string(minimum) + ", got '" + text +
                   "'");
}

Options parse_options(int argc, char** argv) {
  Options options;
  if (const char* env = std::getenv("RECSHIP_FBGEMM_DIR")) {
    options.fbgemm_dir = env;
  }
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        throw UsageError(arg + " needs a value");
      }
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(kExitPassed);
    } else if (arg == "--fbgemm-dir") {
      options.fbgemm_dir = value();
    } else if (arg == "--warmup") {
      options.warmup = parse_count(arg, value(), 0);
    } else if (arg == "--repeats") {
      options.repeats = parse_count(arg, value(), 1);
    } else if (arg == "--threads") {
      options.threads = parse_count(arg, value(), 1);
    } else if (arg.starts_with("--")) {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 1) {
    throw UsageError("give exactly one bundle version directory");
  }
  options.bundle = positional.front();
  if (!fs::is_directory(options.bundle)) {
    throw UsageError(options.bundle.string() + ": not a directory");
  }
  if (options.fbgemm_dir.empty()) {
    throw UsageError(
        "no fbgemm_gpu folder: pass --fbgemm-dir or set RECSHIP_FBGEMM_DIR (python -c 'import "
        "fbgemm_gpu, os; print(os.path.dirname(fbgemm_gpu.__file__))')");
  }
  return options;
}

// Makes fbgemm's operators and torchbind classes visible to the TorchScript and AOTI loaders.
// The handles stay open for the life of the process on purpose.
void load_fbgemm(const fs::path& folder) {
  for (const auto& name : kFbgemmLibraries) {
    const fs::path library = folder / name;
    if (dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      throw std::runtime_error("cannot load " + library.string() + ": " + dlerror());
    }
  }
}

struct GoldenRecord {
  std::string name;
  std::vector<torch::Tensor> inputs;
  torch::Tensor output;
};

// golden.pt's raw golden queries: the queries' JSON and what the server's encoding of them
// gave (bundle/FORMAT.md, golden.pt).
struct RawRecord {
  std::string queries;
  torch::Tensor values;   // int64 [N]
  torch::Tensor lengths;  // int32 [F * B]
  torch::Tensor dense;    // float32 [B, Fd]
  torch::Tensor output;   // float32 [B, D], the query tower's output
};

struct Golden {
  std::vector<GoldenRecord> records;
  double atol = 0.0;
  double rtol = 0.0;
  std::optional<RawRecord> raw;  // absent in versions packaged before raw queries existed
};

// golden.pt is a TorchScript module without methods; its attributes hold the recording
// (layout: bundle/FORMAT.md, golden.pt).
Golden read_golden(const fs::path& path) {
  if (!fs::is_regular_file(path)) {
    throw std::runtime_error(path.string() + ": golden file not found");
  }
  torch::jit::Module module = torch::jit::load(path.string());
  auto attribute = [&](const std::string& key) {
    if (!module.hasattr(key)) {
      throw std::runtime_error(path.string() + ": not a golden file, no attribute '" + key + "'");
    }
    return module.attr(key);
  };
  const int64_t version = attribute("format_version").toInt();
  if (version != kGoldenFormatVersion) {
    throw std::runtime_error(path.string() + ": golden format_version " +
                             std::to_string(version) + " is not " +
                             std::to_string(kGoldenFormatVersion));
  }
  Golden golden;
  golden.atol = attribute("atol").toDouble();
  golden.rtol = attribute("rtol").toDouble();
  for (const auto& name : attribute("names").toListRef()) {
    GoldenRecord record;
    record.name = name.toStringRef();
    record.inputs = attribute(record.name + "__inputs").toTensorVector();
    record.output = attribute(record.name + "__output").toTensor();
    golden.records.push_back(std::move(record));
  }
  if (module.hasattr(kRawQueries)) {
    const std::string prefix = std::string(kRawQueries) + "__";
    golden.raw = RawRecord{attribute(kRawQueries).toStringRef(),
                           attribute(prefix + "values").toTensor(),
                           attribute(prefix + "lengths").toTensor(),
                           attribute(prefix + "dense").toTensor(),
                           attribute(prefix + "output").toTensor()};
  }
  return golden;
}

// One loaded entry point: plain tensors in, one tensor out.
class EntryPoint {
 public:
  virtual ~EntryPoint() = default;
  virtual torch::Tensor operator()(const std::vector<torch::Tensor>& inputs) = 0;
};

class TorchScriptEntryPoint : public EntryPoint {
 public:
  explicit TorchScriptEntryPoint(const fs::path& path) : module_(torch::jit::load(path.string())) {
    module_.eval();
  }

  torch::Tensor operator()(const std::vector<torch::Tensor>& inputs) override {
    return module_.forward(std::vector<torch::IValue>(inputs.begin(), inputs.end())).toTensor();
  }

 private:
  torch::jit::Module module_;
};

class AotiEntryPoint : public EntryPoint {
 public:
  explicit AotiEntryPoint(const fs::path& path) : loader_(path.string()) {}

  torch::Tensor operator()(const std::vector<torch::Tensor>& inputs) override {
    std::vector<torch::Tensor> outputs = loader_.run(inputs);
    if (outputs.size() != 1) {
      throw std::runtime_error("expected one output, got " + std::to_string(outputs.size()));
    }
    return outputs.front();
  }

 private:
  torch::inductor::AOTIModelPackageLoader loader_;
};

struct Result {
  std::string name;
  std::string file;
  double max_abs_diff = std::numeric_limits<double>::quiet_NaN();
  double micros_per_call = std::numeric_limits<double>::quiet_NaN();
  bool passed = false;
  std::string note;
};

// Mean microseconds of one `call` over the timed repeats, after the untimed warm-up calls.
template <typename Call>
double micros_per_call(const Options& options, Call&& call) {
  for (int i = 0; i < options.warmup; ++i) {
    call();
  }
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < options.repeats; ++i) {
    call();
  }
  const std::chrono::duration<double, std::micro> elapsed =
      std::chrono::steady_clock::now() - started;
  return elapsed.count() / options.repeats;
}

// Fills the result's difference and verdict: an output of another shape or dtype never passes.
Result compare(const torch::Tensor& output, const torch::Tensor& expected, const Golden& golden,
               Result result) {
  const torch::Tensor actual = output.to(torch::kCPU);
  if (actual.sizes() != expected.sizes() || actual.scalar_type() != expected.scalar_type()) {
    std::ostringstream note;
    note << "output " << actual.sizes() << " " << actual.scalar_type() << ", recorded "
         << expected.sizes() << " " << expected.scalar_type();
    result.max_abs_diff = std::numeric_limits<double>::infinity();
    result.note = note.str();
    return result;
  }
  result.max_abs_diff =
      actual.numel() == 0
          ? 0.0
          : (actual.to(torch::kDouble) - expected.to(torch::kDouble)).abs().max().item<double>();
  result.passed = torch::allclose(actual, expected, golden.rtol, golden.atol);
  return result;
}

Result check(EntryPoint& entry, const GoldenRecord& record, const Golden& golden,
             const Options& options, Result result) {
  torch::InferenceMode inference;
  result.micros_per_call = micros_per_call(options, [&] { entry(record.inputs); });
  return compare(entry(record.inputs), record.output, golden, result);
}

// The query tower's (values, lengths) of encoded queries.
std::vector<torch::Tensor> tower_inputs(const recship::EncodedQueries& encoded) {
  auto values = torch::tensor(c10::ArrayRef<int64_t>(encoded.values), torch::kInt64);
  auto lengths = torch::tensor(c10::ArrayRef<int32_t>(encoded.lengths), torch::kInt32);
  return {values, lengths};
}

std::string ids_text(const int64_t* ids, int64_t count) {
  std::ostringstream text;
  text << "[";
  for (int64_t i = 0; i < count; ++i) {
    text << (i ? ", " : "") << ids[i];
  }
  text << "]";
  return text.str();
}

// The first bag or dense value where this program's encoding differs from the recorded one,
// naming the feature and the query; empty when they agree (ids exactly, dense values within
// the golden tolerances).
std::string encoding_difference(const recship::EncodedQueries& mine, const RawRecord& recorded,
                                const recship::RawQueries& raw, const Golden& golden) {
  const torch::Tensor values = recorded.values.to(torch::kInt64).contiguous();
  const torch::Tensor lengths = recorded.lengths.to(torch::kInt64).contiguous();
  const torch::Tensor dense = recorded.dense.to(torch::kFloat).contiguous();
  const int64_t rows = static_cast<int64_t>(raw.queries.size());
  const int64_t bags = static_cast<int64_t>(raw.sparse_features.size()) * rows;
  if (lengths.numel() != bags || static_cast<int64_t>(mine.lengths.size()) != bags ||
      lengths.sum().item<int64_t>() != values.numel() ||
      dense.numel() != static_cast<int64_t>(mine.dense.size())) {
    return "the recorded tensors do not fit the raw queries";
  }
  const int64_t* theirs = values.data_ptr<int64_t>();
  const int64_t* their_lengths = lengths.data_ptr<int64_t>();
  int64_t my_offset = 0;
  int64_t their_offset = 0;
  for (int64_t bag = 0; bag < bags; ++bag) {
    const int64_t my_length = mine.lengths[bag];
    const int64_t their_length = their_lengths[bag];
    if (my_length != their_length ||
        !std::equal(mine.values.begin() + my_offset, mine.values.begin() + my_offset + my_length,
                    theirs + their_offset)) {
      return raw.sparse_features[bag / rows] + " of raw query " + std::to_string(bag % rows) +
             " encodes to " + ids_text(mine.values.data() + my_offset, my_length) +
             ", recorded " + ids_text(theirs + their_offset, their_length);
    }
    my_offset += my_length;
    their_offset += their_length;
  }
  const float* recorded_dense = dense.data_ptr<float>();
  for (size_t i = 0; i < mine.dense.size(); ++i) {
    const double expected = recorded_dense[i];
    if (!(std::abs(mine.dense[i] - expected) <= golden.atol + golden.rtol * std::abs(expected))) {
      std::ostringstream text;
      text << raw.dense_features[i % raw.dense_features.size()] << " of raw query "
           << i / raw.dense_features.size() << " encodes to " << mine.dense[i] << ", recorded "
           << expected;
      return text.str();
    }
  }
  return "";
}

// The raw golden queries through this program's encoding and one query tower file: the
// encoding must give the recorded inputs, the tower on it the recorded output. The timing is
// of encoding and tower call together.
Result check_raw(EntryPoint& entry, const recship::Transforms& transforms,
                 const recship::RawQueries& raw, const RawRecord& recorded, const Golden& golden,
                 const Options& options, Result result) {
  torch::InferenceMode inference;
  const recship::EncodedQueries encoded = recship::encode_queries(transforms, raw);
  const std::string difference = encoding_difference(encoded, recorded, raw, golden);
  if (!difference.empty()) {
    result.max_abs_diff = std::numeric_limits<double>::infinity();
    result.note = difference;
    return result;
  }
  result.micros_per_call = micros_per_call(
      options, [&] { entry(tower_inputs(recship::encode_queries(transforms, raw))); });
  return compare(entry(tower_inputs(encoded)), recorded.output, golden, result);
}

std::unique_ptr<EntryPoint> load_entry_point(const fs::path& path) {
  if (path.extension() == ".pt2") {
    return std::make_unique<AotiEntryPoint>(path);
  }
  return std::make_unique<TorchScriptEntryPoint>(path);
}

// One row per check, ending with its verdict; a failure's reason on the next line.
void print_table(const std::vector<Result>& results, const Golden& golden) {
  std::cout << "golden self-test (atol " << golden.atol << ", rtol " << golden.rtol << ")\n";
  std::cout << std::left << std::setw(29) << "entry point" << std::setw(20) << "file"
            << std::right << std::setw(14) << "max abs diff" << std::setw(12) << "us/call"
            << "  result\n";
  for (const auto& result : results) {
    std::cout << std::left << std::setw(29) << result.name << std::setw(20) << result.file
              << std::right << std::scientific << std::setprecision(2) << std::setw(14)
              << result.max_abs_diff << std::fixed << std::setprecision(1) << std::setw(12)
              << result.micros_per_call << "  " << (result.passed ? "PASS" : "FAIL") << "\n";
    if (!result.note.empty()) {
      std::cout << "  " << result.name << ": " << result.note << "\n";
    }
  }
  std::cout << std::defaultfloat;
  if (!golden.raw) {
    std::cout << "golden.pt records no raw queries (packaged before they were): the transforms "
                 "are not checked\n";
  }
}

std::string first_line(const std::exception& error) {
  const std::string message = error.what();
  return message.substr(0, message.find('\n'));
}

int run(const Options& options) {
  if (options.threads > 0) {
    at::set_num_threads(options.threads);
  }
  load_fbgemm(options.fbgemm_dir);
  const Golden golden = read_golden(options.bundle / "golden.pt");
  if (golden.records.empty()) {
    std::cerr << "golden.pt records no entry points\n";
    return kExitFailed;
  }
  // The raw golden queries and the transforms to encode them with, read once.
  std::optional<recship::Transforms> transforms;
  std::optional<recship::RawQueries> raw;
  std::string raw_problem;
  if (golden.raw) {
    try {
      transforms = recship::Transforms::read(options.bundle);
      raw = recship::RawQueries::parse(golden.raw->queries);
    } catch (const std::exception& error) {
      raw_problem = first_line(error);
    }
  }
  std::vector<Result> results;
  std::vector<Result> raw_results;
  for (const auto& record : golden.records) {
    bool found = false;
    for (const char* suffix : {".pt", ".pt2"}) {
      const fs::path path = options.bundle / (record.name + suffix);
      if (!fs::is_regular_file(path)) {
        continue;
      }
      found = true;
      Result result;
      result.name = record.name;
      result.file = path.filename().string();
      std::unique_ptr<EntryPoint> entry;
      try {
        entry = load_entry_point(path);
        result = check(*entry, record, golden, options, result);
      } catch (const std::exception& error) {
        result.note = first_line(error);
      }
      results.push_back(result);
      if (golden.raw && record.name == kQueryTower) {
        Result raw_result;
        raw_result.name = "query_tower from raw values";
        raw_result.file = result.file;
        raw_result.note = entry ? raw_problem : result.note;
        if (entry && raw_problem.empty()) {
          try {
            raw_result = check_raw(*entry, *transforms, *raw, *golden.raw, golden, options,
                                   raw_result);
          } catch (const std::exception& error) {
            raw_result.note = first_line(error);
          }
        }
        raw_results.push_back(raw_result);
      }
    }
    if (!found) {
      Result missing;
      missing.name = record.name;
      missing.file = "-";
      missing.note = "no " + record.name + ".pt or .pt2 in the directory";
      results.push_back(missing);
    }
  }
  results.insert(results.end(), raw_results.begin(), raw_results.end());
  print_table(results, golden);
  for (const auto& result : results) {
    if (!result.passed) {
      return kExitFailed;
    }
  }
  return kExitPassed;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_options(argc, argv));
  } catch (const UsageError& error) {
    std::cerr << "recship_golden_check: " << error.what() << "\n" << kUsage;
    return kExitUsage;
  } catch (const std::exception& error) {
    std::cerr << "recship_golden_check: " << first_line(error) << "\n";
    return kExitUsage;
  }
}
