// Plans every engine step for every model over one shared page pool.
//
// The scheduler owns requests, their per-model views (token stream + KV pages), the waiting and
// running queues, page-pressure policy, and the flat int32 arrays the model runners read. Python
// decides what each view reads next (the SplitReason protocol needs text) and says so through
// append / truncate / set_run; nothing here knows about tensors or text.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "page_allocator.h"

namespace sre {

enum class Status : int32_t { kWaiting = 0, kRunning = 1 };

// How the planner treats a view.
enum class Run : int32_t {
  kIdle = 0,        // not scheduled; its KV may be dropped under page pressure
  kForeground = 1,  // scheduled first, sampled when its last token is computed
  kBackground = 2,  // catch-up with spare budget only; never sampled, never preempts; droppable
};

struct SchedulerConfig {
  int32_t num_pages = 0;
  int32_t max_num_seqs = 0;
  int32_t max_num_batched_tokens = 0;  // per model batch
  int32_t max_model_len = 0;
  std::vector<int32_t> page_tokens;  // tokens of each model that fit in one page
  // Full pages of KV are kept and shared across requests, keyed by a hash chain of their tokens.
  bool prefix_caching = false;
};

// One model's view of a request: the tokens it reads, and the KV pages of those it has computed.
struct View {
  std::vector<int32_t> tokens;
  int32_t num_computed = 0;
  std::vector<int32_t> pages;
  Run run = Run::kIdle;
  int32_t peak_pages = 0;
  int64_t num_processed = 0;  // tokens run through the model, recomputation included
  // Prefix caching: the chain hash of each leading full page of computed tokens, and the tokens
  // whose KV came from the cache instead of the model (counted again after a preemption).
  std::vector<uint64_t> page_hashes;
  int64_t num_cached = 0;
  // Tokens at the end of the view whose logits are sampled (1; more when the last tokens are
  // drafts the model verifies). The planner computes them in one chunk, and never from the cache.
  int32_t sample_tail = 1;
  // False: the view computes every token itself (its prompt's log-probabilities need each
  // position's logits), though its full pages still go into the cache for others.
  bool reads_cache = true;
};

struct Request {
  int64_t id = 0;
  std::vector<View> views;  // one per model
  Status status = Status::kWaiting;
  // A request with the same prompt whose partial last page this one copies at admission (one of
  // n samples): with its full pages from the prefix cache, only the sampled tail is computed.
  int64_t copy_from = -1;
};

// Per-model step arrays. Capacities are fixed at construction, so views handed to Python stay valid.
struct BatchBuffers {
  std::vector<int32_t> input_ids, positions, slot_mapping;  // [max_num_batched_tokens]
  std::vector<int32_t> query_start_loc;                     // [max_num_seqs + 1]
  std::vector<int32_t> seq_lens;                            // [max_num_seqs], context after this step
  std::vector<int32_t> block_tables;                        // [max_num_seqs, max_pages_per_seq]
  std::vector<int32_t> logits_indices;                      // [max_num_batched_tokens], token rows to sample
  std::vector<int64_t> seq_request_ids;                     // [max_num_seqs]
  std::vector<int64_t> sample_request_ids;                  // [max_num_batched_tokens], one per sampled row
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

// Arguments are checked, and a rejected call changes nothing: a bad value (a negative count or
// token id, a bad run state) throws std::invalid_argument, an unknown request id or a model
// index out of range std::out_of_range.
class Scheduler {
 public:
  static constexpr int32_t kMaxModels = 32;  // held_models is a 32-bit mask
  static constexpr int32_t kPlaceholder = -1;  // a token planned before it is sampled (never a real id)

  explicit Scheduler(const SchedulerConfig& config);

  int32_t num_models() const { return static_cast<int32_t>(config_.page_tokens.size()); }
  int32_t max_pages_per_seq(int32_t model) const { return max_pages_per_seq_[check_model(model)]; }
  const SchedulerConfig& config() const { return config_; }

  // `views[m]` is model m's initial token stream (empty if unused), `runs[m]` its Run. Ids are
  // non-negative (-1 marks an empty row in the step arrays).
  void add_request(int64_t id, const std::vector<std::vector<int32_t>>& views, const std::vector<int32_t>& runs,
                   bool reads_cache = true, int64_t copy_from = -1);
  // The page copies planned since the last call, which the caller makes before the step runs:
  // (model, source page, destination page) triples, flat (see Request::copy_from).
  std::vector<int32_t> take_page_copies() { return std::exchange(page_copies_, {}); }
  // Plans one step and fills every model's buffers and counts row. Models whose bit is set in
  // `held_models` do not run this step: their views keep their pages and their place, and wait
  // (the co-scheduling policy gathers big-model work this way).
  void schedule(uint32_t held_models = 0);
  // Requests (running or waiting) with a foreground view in `model` that has tokens to compute:
  // the rows that model would run if it ran now; ready_requests lists their ids.
  int32_t ready_rows(int32_t model) const;
  std::vector<int64_t> ready_requests(int32_t model) const;
  // Appends tokens to a view (a sampled token, another model's text, a catch-up chunk).
  void append(int64_t id, int32_t model, const std::vector<int32_t>& tokens);
  // Overlapped steps: the next step is planned before this step's sampled token reaches the host.
  // append_placeholder appends kPlaceholder (the runner patches the real id into the step's input
  // on the device); set_last_token puts the sampled id in its place once the host has it, and
  // re-keys the prefix-cache page that the placeholder completed, if any.
  void append_placeholder(int64_t id, int32_t model);
  void set_last_token(int64_t id, int32_t model, int32_t token);
  // Rollback: keeps the first `num_tokens` tokens of a view and frees KV pages past them.
  void truncate(int64_t id, int32_t model, int32_t num_tokens);
  void set_run(int64_t id, int32_t model, int32_t run);
  // How many of the view's last tokens are sampled when it is next computed (>= 1): a verify step
  // samples the last committed token and every draft after it.
  void set_sample_tail(int64_t id, int32_t model, int32_t num_tokens);
  // Ends a request (finished, stopped, aborted); frees its pages, which stay in the prefix cache
  // unless `cache` is false: a request that failed takes its pages out (its last step may not have
  // computed them). False if unknown.
  bool finish(int64_t id, bool cache = true);

  BatchBuffers& buffers(int32_t model) { return buffers_[check_model(model)]; }
  std::vector<int32_t>& counts() { return counts_; }

  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_free_pages() const { return allocator_.num_free(); }  // cached pages nobody holds included
  int32_t num_cached_pages() const { return allocator_.num_cached(); }
  int32_t pages_held(int32_t model) const;
  int64_t num_preemptions() const { return num_preemptions_; }
  int64_t num_view_drops() const { return num_view_drops_; }
  bool has_request(int64_t id) const { return requests_.count(id) != 0; }
  const Request& request(int64_t id) const;
  const View& view(int64_t id, int32_t model) const;
  // `model` as an index, or std::out_of_range.
  size_t check_model(int32_t model) const;
  // Throws std::logic_error when page ownership or queue membership is inconsistent.
  void check_invariants() const;

 private:
  struct Entry {
    Request* request;
    int32_t start;  // first new token's position
    int32_t count;  // new tokens this step
    bool sample;
  };

  bool reserve_pages(View& view, int32_t model, int32_t num_tokens);
  bool plan_foreground(Request* r, bool may_evict);
  bool held(int32_t model) const { return (held_models_ >> model) & 1u; }  // model < kMaxModels
  void plan(Request* r, int32_t model, int32_t count, bool sample);
  bool make_room(const Request* r);
  // Takes a request's entries out of this step's plans and gives their tokens back to the budget.
  void unplan(const Request* r);
  void drop_view(View& view);
  // Prefix caching: publishes the view's full pages of its first `num_tokens` tokens not yet
  // published; takes the cached pages that continue its computed prefix (always leaving one token
  // to compute); and, at fill time, swaps an entry's fresh pages for the pages an earlier entry of
  // the same batch computes.
  void publish_full_pages(View& view, int32_t model, int32_t num_tokens);
  void attach_cached(View& view, int32_t model, const View* source = nullptr);
  void share_pages(Entry& e, View& view, int32_t model);
  void release_pages_from(View& view, size_t first);
  void preempt(Request* request);
  void release_views(Request* request);
  void fill(int32_t model, std::vector<Entry>& plan);
  View& view_of(int64_t id, int32_t model) { return const_cast<View&>(view(id, model)); }

  std::vector<int32_t> page_copies_;
  // The schedule() call that last allocated each page: a page allocated in this one holds no KV
  // before this step runs (even when published already for same-step sharing), so it is no copy source.
  std::vector<int64_t> allocated_at_;
  int64_t schedules_ = 0;
  SchedulerConfig config_;
  std::vector<int32_t> max_pages_per_seq_;
  PageAllocator allocator_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;
  std::vector<std::vector<Entry>> plans_;
  uint32_t held_models_ = 0;  // the mask of the step being planned
  std::vector<int32_t> budget_;  // tokens each model's batch can still take in the step being planned
  std::vector<BatchBuffers> buffers_;
  std::vector<int32_t> counts_;
  int64_t num_preemptions_ = 0;
  int64_t num_view_drops_ = 0;
};

}  // namespace sre
