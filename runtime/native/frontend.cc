// recship-frontend: the native gRPC front end of `recship serve --front-end native`.
//
// It listens on the inference port and answers `recship.v1.Recommender` calls by batches: each
// call's request bytes wait in their method's queue; whenever a serving process (a backend, on
// its Unix socket) has fewer than --max-inflight batches running, up to --max-batch-calls
// queued calls of one method go to it in one `recship.v1.BatchPlane/Run`, and each call is
// answered with its own outcome. Under load the batches grow by themselves (the calls that
// arrive while the backends are busy); a lone call is sent at once. The front end never
// parses a request: validation, version choice and errors stay the serving processes' own.
// With --max-delay-ms a batch that is not full waits for more calls until its oldest call has
// waited that long (as TorchServe's max_batch_delay), but only while more calls are due: while
// the front end holds (queued or at the backends) fewer calls of that method than the most it
// held within the last second or two, the clients of the others are about to send again. A
// lone client, whose one call is all there is, never waits; 0 sends a batch as soon as a
// worker is free.
//
// - Health (`grpc.health.v1.Health/Check`) asks every backend and answers SERVING only when
//   all do (NOT_SERVING while one is down or draining); other methods are UNIMPLEMENTED here.
// - A call whose deadline passes in the queue is answered DEADLINE_EXCEEDED without being
//   sent, and one its client cancels there is dropped (calls already sent run); a full queue
//   (--max-queue-calls) answers RESOURCE_EXHAUSTED at once; a backend that fails or dies
//   answers its batch's calls UNAVAILABLE (never a hang), and the next batches go to the
//   others (its channel reconnects when it is back).
// - SIGTERM or SIGINT: no new calls, the calls in flight finish within --grace-s, exit 0.
//   End of its stdin (the supervisor is gone, however it died) does the same.
// - Once listening it prints one line, "recship-frontend listening on PORT", to stdout, then
//   every --stats-interval-s one line "stats key=value ..." of its counters (`Stats`), which
//   the supervisor turns into metrics.
//
// Threads: gRPC's callback threads run everything; one mutex guards the queues and counts;
// the main thread waits for a stop signal and prints the stats.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "recship/v1/batch_plane.grpc.pb.h"

namespace {

using Clock = std::chrono::system_clock;
using Steady = std::chrono::steady_clock;

// The Recommender methods answered by batches, in the order of their queues.
const char* const kBatchedMethods[] = {
    "/recship.v1.Recommender/Retrieve",
    "/recship.v1.Recommender/Rank",
    "/recship.v1.Recommender/Recommend",
};
constexpr int kMethodCount = 3;
const char kHealthCheck[] = "/grpc.health.v1.Health/Check";
// grpc.health.v1.HealthCheckResponse{status: NOT_SERVING}, encoded (field 1, varint 2).
const char kNotServing[] = "\x08\x02";

struct Options {
  std::string listen;
  std::vector<std::string> backends;
  size_t max_batch_calls = 64;
  size_t max_batch_bytes = 8 * 1024 * 1024;
  int max_inflight = 1;
  size_t max_queue_calls = 4096;
  double max_delay_s = 0.0;  // how long a queued call may wait for its batch to fill
  int max_receive_bytes = 9 * 1024 * 1024;
  int max_send_bytes = 64 * 1024 * 1024;
  double grace_s = 10.0;
  double stats_interval_s = 1.0;
  std::string tls_cert, tls_key, tls_client_ca;
};

// What the front end counts, printed as one "stats" line (totals since it started).
struct Stats {
  uint64_t batches = 0;          // batches sent
  uint64_t batched_calls = 0;    // calls sent in them
  uint64_t queue_full = 0;       // calls refused RESOURCE_EXHAUSTED
  uint64_t expired = 0;          // calls whose deadline passed in the queue
  uint64_t cancelled = 0;        // calls cancelled in the queue
  uint64_t failed_batches = 0;   // batches a backend did not answer (calls UNAVAILABLE)
};

[[noreturn]] void Usage(const std::string& problem) {
  std::cerr << "recship-frontend: " << problem << "\n"
            << "usage: recship-frontend --listen HOST:PORT --backend unix:PATH [--backend ...]\n"
            << "  [--max-batch-calls N] [--max-batch-bytes N] [--max-inflight N]\n"
            << "  [--max-queue-calls N] [--max-delay-ms MS]\n"
            << "  [--max-receive-bytes N] [--max-send-bytes N] [--grace-s S]\n"
            << "  [--stats-interval-s S]\n"
            << "  [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]\n";
  std::exit(2);
}

long Number(const std::string& flag, const std::string& text, long low) {
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < low) {
    Usage(flag + ": expected an integer >= " + std::to_string(low) + ", got '" + text + "'");
  }
  return value;
}

Options ParseOptions(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; i += 2) {
    std::string flag = argv[i];
    if (i + 1 >= argc) Usage(flag + " needs a value");
    std::string value = argv[i + 1];
    if (flag == "--listen") {
      options.listen = value;
    } else if (flag == "--backend") {
      options.backends.push_back(value);
    } else if (flag == "--max-batch-calls") {
      options.max_batch_calls = Number(flag, value, 1);
    } else if (flag == "--max-batch-bytes") {
      options.max_batch_bytes = Number(flag, value, 1);
    } else if (flag == "--max-inflight") {
      options.max_inflight = static_cast<int>(Number(flag, value, 1));
    } else if (flag == "--max-delay-ms") {
      options.max_delay_s = std::atof(value.c_str()) / 1000.0;
      if (options.max_delay_s < 0) Usage("--max-delay-ms must be >= 0");
    } else if (flag == "--max-queue-calls") {
      options.max_queue_calls = Number(flag, value, 1);
    } else if (flag == "--max-receive-bytes") {
      options.max_receive_bytes = static_cast<int>(Number(flag, value, 1));
    } else if (flag == "--max-send-bytes") {
      options.max_send_bytes = static_cast<int>(Number(flag, value, 1));
    } else if (flag == "--grace-s") {
      options.grace_s = std::atof(value.c_str());
    } else if (flag == "--stats-interval-s") {
      options.stats_interval_s = std::atof(value.c_str());
      if (options.stats_interval_s <= 0) Usage("--stats-interval-s must be > 0");
    } else if (flag == "--tls-cert") {
      options.tls_cert = value;
    } else if (flag == "--tls-key") {
      options.tls_key = value;
    } else if (flag == "--tls-client-ca") {
      options.tls_client_ca = value;
    } else {
      Usage("unknown option " + flag);
    }
  }
  if (options.listen.empty()) Usage("--listen is required");
  if (options.backends.empty()) Usage("at least one --backend is required");
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    Usage("--tls-cert and --tls-key go together");
  }
  return options;
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) Usage("cannot read " + path);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const grpc::Slice& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

grpc::ByteBuffer Wrap(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

class FrontEnd;

// One client call: reads its one request, is queued, then answered once.
class CallReactor : public grpc::ServerGenericBidiReactor {
 public:
  CallReactor(FrontEnd* front_end, grpc::GenericCallbackServerContext* context)
      : front_end_(front_end), context_(context) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override;
  void OnDone() override { delete this; }
  // The client left or the deadline passed: a call still queued is dropped, not sent.
  void OnCancel() override { cancelled = true; }

  // Answers the call: `response` when `status` is OK.
  void Answer(const grpc::Status& status, const std::string& response = std::string()) {
    if (status.ok()) {
      response_ = Wrap(response);
      StartWriteAndFinish(&response_, grpc::WriteOptions(), status);
    } else {
      Finish(status);
    }
  }

  grpc::GenericCallbackServerContext* context() const { return context_; }
  std::string request_bytes;
  uint64_t sequence = 0;  // arrival order across the queues
  std::chrono::steady_clock::time_point arrived;
  std::atomic<bool> cancelled{false};

 private:
  FrontEnd* front_end_;
  grpc::GenericCallbackServerContext* context_;
  grpc::ByteBuffer request_, response_;
};

// A serving process: its channel, stubs, and how many batches it is running.
struct Backend {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<recship::v1::BatchPlane::Stub> stub;
  std::unique_ptr<grpc::GenericStub> generic;
  int inflight = 0;
};

// The most calls held at once lately: the peak of the current one-second window and of the one
// before it, so that the estimate follows a falling load within two seconds.
class ConcurrencyPeak {
 public:
  void Observe(size_t held, Steady::time_point now) {
    Roll(now);
    current_ = std::max(current_, held);
  }
  size_t Recent(Steady::time_point now) {
    Roll(now);
    return std::max(current_, previous_);
  }

 private:
  static constexpr std::chrono::seconds kWindow{1};
  void Roll(Steady::time_point now) {
    if (now - started_ < kWindow) return;
    previous_ = now - started_ < 2 * kWindow ? current_ : 0;
    current_ = 0;
    started_ = now;
  }
  Steady::time_point started_{};
  size_t current_ = 0, previous_ = 0;
};

// One batch on its way to a backend.
struct Flight {
  Backend* backend = nullptr;
  int method = 0;  // index in kBatchedMethods
  std::vector<CallReactor*> calls;
  grpc::ClientContext context;
  recship::v1::CallBatch request;
  recship::v1::OutcomeBatch response;
};

// One health check fanned out to every backend.
struct HealthFan {
  CallReactor* call = nullptr;
  std::mutex mutex;
  size_t left = 0;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<grpc::ByteBuffer> responses;
  std::vector<grpc::Status> statuses;
  grpc::ByteBuffer request;
};

class FrontEnd : public grpc::CallbackGenericService {
 public:
  explicit FrontEnd(const Options& options)
      : options_(options),
        fill_wait_(std::chrono::duration_cast<Steady::duration>(
            std::chrono::duration<double>(options.max_delay_s))) {
    grpc::ChannelArguments arguments;
    arguments.SetMaxReceiveMessageSize(options.max_send_bytes);
    arguments.SetMaxSendMessageSize(-1);
    for (const std::string& address : options.backends) {
      auto backend = std::make_unique<Backend>();
      backend->address = address;
      backend->channel = grpc::CreateCustomChannel(
          address, grpc::InsecureChannelCredentials(), arguments);
      backend->stub = recship::v1::BatchPlane::NewStub(backend->channel);
      backend->generic = std::make_unique<grpc::GenericStub>(backend->channel);
      backends_.push_back(std::move(backend));
    }
  }

  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    return new CallReactor(this, context);
  }

  void Route(CallReactor* call) {
    const std::string& method = call->context()->method();
    for (int m = 0; m < kMethodCount; ++m) {
      if (method == kBatchedMethods[m]) return Enqueue(call, m);
    }
    if (method == kHealthCheck) return CheckHealth(call);
    call->Answer(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                              "method " + method + " is not served by the native front end"));
  }

  // The "stats" line: the counters and the calls queued now.
  std::string StatsLine() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::ostringstream line;
    line << "stats queued=" << queued_ << " batches=" << stats_.batches
         << " batched_calls=" << stats_.batched_calls << " queue_full=" << stats_.queue_full
         << " expired=" << stats_.expired << " cancelled=" << stats_.cancelled
         << " failed_batches=" << stats_.failed_batches;
    return line.str();
  }

  void StopAccepting() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      draining_ = true;
    }
    Pump();  // what waits for its batch to fill goes now
  }

  // Ends FlushLoop.
  void StopFlushing() {
    std::lock_guard<std::mutex> lock(mutex_);
    flusher_stop_ = true;
    flush_cv_.notify_one();
  }

  // Sends the batches whose fill wait (--max-delay-ms) ends; runs on its own thread.
  void FlushLoop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!flusher_stop_) {
      if (flush_at_ == Steady::time_point::max()) {
        flush_cv_.wait(lock);
      } else {
        flush_cv_.wait_until(lock, flush_at_);
      }
      if (Steady::now() >= flush_at_) {
        flush_at_ = Steady::time_point::max();
        lock.unlock();
        Pump();
        lock.lock();
      }
    }
  }

 private:
  void Enqueue(CallReactor* call, int method) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (queued_ >= options_.max_queue_calls) {
        ++stats_.queue_full;  // answered below, outside the lock
      } else {
        call->sequence = ++arrivals_;
        call->arrived = std::chrono::steady_clock::now();
        queues_[method].push_back(call);
        ++queued_;
        peaks_[method].Observe(queues_[method].size() + sent_calls_[method], call->arrived);
        call = nullptr;
      }
    }
    if (call != nullptr) {
      call->Answer(grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          "the server's queue is full (" + std::to_string(options_.max_queue_calls) +
              " calls waiting); retry with backoff"));
      return;
    }
    Pump();
  }

  // The backend for the next batch: READY before connecting before failing, then the least
  // busy; none when every backend runs --max-inflight batches.
  Backend* PickBackend() {
    Backend* best = nullptr;
    int best_rank = 0;
    for (const auto& backend : backends_) {
      if (backend->inflight >= options_.max_inflight) continue;
      grpc_connectivity_state state = backend->channel->GetState(true);
      int health = state == GRPC_CHANNEL_READY ? 0
                   : state == GRPC_CHANNEL_TRANSIENT_FAILURE || state == GRPC_CHANNEL_SHUTDOWN
                       ? 2
                       : 1;
      int rank = health * 1024 + backend->inflight;
      if (best == nullptr || rank < best_rank) {
        best = backend.get();
        best_rank = rank;
      }
    }
    return best;
  }

  // The method whose queue holds the oldest call (queues are FIFO; -1: all empty).
  int OldestQueue() {
    int oldest = -1;
    for (int m = 0; m < kMethodCount; ++m) {
      if (queues_[m].empty()) continue;
      if (oldest < 0 || queues_[m].front()->sequence < queues_[oldest].front()->sequence) {
        oldest = m;
      }
    }
    return oldest;
  }

  // Sends batches while there are queued calls and backends with room.
  void Pump() {
    std::vector<Flight*> ready;
    std::vector<std::pair<CallReactor*, grpc::Status>> refused;  // answered outside the lock
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (queued_ > 0) {
        Backend* backend = PickBackend();
        if (backend == nullptr) break;
        int method = OldestQueue();
        std::deque<CallReactor*>& queue = queues_[method];
        // A batch not yet full waits for more calls until its oldest call's fill wait ends,
        // while more are due (fewer of its method held than lately).
        Steady::time_point now_steady = Steady::now();
        Steady::time_point fill_until = queue.front()->arrived + fill_wait_;
        if (!draining_ && queue.size() < options_.max_batch_calls && now_steady < fill_until &&
            queue.size() + sent_calls_[method] < peaks_[method].Recent(now_steady)) {
          if (fill_until < flush_at_) {
            flush_at_ = fill_until;
            flush_cv_.notify_one();
          }
          break;
        }
        auto* flight = new Flight();
        flight->backend = backend;
        flight->request.set_method(kBatchedMethods[method]);
        Clock::time_point now = Clock::now();
        Clock::time_point latest = now;
        bool unbounded = false;
        size_t bytes = 0;
        while (!queue.empty() && flight->calls.size() < options_.max_batch_calls) {
          CallReactor* call = queue.front();
          // A batch holds at most --max-batch-bytes of requests, but always one call.
          bytes += call->request_bytes.size();
          if (!flight->calls.empty() && bytes > options_.max_batch_bytes) break;
          queue.pop_front();
          --queued_;
          Clock::time_point deadline = call->context()->deadline();
          if (deadline <= now) {
            ++stats_.expired;
            refused.emplace_back(call, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                                    "the deadline passed while the call was "
                                                    "queued"));
            continue;
          }
          if (call->cancelled) {
            ++stats_.cancelled;
            refused.emplace_back(
                call, grpc::Status(grpc::StatusCode::CANCELLED, "cancelled while queued"));
            continue;
          }
          recship::v1::Call* sent = flight->request.add_calls();
          sent->set_request(std::move(call->request_bytes));
          sent->set_peer(call->context()->peer());
          if (deadline == Clock::time_point::max()) {
            unbounded = true;
          } else {
            sent->set_timeout_s(std::chrono::duration<double>(deadline - now).count());
            latest = std::max(latest, deadline);
          }
          flight->calls.push_back(call);
        }
        if (flight->calls.empty()) {
          delete flight;
          continue;
        }
        if (!unbounded) flight->context.set_deadline(latest + std::chrono::seconds(1));
        ++backend->inflight;
        flight->method = method;
        sent_calls_[method] += flight->calls.size();
        ++stats_.batches;
        stats_.batched_calls += flight->calls.size();
        ready.push_back(flight);
      }
    }
    for (auto& [call, status] : refused) call->Answer(status);
    for (Flight* flight : ready) {
      flight->backend->stub->async()->Run(
          &flight->context, &flight->request, &flight->response,
          [this, flight](grpc::Status status) { Landed(flight, status); });
    }
  }

  void Landed(Flight* flight, const grpc::Status& status) {
    const auto& outcomes = flight->response.outcomes();
    bool answered = status.ok() && static_cast<size_t>(outcomes.size()) == flight->calls.size();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --flight->backend->inflight;
      sent_calls_[flight->method] -= flight->calls.size();
      if (!answered) ++stats_.failed_batches;
    }
    // The next batch goes out before this one's calls are answered: the worker starts on it
    // while the answers are sent (at concurrency 64 its idle gap between batches fell from
    // 4.4 to 2.3 ms).
    Pump();
    if (answered) {
      for (size_t i = 0; i < flight->calls.size(); ++i) {
        const recship::v1::Outcome& outcome = outcomes[static_cast<int>(i)];
        if (outcome.code() == 0) {
          flight->calls[i]->Answer(grpc::Status::OK, outcome.response());
        } else {
          flight->calls[i]->Answer(grpc::Status(
              static_cast<grpc::StatusCode>(outcome.code()), outcome.message()));
        }
      }
    } else {
      // The process is gone or restarting: UNAVAILABLE (retry); anything else is a bug here.
      grpc::Status answer(grpc::StatusCode::UNAVAILABLE,
                          "the serving process did not answer (" + status.error_message() +
                              "); retry");
      grpc::StatusCode code = status.error_code();
      if (code == grpc::StatusCode::DEADLINE_EXCEEDED) {
        answer = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded");
      } else if (status.ok() || (code != grpc::StatusCode::UNAVAILABLE &&
                                 code != grpc::StatusCode::CANCELLED)) {
        std::cerr << "recship-frontend: " << flight->backend->address << " answered a batch of "
                  << flight->calls.size() << " calls with " << outcomes.size()
                  << " outcomes, status " << code << ": " << status.error_message() << "\n";
        answer = grpc::Status(grpc::StatusCode::INTERNAL, "internal error");
      }
      for (CallReactor* call : flight->calls) call->Answer(answer);
    }
    delete flight;
  }

  // SERVING only when every backend answers SERVING; NOT_SERVING when one cannot answer.
  void CheckHealth(CallReactor* call) {
    bool draining;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      draining = draining_;
    }
    if (draining) return call->Answer(grpc::Status::OK, std::string(kNotServing, 2));
    auto* fan = new HealthFan();
    fan->call = call;
    fan->left = backends_.size();
    fan->request = Wrap(call->request_bytes);
    fan->responses.resize(backends_.size());
    fan->statuses.resize(backends_.size());
    for (size_t i = 0; i < backends_.size(); ++i) {
      auto context = std::make_unique<grpc::ClientContext>();
      context->set_deadline(Clock::now() + std::chrono::seconds(2));
      fan->contexts.push_back(std::move(context));
    }
    for (size_t i = 0; i < backends_.size(); ++i) {
      backends_[i]->generic->UnaryCall(
          fan->contexts[i].get(), kHealthCheck, grpc::StubOptions(), &fan->request,
          &fan->responses[i], [fan, i](grpc::Status status) {
            bool last;
            {
              std::lock_guard<std::mutex> lock(fan->mutex);
              fan->statuses[i] = status;
              last = --fan->left == 0;
            }
            if (last) HealthLanded(fan);
          });
    }
  }

  static void HealthLanded(HealthFan* fan) {
    std::string agreed;
    bool serving = true;
    for (size_t i = 0; i < fan->statuses.size(); ++i) {
      const grpc::Status& status = fan->statuses[i];
      if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
        fan->call->Answer(status);
        delete fan;
        return;
      }
      std::string answer = status.ok() ? Flatten(fan->responses[i]) : "";
      if (!status.ok() || (i > 0 && answer != agreed)) serving = false;
      agreed = answer;
    }
    fan->call->Answer(grpc::Status::OK, serving ? agreed : std::string(kNotServing, 2));
    delete fan;
  }

  Options options_;
  Steady::duration fill_wait_;  // --max-delay-ms
  std::vector<std::unique_ptr<Backend>> backends_;
  std::mutex mutex_;
  std::deque<CallReactor*> queues_[kMethodCount];
  uint64_t arrivals_ = 0;
  size_t queued_ = 0;
  // Per method: its calls in batches at the backends, not yet answered, and the most it held.
  size_t sent_calls_[kMethodCount] = {};
  ConcurrencyPeak peaks_[kMethodCount];
  bool draining_ = false;
  Stats stats_;
  std::condition_variable flush_cv_;
  Steady::time_point flush_at_ = Steady::time_point::max();
  bool flusher_stop_ = false;
};

void CallReactor::OnReadDone(bool ok) {
  if (!ok) {
    Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request: no message received"));
    return;
  }
  request_bytes = Flatten(request_);
  request_.Clear();
  front_end_->Route(this);
}

std::shared_ptr<grpc::ServerCredentials> Credentials(const Options& options) {
  if (options.tls_cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(
      options.tls_client_ca.empty()
          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_key_cert_pairs.push_back({ReadFile(options.tls_key), ReadFile(options.tls_cert)});
  if (!options.tls_client_ca.empty()) ssl.pem_root_certs = ReadFile(options.tls_client_ca);
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

int main(int argc, char** argv) {
  Options options = ParseOptions(argc, argv);
  // Every thread (gRPC's too) inherits this mask: only sigwait below sees the stop signals.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  // A stats line to a supervisor that is gone must not kill us mid-drain.
  signal(SIGPIPE, SIG_IGN);
  // The supervisor holds our stdin open: when it closes, however the supervisor died, stop
  // as on SIGTERM (the signal goes to the process, where only sigwait below takes it).
  std::thread([] {
    char byte;
    while (read(0, &byte, 1) > 0) {
    }
    kill(getpid(), SIGTERM);
  }).detach();

  FrontEnd front_end(options);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, Credentials(options), &port);
  builder.SetMaxReceiveMessageSize(options.max_receive_bytes);
  builder.SetMaxSendMessageSize(options.max_send_bytes);
  builder.RegisterCallbackGenericService(&front_end);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  std::thread flusher([&front_end] { front_end.FlushLoop(); });
  if (server == nullptr || port == 0) {
    std::cerr << "recship-frontend: cannot listen on " << options.listen << "\n";
    return 1;
  }
  std::cout << "recship-frontend listening on " << port << std::endl;

  int signal_number = 0;
  timespec interval;
  interval.tv_sec = static_cast<time_t>(options.stats_interval_s);
  interval.tv_nsec = static_cast<long>((options.stats_interval_s - interval.tv_sec) * 1e9);
  while ((signal_number = sigtimedwait(&stop_signals, nullptr, &interval)) < 0) {
    std::cout << front_end.StatsLine() << std::endl;
  }
  std::cerr << "recship-frontend: signal " << signal_number << ", draining (grace "
            << options.grace_s << " s)\n";
  front_end.StopAccepting();
  server->Shutdown(Clock::now() + std::chrono::milliseconds(
                                      static_cast<long>(options.grace_s * 1000)));
  server->Wait();
  front_end.StopFlushing();
  flusher.join();
  return 0;
}
