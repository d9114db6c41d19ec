#include "scheduler.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace sre {
namespace {

int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : config_(config), allocator_(config.num_pages) {
  if (config.page_tokens.empty()) throw std::invalid_argument("Scheduler: no models");
  if (config.max_num_seqs <= 0 || config.max_num_batched_tokens <= 0 || config.max_model_len <= 0)
    throw std::invalid_argument("Scheduler: max_num_seqs, max_num_batched_tokens and max_model_len must be positive");
  const int32_t seqs = config.max_num_seqs;
  const int32_t tokens = config.max_num_batched_tokens;
  for (int32_t page_tokens : config.page_tokens) {
    if (page_tokens <= 0) throw std::invalid_argument("Scheduler: page_tokens must be positive");
    const int32_t width = ceil_div(config.max_model_len, page_tokens);
    // One request of max_model_len must fit alone, or preemption could never make progress.
    if (config.num_pages < width)
      throw std::invalid_argument("Scheduler: " + std::to_string(config.num_pages) + " pages of " +
                                  std::to_string(page_tokens) + " tokens cannot hold max_model_len " +
                                  std::to_string(config.max_model_len));
    max_pages_per_seq_.push_back(width);
    BatchBuffers b;
    b.input_ids.assign(tokens, 0);
    b.positions.assign(tokens, 0);
    b.slot_mapping.assign(tokens, -1);
    b.query_start_loc.assign(seqs + 1, 0);
    b.seq_lens.assign(seqs, 0);
    b.block_tables.assign(static_cast<size_t>(seqs) * width, 0);
    b.logits_indices.assign(seqs, 0);
    b.seq_request_ids.assign(seqs, -1);
    b.sample_request_ids.assign(seqs, -1);
    buffers_.push_back(std::move(b));
  }
  plans_.resize(num_models());
  counts_.assign(static_cast<size_t>(num_models()) * kNumCountFields, 0);
  finished_ids_.assign(seqs, -1);
  finished_reasons_.assign(seqs, 0);
  running_.reserve(seqs);
}

void Scheduler::add_request(int64_t id, int32_t model, const std::vector<int32_t>& prompt,
                            int32_t max_tokens, const std::vector<int32_t>& stop_ids) {
  if (requests_.count(id)) throw std::invalid_argument("request id " + std::to_string(id) + " already exists");
  if (model < 0 || model >= num_models()) throw std::invalid_argument("model index out of range");
  if (prompt.empty()) throw std::invalid_argument("empty prompt");
  if (static_cast<int32_t>(prompt.size()) >= config_.max_model_len)
    throw std::invalid_argument("prompt of " + std::to_string(prompt.size()) +
                                " tokens leaves no room under max_model_len " +
                                std::to_string(config_.max_model_len));
  if (max_tokens < 1) throw std::invalid_argument("max_tokens must be at least 1");
  auto request = std::make_unique<Request>();
  request->id = id;
  request->model = model;
  request->max_tokens = max_tokens;
  request->stop_ids = stop_ids;
  request->views.resize(num_models());
  request->views[model].tokens = prompt;
  waiting_.push_back(request.get());
  requests_.emplace(id, std::move(request));
}

bool Scheduler::reserve_pages(View& view, int32_t model, int32_t num_tokens) {
  const int32_t need = ceil_div(num_tokens, config_.page_tokens[model]) -
                       static_cast<int32_t>(view.pages.size());
  return need <= 0 || allocator_.allocate(need, view.pages);
}

void Scheduler::release_views(Request* request) {
  for (View& view : request->views) {
    for (int32_t page : view.pages) allocator_.release(page);
    view.pages.clear();
    view.num_computed = 0;
  }
}

void Scheduler::preempt(Request* request) {
  // Recompute later: the tokens stay, the KV goes.
  release_views(request);
  request->status = Status::kWaiting;
  waiting_.push_front(request);
  ++num_preemptions_;
}

void Scheduler::schedule() {
  std::vector<int32_t> budget(num_models(), config_.max_num_batched_tokens);
  for (auto& plan : plans_) plan.clear();

  // Running requests first, oldest first; make room by preempting the newest.
  bool preempted = false;
  for (size_t i = 0; i < running_.size();) {
    Request* r = running_[i];
    View& view = r->views[r->model];
    const int32_t pending = static_cast<int32_t>(view.tokens.size()) - view.num_computed;
    const int32_t count = std::min(pending, budget[r->model]);
    if (count == 0) {
      ++i;
      continue;
    }
    bool self_preempted = false;
    while (!reserve_pages(view, r->model, view.num_computed + count)) {
      Request* victim = running_.back();
      running_.pop_back();
      preempt(victim);
      preempted = true;
      if (victim == r) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    plans_[r->model].push_back({r, view.num_computed, count});
    view.num_computed += count;
    budget[r->model] -= count;
    ++i;
  }

  // Then admit waiting requests in arrival order while seats, pages and each model's budget last;
  // not in a step that had to preempt (the pages are short: admitting would only thrash).
  for (auto it = waiting_.begin();
       !preempted && it != waiting_.end() && static_cast<int32_t>(running_.size()) < config_.max_num_seqs;) {
    Request* r = *it;
    View& view = r->views[r->model];
    const int32_t pending = static_cast<int32_t>(view.tokens.size()) - view.num_computed;
    const int32_t count = std::min(pending, budget[r->model]);
    if (count == 0) {  // this model's batch is full; the other model's requests may still fit
      ++it;
      continue;
    }
    if (!reserve_pages(view, r->model, view.num_computed + count)) break;
    it = waiting_.erase(it);
    r->status = Status::kRunning;
    running_.push_back(r);
    plans_[r->model].push_back({r, view.num_computed, count});
    view.num_computed += count;
    budget[r->model] -= count;
  }

  for (int32_t m = 0; m < num_models(); ++m) fill(m, plans_[m]);
}

void Scheduler::fill(int32_t model, std::vector<Entry>& plan) {
  // Single-token entries first, so attention can treat them as one decode batch.
  auto decodes_end = std::stable_partition(plan.begin(), plan.end(), [](const Entry& e) { return e.count == 1; });
  BatchBuffers& b = buffers_[model];
  const int32_t page_tokens = config_.page_tokens[model];
  const int32_t stride = max_pages_per_seq_[model];
  int32_t width = 0;
  for (const Entry& e : plan) width = std::max(width, ceil_div(e.start + e.count, page_tokens));

  int32_t num_tokens = 0, num_samples = 0;
  for (size_t j = 0; j < plan.size(); ++j) {
    const Entry& e = plan[j];
    const View& view = e.request->views[model];
    const int32_t* pages = view.pages.data();
    b.query_start_loc[j] = num_tokens;
    std::memcpy(&b.input_ids[num_tokens], view.tokens.data() + e.start, sizeof(int32_t) * e.count);
    for (int32_t t = 0; t < e.count; ++t) {
      const int32_t pos = e.start + t;
      b.positions[num_tokens + t] = pos;
      b.slot_mapping[num_tokens + t] = pages[pos / page_tokens] * page_tokens + pos % page_tokens;
    }
    num_tokens += e.count;
    const int32_t seq_len = e.start + e.count;
    b.seq_lens[j] = seq_len;
    b.seq_request_ids[j] = e.request->id;
    int32_t* row = &b.block_tables[j * static_cast<size_t>(stride)];
    const int32_t used = ceil_div(seq_len, page_tokens);
    std::memcpy(row, pages, sizeof(int32_t) * used);
    std::fill(row + used, row + width, 0);
    if (seq_len == static_cast<int32_t>(view.tokens.size())) {
      b.logits_indices[num_samples] = num_tokens - 1;
      b.sample_request_ids[num_samples] = e.request->id;
      ++num_samples;
    }
  }
  b.query_start_loc[plan.size()] = num_tokens;
  int32_t* counts = &counts_[model * kNumCountFields];
  counts[kNumSeqs] = static_cast<int32_t>(plan.size());
  counts[kNumTokens] = num_tokens;
  counts[kNumDecodes] = static_cast<int32_t>(decodes_end - plan.begin());
  counts[kNumSamples] = num_samples;
  counts[kMaxPages] = width;
}

Request* Scheduler::lookup(int64_t id) {
  auto it = requests_.find(id);
  return it == requests_.end() ? nullptr : it->second.get();
}

int32_t Scheduler::update(int32_t model, const int32_t* sampled, int32_t num_sampled) {
  if (model < 0 || model >= num_models()) throw std::invalid_argument("update: model index out of range");
  const int32_t* counts = &counts_[model * kNumCountFields];
  if (num_sampled != counts[kNumSamples])
    throw std::invalid_argument("update: got " + std::to_string(num_sampled) + " tokens for " +
                                std::to_string(counts[kNumSamples]) + " sample rows");
  const BatchBuffers& b = buffers_[model];
  int32_t num_finished = 0;
  for (int32_t k = 0; k < num_sampled; ++k) {
    Request* r = lookup(b.sample_request_ids[k]);
    if (r == nullptr || r->status != Status::kRunning) continue;  // finished or aborted meanwhile
    View& view = r->views[model];
    const int32_t token = sampled[k];
    view.tokens.push_back(token);
    ++r->num_generated;
    FinishReason reason = FinishReason::kNone;
    if (std::find(r->stop_ids.begin(), r->stop_ids.end(), token) != r->stop_ids.end())
      reason = FinishReason::kStop;
    else if (r->num_generated >= r->max_tokens || static_cast<int32_t>(view.tokens.size()) >= config_.max_model_len)
      reason = FinishReason::kLength;
    if (reason != FinishReason::kNone) {
      release_views(r);
      r->status = Status::kFinished;
      finished_ids_[num_finished] = r->id;
      finished_reasons_[num_finished] = static_cast<int32_t>(reason);
      ++num_finished;
    }
  }
  if (num_finished > 0) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Request* r) { return r->status == Status::kFinished; }),
                   running_.end());
    for (int32_t k = 0; k < num_finished; ++k) requests_.erase(finished_ids_[k]);
  }
  return num_finished;
}

bool Scheduler::finish(int64_t id) {
  Request* r = lookup(id);
  if (r == nullptr) return false;
  release_views(r);
  if (r->status == Status::kRunning)
    running_.erase(std::find(running_.begin(), running_.end(), r));
  else
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
  requests_.erase(id);
  return true;
}

int32_t Scheduler::pages_held(int32_t model) const {
  int32_t total = 0;
  for (const auto& kv : requests_) total += static_cast<int32_t>(kv.second->views.at(model).pages.size());
  return total;
}

const Request& Scheduler::request(int64_t id) const {
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("unknown request id " + std::to_string(id));
  return *it->second;
}

void Scheduler::check_invariants() const {
  std::vector<int32_t> holders(allocator_.num_pages(), 0);
  int32_t held = 0;
  for (const auto& kv : requests_) {
    const Request& r = *kv.second;
    for (int32_t m = 0; m < num_models(); ++m) {
      const View& v = r.views[m];
      if (static_cast<int32_t>(v.pages.size()) < ceil_div(v.num_computed, config_.page_tokens[m]))
        throw std::logic_error("request " + std::to_string(r.id) + " computed tokens without pages");
      for (int32_t page : v.pages) {
        ++holders[page];
        ++held;
      }
    }
  }
  for (int32_t p = 0; p < allocator_.num_pages(); ++p)
    if (holders[p] != allocator_.refcount(p))
      throw std::logic_error("page " + std::to_string(p) + " held " + std::to_string(holders[p]) +
                             " times, refcount " + std::to_string(allocator_.refcount(p)));
  if (held + allocator_.num_free() != allocator_.num_pages())
    throw std::logic_error("pages leaked: held " + std::to_string(held) + " + free " +
                           std::to_string(allocator_.num_free()) + " != " + std::to_string(allocator_.num_pages()));
  if (static_cast<int32_t>(running_.size()) > config_.max_num_seqs) throw std::logic_error("too many running requests");
  if (running_.size() + waiting_.size() != requests_.size()) throw std::logic_error("request lost from the queues");
  for (const Request* r : running_)
    if (r->status != Status::kRunning) throw std::logic_error("running queue holds a non-running request");
  for (const Request* r : waiting_)
    if (r->status != Status::kWaiting) throw std::logic_error("waiting queue holds a non-waiting request");
}

}  // namespace sre
