#include "page_allocator.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace sre {

PageAllocator::PageAllocator(int32_t num_pages) {
  if (num_pages <= 0)
    throw std::invalid_argument("PageAllocator: num_pages must be positive, got " + std::to_string(num_pages));
  refcount_.assign(num_pages, 0);
  hash_.assign(num_pages, 0);
  published_.assign(num_pages, 0);
  evictable_at_.resize(num_pages);
  free_.reserve(num_pages);
  // Pop order 0, 1, 2, ... so fresh pools hand out ascending ids (easier to read in traces).
  for (int32_t p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

size_t PageAllocator::index(int32_t page) const {
  if (page < 0 || page >= num_pages())
    throw std::out_of_range("page id " + std::to_string(page) + " is out of range for " +
                            std::to_string(num_pages()) + " pages");
  return static_cast<size_t>(page);
}

void PageAllocator::held_or_throw(int32_t page, const char* what) const {
  if (refcount_[index(page)] <= 0) throw std::logic_error(std::string(what) + " of free page " + std::to_string(page));
}

bool PageAllocator::allocate(int32_t n, std::vector<int32_t>& out) {
  if (n < 0) throw std::invalid_argument("allocate: negative page count " + std::to_string(n));
  if (n > num_free()) return false;
  for (int32_t i = 0; i < n; ++i) {
    int32_t page;
    if (!free_.empty()) {
      page = free_.back();
      free_.pop_back();
    } else {  // evict the cached page released longest ago
      page = evictable_.front();
      evictable_.pop_front();
      by_hash_.erase(hash_[page]);
      published_[page] = 0;
    }
    refcount_[page] = 1;
    out.push_back(page);
  }
  return true;
}

void PageAllocator::retain(int32_t page) {
  held_or_throw(page, "retain");
  int32_t& count = refcount_[page];
  if (count == std::numeric_limits<int32_t>::max())
    throw std::overflow_error("retain: page " + std::to_string(page) + " has too many holders");
  ++count;
}

void PageAllocator::release(int32_t page) {
  held_or_throw(page, "release");
  if (--refcount_[page] > 0) return;
  if (published_[page])
    evictable_at_[page] = evictable_.insert(evictable_.end(), page);
  else
    free_.push_back(page);
}

int32_t PageAllocator::lookup(uint64_t hash) {
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return -1;
  const int32_t page = it->second;
  if (refcount_[page] == 0) evictable_.erase(evictable_at_[page]);
  ++refcount_[page];
  return page;
}

bool PageAllocator::publish(int32_t page, uint64_t hash) {
  held_or_throw(page, "publish");
  if (published_[page] || !by_hash_.emplace(hash, page).second) return false;
  hash_[page] = hash;
  published_[page] = 1;
  return true;
}

void PageAllocator::unpublish(int32_t page) {
  held_or_throw(page, "unpublish");
  if (!published_[page]) return;
  by_hash_.erase(hash_[page]);
  published_[page] = 0;
}

void PageAllocator::check_invariants() const {
  std::vector<uint8_t> on_free(refcount_.size(), 0);
  for (int32_t page : free_) {
    if (refcount_[page] != 0 || published_[page] || on_free[page])
      throw std::logic_error("free list holds page " + std::to_string(page) + " that is held, cached or listed twice");
    on_free[page] = 1;
  }
  size_t idle_published = 0;
  for (int32_t p = 0; p < num_pages(); ++p) {
    if (published_[p]) {
      auto it = by_hash_.find(hash_[p]);
      if (it == by_hash_.end() || it->second != p)
        throw std::logic_error("published page " + std::to_string(p) + " is not found by its hash");
      idle_published += refcount_[p] == 0;
    } else if (refcount_[p] == 0 && !on_free[p]) {
      throw std::logic_error("page " + std::to_string(p) + " is neither held, cached nor free");
    }
  }
  if (by_hash_.size() != static_cast<size_t>(std::count(published_.begin(), published_.end(), uint8_t{1})))
    throw std::logic_error("prefix cache names pages that are not published");
  if (idle_published != evictable_.size()) throw std::logic_error("evictable list disagrees with the cache");
  for (int32_t page : evictable_)
    if (refcount_[page] != 0 || !published_[page])
      throw std::logic_error("evictable page " + std::to_string(page) + " is held or not cached");
}

}  // namespace sre
