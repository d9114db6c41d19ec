#include "scheduler.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace sre {
namespace {

// For a >= 0, b > 0; (a + b - 1) / b would overflow near INT32_MAX.
int32_t ceil_div(int32_t a, int32_t b) { return a / b + (a % b != 0); }

void check_tokens(const std::vector<int32_t>& tokens, const char* what) {
  for (int32_t t : tokens)
    if (t < 0) throw std::invalid_argument(std::string(what) + ": negative token id " + std::to_string(t));
}

void check_run(int32_t run, const char* what) {
  if (run < 0 || run > 2)
    throw std::invalid_argument(std::string(what) + ": bad run state " + std::to_string(run) +
                                " (0 idle, 1 foreground, 2 background)");
}

// splitmix64's finalizer: a bijection on 64 bits that spreads every input bit.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The key of the view's next full page (the one after its keyed pages): that page's tokens
// chained onto the key of the page before it (or, for the first page, onto the model), so equal
// keys mean equal models and equal token prefixes, up to 64-bit collisions (about n^2 / 2^65 for
// n cached pages). The page's tokens must be in the view.
uint64_t next_page_key(const View& view, int32_t page_tokens, int32_t model) {
  const size_t k = view.page_hashes.size();
  uint64_t h = mix(k == 0 ? mix(0x5eedull + static_cast<uint64_t>(model)) : view.page_hashes[k - 1]);
  const int32_t* tokens = view.tokens.data() + k * page_tokens;
  for (int32_t i = 0; i < page_tokens; ++i) h = mix(h ^ static_cast<uint32_t>(tokens[i]));
  return h;
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : allocated_at_(static_cast<size_t>(std::max(config.num_pages, 0)), -1), config_(config),
      allocator_(config.num_pages) {
  if (config.page_tokens.empty()) throw std::invalid_argument("Scheduler: no models");
  if (num_models() > kMaxModels)
    throw std::invalid_argument("Scheduler: " + std::to_string(num_models()) + " models, at most " +
                                std::to_string(kMaxModels));
  if (config.max_num_seqs <= 0 || config.max_num_batched_tokens <= 0 || config.max_model_len <= 0)
    throw std::invalid_argument("Scheduler: max_num_seqs, max_num_batched_tokens and max_model_len must be positive");
  const int32_t seqs = config.max_num_seqs;
  const int32_t tokens = config.max_num_batched_tokens;
  int64_t one_request = 0;
  for (int32_t page_tokens : config.page_tokens) {
    if (page_tokens <= 0) throw std::invalid_argument("Scheduler: page_tokens must be positive");
    // slot_mapping holds page * page_tokens + offset as int32.
    if (int64_t{config.num_pages} * page_tokens > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("Scheduler: " + std::to_string(config.num_pages) + " pages of " +
                                  std::to_string(page_tokens) + " tokens have more slots than int32 can address");
    const int32_t width = ceil_div(config.max_model_len, page_tokens);
    one_request += width;
    max_pages_per_seq_.push_back(width);
    BatchBuffers b;
    b.input_ids.assign(tokens, 0);
    b.positions.assign(tokens, 0);
    b.slot_mapping.assign(tokens, -1);
    b.query_start_loc.assign(static_cast<size_t>(seqs) + 1, 0);
    b.seq_lens.assign(seqs, 0);
    b.block_tables.assign(static_cast<size_t>(seqs) * width, 0);
    b.logits_indices.assign(std::max(seqs, tokens), 0);
    b.seq_request_ids.assign(seqs, -1);
    b.sample_request_ids.assign(std::max(seqs, tokens), -1);
    buffers_.push_back(std::move(b));
  }
  // One request with every view at max_model_len must fit alone, or preemption could stall.
  if (config.num_pages < one_request)
    throw std::invalid_argument("Scheduler: " + std::to_string(config.num_pages) +
                                " pages cannot hold one request of max_model_len " +
                                std::to_string(config.max_model_len) + " in every model's view (needs " +
                                std::to_string(one_request) + ")");
  plans_.resize(num_models());
  counts_.assign(static_cast<size_t>(num_models()) * kNumCountFields, 0);
  running_.reserve(seqs);
}

void Scheduler::add_request(int64_t id, const std::vector<std::vector<int32_t>>& views,
                            const std::vector<int32_t>& runs, bool reads_cache, int64_t copy_from) {
  if (id < 0) throw std::invalid_argument("add_request: negative request id " + std::to_string(id));
  if (requests_.count(id)) throw std::invalid_argument("request id " + std::to_string(id) + " already exists");
  if (views.size() != config_.page_tokens.size() || runs.size() != config_.page_tokens.size())
    throw std::invalid_argument("add_request: " + std::to_string(views.size()) + " views and " +
                                std::to_string(runs.size()) + " run states for " + std::to_string(num_models()) +
                                " models (need one of each per model)");
  auto request = std::make_unique<Request>();
  request->id = id;
  request->views.resize(num_models());
  bool runnable = false;
  for (int32_t m = 0; m < num_models(); ++m) {
    if (static_cast<int32_t>(views[m].size()) >= config_.max_model_len)
      throw std::invalid_argument("prompt of " + std::to_string(views[m].size()) +
                                  " tokens leaves no room under max_model_len " +
                                  std::to_string(config_.max_model_len));
    check_tokens(views[m], "add_request");
    check_run(runs[m], "add_request");
    request->views[m].tokens = views[m];
    request->views[m].run = static_cast<Run>(runs[m]);
    request->views[m].reads_cache = reads_cache;
    runnable |= request->views[m].run == Run::kForeground && !views[m].empty();
  }
  if (!runnable) throw std::invalid_argument("add_request: no foreground view has tokens");
  request->copy_from = copy_from;
  waiting_.push_back(request.get());
  requests_.emplace(id, std::move(request));
}

size_t Scheduler::check_model(int32_t model) const {
  if (model < 0 || model >= num_models())
    throw std::out_of_range("model index " + std::to_string(model) + " is out of range for " +
                            std::to_string(num_models()) + " models");
  return static_cast<size_t>(model);
}

const View& Scheduler::view(int64_t id, int32_t model) const {
  const size_t m = check_model(model);
  return request(id).views[m];
}

void Scheduler::append(int64_t id, int32_t model, const std::vector<int32_t>& tokens) {
  View& view = view_of(id, model);
  check_tokens(tokens, "append");
  if (view.tokens.size() + tokens.size() > static_cast<size_t>(config_.max_model_len))
    throw std::invalid_argument("append: view would exceed max_model_len " + std::to_string(config_.max_model_len));
  view.tokens.insert(view.tokens.end(), tokens.begin(), tokens.end());
}

void Scheduler::append_placeholder(int64_t id, int32_t model) {
  View& view = view_of(id, model);
  if (view.tokens.size() + 1 > static_cast<size_t>(config_.max_model_len))
    throw std::invalid_argument("append_placeholder: view would exceed max_model_len " +
                                std::to_string(config_.max_model_len));
  view.tokens.push_back(kPlaceholder);
}

void Scheduler::set_last_token(int64_t id, int32_t model, int32_t token) {
  View& view = view_of(id, model);
  check_tokens({token}, "set_last_token");
  if (view.tokens.empty() || view.tokens.back() != kPlaceholder)
    throw std::invalid_argument("set_last_token: the view does not end with a placeholder");
  view.tokens.back() = token;
  // Only the page holding the last token can have been keyed with the placeholder in it (a page is
  // keyed once full and computed, and no page follows it). Decode pages are never shared, so the
  // page is this view's alone: take its old key out of the cache and key it again.
  const int32_t page_tokens = config_.page_tokens[model];
  const size_t page = (view.tokens.size() - 1) / page_tokens;
  if (view.page_hashes.size() == page + 1) {
    if (allocator_.is_published(view.pages[page])) allocator_.unpublish(view.pages[page]);
    view.page_hashes.pop_back();
    publish_full_pages(view, model, view.num_computed);
  }
}

void Scheduler::truncate(int64_t id, int32_t model, int32_t num_tokens) {
  View& view = view_of(id, model);
  if (num_tokens < 0 || num_tokens > static_cast<int32_t>(view.tokens.size()))
    throw std::invalid_argument("truncate: " + std::to_string(num_tokens) + " is not within the view's " +
                                std::to_string(view.tokens.size()) + " tokens");
  const int32_t page_tokens = config_.page_tokens[model];
  view.tokens.resize(num_tokens);
  view.num_computed = std::min(view.num_computed, num_tokens);
  const size_t full = view.num_computed / page_tokens;
  release_pages_from(view, ceil_div(view.num_computed, page_tokens));
  view.page_hashes.resize(std::min(full, view.page_hashes.size()));
  // The last page is now partial and will be written again. If others hold it too, this view
  // recomputes its part of that page in a page of its own; otherwise it keeps the page, which
  // leaves the cache. Holders are counted, not inferred from publication: a page stays shared
  // after a failed request takes it out of the cache (finish with cache=false).
  if (full < view.pages.size()) {
    if (allocator_.refcount(view.pages[full]) > 1) {
      release_pages_from(view, full);
      view.num_computed = static_cast<int32_t>(full) * page_tokens;
    } else {
      allocator_.unpublish(view.pages[full]);
    }
  }
}

void Scheduler::release_pages_from(View& view, size_t first) {
  // Last page first: of a released chain, the cache evicts the tail before the head.
  for (size_t k = view.pages.size(); k > first; --k) allocator_.release(view.pages[k - 1]);
  view.pages.resize(std::min(first, view.pages.size()));
}

void Scheduler::publish_full_pages(View& view, int32_t model, int32_t num_tokens) {
  const int32_t page_tokens = config_.page_tokens[model];
  const size_t full = num_tokens / page_tokens;
  while (view.page_hashes.size() < full) {
    const size_t k = view.page_hashes.size();
    const uint64_t hash = next_page_key(view, page_tokens, model);
    allocator_.publish(view.pages[k], hash);  // false: another request computes the same page
    view.page_hashes.push_back(hash);
  }
}

void Scheduler::share_pages(Entry& e, View& view, int32_t model) {
  const int32_t page_tokens = config_.page_tokens[model];
  // Full pages an earlier entry of this batch computes (published just now) replace this entry's
  // fresh ones: the model stores every token's KV before any attention reads it. Two tokens stay,
  // so that the entry remains a prefill, and the whole sampled tail.
  const int32_t keep = std::max(2, view.sample_tail);
  while (view.reads_cache && e.count >= page_tokens + keep && e.start % page_tokens == 0 &&
         view.page_hashes.size() == static_cast<size_t>(e.start / page_tokens)) {
    const size_t k = e.start / page_tokens;
    const uint64_t hash = next_page_key(view, page_tokens, model);
    const int32_t page = allocator_.lookup(hash);
    if (page < 0) break;
    allocator_.release(view.pages[k]);  // reserved for this step, never written
    view.pages[k] = page;
    view.page_hashes.push_back(hash);
    e.start += page_tokens;
    e.count -= page_tokens;
    view.num_cached += page_tokens;
  }
  // Then this entry's own full pages become findable, for later entries and later steps. A step
  // that fails takes them out again (finish with cache=false).
  publish_full_pages(view, model, e.start + e.count);
}

void Scheduler::attach_cached(View& view, int32_t model, const View* source) {
  const int32_t page_tokens = config_.page_tokens[model];
  const size_t full = view.num_computed / page_tokens;
  if (!config_.prefix_caching || !view.reads_cache || view.num_computed % page_tokens != 0 ||
      view.pages.size() != full || view.page_hashes.size() != full)
    return;
  // The sampled tail stays to compute: its logits are what the step is for.
  const int32_t limit = static_cast<int32_t>(view.tokens.size()) - view.sample_tail;
  while (view.num_computed + page_tokens <= limit) {
    const uint64_t hash = next_page_key(view, page_tokens, model);
    const int32_t page = allocator_.lookup(hash);
    if (page < 0) break;
    view.pages.push_back(page);
    view.page_hashes.push_back(hash);
    view.num_computed += page_tokens;
    view.num_cached += page_tokens;
  }
  // Then the source's partial page, when the source has computed this view's next tokens and
  // holds them in the same page: a fresh page of this view's own gets a copy of it.
  const size_t k = view.pages.size();
  if (source != nullptr && source->pages.size() > k && source->page_hashes.size() >= k &&
      allocated_at_[static_cast<size_t>(source->pages[k])] != schedules_ &&
      std::equal(view.page_hashes.begin(), view.page_hashes.end(), source->page_hashes.begin())) {
    const int32_t end = std::min({source->num_computed, limit, view.num_computed + page_tokens - 1});
    int32_t same = view.num_computed;
    while (same < end && source->tokens[same] == view.tokens[same]) ++same;
    std::vector<int32_t> fresh;
    if (same > view.num_computed && allocator_.allocate(1, fresh)) {
      allocated_at_[static_cast<size_t>(fresh[0])] = schedules_;
      page_copies_.insert(page_copies_.end(), {model, source->pages[k], fresh[0]});
      view.pages.push_back(fresh[0]);
      view.num_cached += same - view.num_computed;
      view.num_computed = same;
    }
  }
  view.peak_pages = std::max(view.peak_pages, static_cast<int32_t>(view.pages.size()));
}

void Scheduler::set_run(int64_t id, int32_t model, int32_t run) {
  check_run(run, "set_run");
  view_of(id, model).run = static_cast<Run>(run);
}

void Scheduler::set_sample_tail(int64_t id, int32_t model, int32_t num_tokens) {
  View& view = view_of(id, model);
  if (num_tokens < 1 || num_tokens > config_.max_num_batched_tokens)
    throw std::invalid_argument("set_sample_tail: " + std::to_string(num_tokens) + " is not within 1.." +
                                std::to_string(config_.max_num_batched_tokens) + " (the token budget)");
  view.sample_tail = num_tokens;
}

bool Scheduler::reserve_pages(View& view, int32_t model, int32_t num_tokens) {
  const int32_t need = ceil_div(num_tokens, config_.page_tokens[model]) -
                       static_cast<int32_t>(view.pages.size());
  if (need > 0 && !allocator_.allocate(need, view.pages)) return false;
  for (size_t i = view.pages.size() - static_cast<size_t>(std::max(need, 0)); i < view.pages.size(); ++i)
    allocated_at_[static_cast<size_t>(view.pages[i])] = schedules_;
  view.peak_pages = std::max(view.peak_pages, static_cast<int32_t>(view.pages.size()));
  return true;
}

void Scheduler::drop_view(View& view) {
  release_pages_from(view, 0);
  view.page_hashes.clear();
  view.num_computed = 0;
}

void Scheduler::release_views(Request* request) {
  for (View& view : request->views) drop_view(view);
}

void Scheduler::preempt(Request* request) {
  // Recompute later: the tokens stay, the KV goes.
  release_views(request);
  request->status = Status::kWaiting;
  waiting_.push_front(request);
  ++num_preemptions_;
}

void Scheduler::plan(Request* r, int32_t model, int32_t count, bool sample) {
  plans_[model].push_back({r, r->views[model].num_computed, count, sample});
  budget_[model] -= count;
}

void Scheduler::unplan(const Request* r) {
  for (int32_t m = 0; m < num_models(); ++m) {
    auto& plan = plans_[m];
    auto gone = std::stable_partition(plan.begin(), plan.end(), [r](const Entry& e) { return e.request != r; });
    for (auto it = gone; it != plan.end(); ++it) budget_[m] += it->count;  // its tokens go back to the step
    plan.erase(gone, plan.end());
  }
}

bool Scheduler::make_room(const Request* r) {
  // First the KV of views nobody is reading now (a big view during a small segment): it is
  // recomputed at the next handoff. Newest requests first.
  for (auto it = running_.rbegin(); it != running_.rend(); ++it)
    for (View& view : (*it)->views)
      if (view.run != Run::kForeground && !view.pages.empty()) {
        drop_view(view);
        ++num_view_drops_;
        return true;
      }
  // Then whole requests, newest first.
  Request* victim = running_.back();
  running_.pop_back();
  unplan(victim);
  preempt(victim);
  return victim != r;
}

bool Scheduler::plan_foreground(Request* r, bool may_evict) {
  for (int32_t m = 0; m < num_models(); ++m) {
    View& view = r->views[m];
    if (view.run != Run::kForeground || held(m)) continue;
    auto source = r->copy_from < 0 ? requests_.end() : requests_.find(r->copy_from);
    attach_cached(view, m, source == requests_.end() ? nullptr : &source->second->views[m]);
    const int32_t size = static_cast<int32_t>(view.tokens.size());
    const int32_t pending = size - view.num_computed;
    int32_t count = std::min(pending, budget_[m]);
    // A chunk that stops short of the end stops before the sampled tail: the tail runs whole.
    if (count < pending) count = std::min(count, size - view.sample_tail - view.num_computed);
    if (count <= 0) continue;
    while (!reserve_pages(view, m, view.num_computed + count)) {
      if (!may_evict || !make_room(r)) return false;
    }
    plan(r, m, count, view.num_computed + count == size);
  }
  return true;
}

void Scheduler::schedule(uint32_t held_models) {
  held_models_ = held_models;
  ++schedules_;
  budget_.assign(num_models(), config_.max_num_batched_tokens);
  for (auto& plan : plans_) plan.clear();

  // Running requests first, oldest first; make room by dropping idle views, then preempting.
  const int64_t preemptions_before = num_preemptions_;
  for (size_t i = 0; i < running_.size(); ++i)
    if (!plan_foreground(running_[i], /*may_evict=*/true)) break;  // it preempted itself
  const bool preempted = num_preemptions_ != preemptions_before;

  // Then admit waiting requests in arrival order while seats, pages and budget last; not in a
  // step that had to preempt (the pages are short: admitting would only thrash).
  for (auto it = waiting_.begin();
       !preempted && it != waiting_.end() && static_cast<int32_t>(running_.size()) < config_.max_num_seqs;) {
    Request* r = *it;
    bool fits = false;  // some foreground view has work its model's batch can take
    for (int32_t m = 0; m < num_models(); ++m) {
      const View& v = r->views[m];
      fits |= v.run == Run::kForeground && static_cast<int32_t>(v.tokens.size()) > v.num_computed && budget_[m] > 0 &&
              !held(m);
    }
    if (!fits) {  // this model's batch is full; the other model's requests may still fit
      ++it;
      continue;
    }
    if (!plan_foreground(r, /*may_evict=*/false)) {
      unplan(r);
      release_views(r);
      break;
    }
    it = waiting_.erase(it);
    r->status = Status::kRunning;
    r->copy_from = -1;  // copied once: after a preemption the request recomputes (the cache may help)
    running_.push_back(r);
    // Nothing unplans an admitted request, so the full pages this step computes for it can be
    // found already by the requests admitted after it (they then need less of the budget).
    if (config_.prefix_caching)
      for (int32_t m = 0; m < num_models(); ++m)
        if (!plans_[m].empty() && plans_[m].back().request == r)
          publish_full_pages(r->views[m], m, plans_[m].back().start + plans_[m].back().count);
  }

  // Background catch-up with whatever budget and pages are left; it never drops views or preempts.
  for (Request* r : running_)
    for (int32_t m = 0; m < num_models(); ++m) {
      View& view = r->views[m];
      if (view.run != Run::kBackground || held(m)) continue;
      attach_cached(view, m);
      const int32_t count = std::min(static_cast<int32_t>(view.tokens.size()) - view.num_computed, budget_[m]);
      if (count > 0 && reserve_pages(view, m, view.num_computed + count))
        plan(r, m, count, /*sample=*/false);
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
    Entry& e = plan[j];
    View& view = e.request->views[model];
    if (config_.prefix_caching) share_pages(e, view, model);
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
    view.num_computed = seq_len;
    view.num_processed += e.count;
    b.seq_lens[j] = seq_len;
    b.seq_request_ids[j] = e.request->id;
    int32_t* row = &b.block_tables[j * static_cast<size_t>(stride)];
    const int32_t used = ceil_div(seq_len, page_tokens);
    std::memcpy(row, pages, sizeof(int32_t) * used);
    std::fill(row + used, row + width, 0);
    if (e.sample)
      for (int32_t t = std::max(0, e.count - view.sample_tail); t < e.count; ++t) {
        b.logits_indices[num_samples] = num_tokens - e.count + t;
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

bool Scheduler::finish(int64_t id, bool cache) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return false;
  Request* r = it->second.get();
  if (!cache)
    for (const View& view : r->views)
      for (int32_t page : view.pages) allocator_.unpublish(page);
  release_views(r);
  if (r->status == Status::kRunning)
    running_.erase(std::find(running_.begin(), running_.end(), r));
  else
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
  requests_.erase(it);
  return true;
}

namespace {

bool ready(const View& v) {
  return v.run == Run::kForeground && static_cast<int32_t>(v.tokens.size()) > v.num_computed;
}

}  // namespace

int32_t Scheduler::ready_rows(int32_t model) const {
  check_model(model);
  int32_t rows = 0;
  for (const auto& kv : requests_) rows += ready(kv.second->views[model]);
  return rows;
}

std::vector<int64_t> Scheduler::ready_requests(int32_t model) const {
  check_model(model);
  std::vector<int64_t> ids;
  for (const auto& kv : requests_)
    if (ready(kv.second->views[model])) ids.push_back(kv.first);
  return ids;
}

int32_t Scheduler::pages_held(int32_t model) const {
  const size_t m = check_model(model);
  int32_t total = 0;
  for (const auto& kv : requests_) total += static_cast<int32_t>(kv.second->views[m].pages.size());
  return total;
}

const Request& Scheduler::request(int64_t id) const {
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("unknown request id " + std::to_string(id));
  return *it->second;
}

void Scheduler::check_invariants() const {
  allocator_.check_invariants();
  std::vector<int32_t> holders(allocator_.num_pages(), 0);
  int32_t held_pages = 0;
  for (const auto& kv : requests_) {
    const Request& r = *kv.second;
    for (int32_t m = 0; m < num_models(); ++m) {
      const View& v = r.views[m];
      if (static_cast<int32_t>(v.pages.size()) < ceil_div(v.num_computed, config_.page_tokens[m]))
        throw std::logic_error("request " + std::to_string(r.id) + " computed tokens without pages");
      if (v.num_computed > static_cast<int32_t>(v.tokens.size()))
        throw std::logic_error("request " + std::to_string(r.id) + " computed past its tokens");
      if (r.status == Status::kWaiting && !v.pages.empty())
        throw std::logic_error("waiting request " + std::to_string(r.id) + " holds pages");
      // A page this view will still write (partial, or past its computed tokens) is nobody else's:
      // neither cached nor held by another view.
      for (size_t k = v.num_computed / config_.page_tokens[m]; k < v.pages.size(); ++k)
        if (allocator_.is_published(v.pages[k]) || allocator_.refcount(v.pages[k]) != 1)
          throw std::logic_error("request " + std::to_string(r.id) + " will write into page " +
                                 std::to_string(v.pages[k]) + ", which is cached or shared");
      const size_t full = v.num_computed / config_.page_tokens[m];
      if (config_.prefix_caching ? v.page_hashes.size() != full : !v.page_hashes.empty())
        throw std::logic_error("request " + std::to_string(r.id) + " has " + std::to_string(v.page_hashes.size()) +
                               " page hashes for " + std::to_string(full) + " full computed pages");
      for (int32_t page : v.pages) held_pages += holders[page]++ == 0;  // shared pages count once
    }
  }
  for (int32_t p = 0; p < allocator_.num_pages(); ++p)
    if (holders[p] != allocator_.refcount(p))
      throw std::logic_error("page " + std::to_string(p) + " held " + std::to_string(holders[p]) +
                             " times, refcount " + std::to_string(allocator_.refcount(p)));
  if (held_pages + allocator_.num_free() != allocator_.num_pages())
    throw std::logic_error("pages leaked: held " + std::to_string(held_pages) + " + free " +
                           std::to_string(allocator_.num_free()) + " != " + std::to_string(allocator_.num_pages()));
  if (static_cast<int32_t>(running_.size()) > config_.max_num_seqs) throw std::logic_error("too many running requests");
  if (running_.size() + waiting_.size() != requests_.size()) throw std::logic_error("request lost from the queues");
  for (const Request* r : running_)
    if (r->status != Status::kRunning) throw std::logic_error("running queue holds a non-running request");
  for (const Request* r : waiting_)
    if (r->status != Status::kWaiting) throw std::logic_error("waiting queue holds a non-waiting request");
}

}  // namespace sre
