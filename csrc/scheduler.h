// Plans every engine step for every model over one shared page pool.
//
// The scheduler owns requests, their per-model views (token stream + KV pages), the waiting and
// running queues, preemption, and the flat int32 arrays the model runner reads. Python hands it
// token ids and reads back arrays; nothing here knows about tensors or text.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_map>
#include <vector>

#include "page_allocator.h"

namespace sre {

enum class FinishReason : int32_t { kNone = 0, kStop = 1, kLength = 2 };
enum class Status : int32_t { kWaiting = 0, kRunning = 1, kFinished = 2 };

struct SchedulerConfig {
  int32_t num_pages = 0;
  int32_t max_num_seqs = 0;
  int32_t max_num_batched_tokens = 0;  // per model batch
  int32_t max_model_len = 0;
  std::vector<int32_t> page_tokens;  // tokens of each model that fit in one page
};

// One model's view of a request: the tokens it reads, and the KV pages of those it has computed.
struct View {
  std::vector<int32_t> tokens;
  int32_t num_computed = 0;
  std::vector<int32_t> pages;
};

struct Request {
  int64_t id = 0;
  int32_t model = 0;  // the model that generates this request's next token
  int32_t max_tokens = 0;
  int32_t num_generated = 0;
  std::vector<int32_t> stop_ids;
  std::vector<View> views;  // one per model
  Status status = Status::kWaiting;
};

// Per-model step arrays. Capacities are fixed at construction, so views handed to Python stay valid.
struct BatchBuffers {
  std::vector<int32_t> input_ids, positions, slot_mapping;  // [max_num_batched_tokens]
  std::vector<int32_t> query_start_loc;                     // [max_num_seqs + 1]
  std::vector<int32_t> seq_lens;                            // [max_num_seqs], context after this step
  std::vector<int32_t> block_tables;                        // [max_num_seqs, max_pages_per_seq]
  std::vector<int32_t> logits_indices;                      // [max_num_seqs], token rows to sample
  std::vector<int64_t> seq_request_ids;                     // [max_num_seqs]
  std::vector<int64_t> sample_request_ids;                  // [max_num_seqs]
};

// Layout of the per-model counts row written by schedule().
enum CountField : int32_t {
  kNumSeqs = 0,
  kNumTokens = 1,
  kNumDecodes = 2,  // the first kNumDecodes sequences have exactly one new token
  kNumSamples = 3,
  kMaxPages = 4,  // widest block-table row in this batch
  kNumCountFields = 5,
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  int32_t num_models() const { return static_cast<int32_t>(config_.page_tokens.size()); }
  int32_t max_pages_per_seq(int32_t model) const { return max_pages_per_seq_.at(model); }
  const SchedulerConfig& config() const { return config_; }

  // `stop_ids` end the request when sampled (the caller includes EOS unless it is ignored).
  void add_request(int64_t id, int32_t model, const std::vector<int32_t>& prompt, int32_t max_tokens,
                   const std::vector<int32_t>& stop_ids);
  // Plans one step and fills every model's buffers and counts row.
  void schedule();
  // Appends the tokens sampled for `model`'s batch (one per sample row); returns how many
  // requests finished, listed in finished_ids / finished_reasons.
  int32_t update(int32_t model, const int32_t* sampled, int32_t num_sampled);
  // Ends a request early (a stop string, an abort); frees its pages. False if unknown.
  bool finish(int64_t id);

  BatchBuffers& buffers(int32_t model) { return buffers_.at(model); }
  std::vector<int32_t>& counts() { return counts_; }
  std::vector<int64_t>& finished_ids() { return finished_ids_; }
  std::vector<int32_t>& finished_reasons() { return finished_reasons_; }

  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_free_pages() const { return allocator_.num_free(); }
  int32_t pages_held(int32_t model) const;
  int64_t num_preemptions() const { return num_preemptions_; }
  bool has_request(int64_t id) const { return requests_.count(id) != 0; }
  const Request& request(int64_t id) const;
  // Throws std::logic_error when page ownership or queue membership is inconsistent.
  void check_invariants() const;

 private:
  struct Entry {
    Request* request;
    int32_t start;  // first new token's position
    int32_t count;  // new tokens this step
  };

  bool reserve_pages(View& view, int32_t model, int32_t num_tokens);
  void preempt(Request* request);
  void release_views(Request* request);
  void fill(int32_t model, std::vector<Entry>& plan);
  Request* lookup(int64_t id);

  SchedulerConfig config_;
  std::vector<int32_t> max_pages_per_seq_;
  PageAllocator allocator_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;
  std::vector<std::vector<Entry>> plans_;
  std::vector<BatchBuffers> buffers_;
  std::vector<int32_t> counts_;
  std::vector<int64_t> finished_ids_;
  std::vector<int32_t> finished_reasons_;
  int64_t num_preemptions_ = 0;
};

}  // namespace sre
