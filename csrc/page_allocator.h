// Fixed-size page allocator with reference counts, shared by every model in the engine, and the
// prefix cache over it: a full page of KV can be published under the hash of the tokens that led
// to it, found again by that hash, and kept after its last holder lets go until the pool needs it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace sre {

class PageAllocator {
 public:
  // Throws std::invalid_argument unless num_pages is positive.
  explicit PageAllocator(int32_t num_pages);

  int32_t num_pages() const { return static_cast<int32_t>(refcount_.size()); }
  // Pages allocate() can hand out: never-used or freed ones, plus cached ones nobody holds.
  int32_t num_free() const { return static_cast<int32_t>(free_.size() + evictable_.size()); }
  // Cached pages nobody holds: reusable KV, evicted (least recently released first) on demand.
  int32_t num_cached() const { return static_cast<int32_t>(evictable_.size()); }
  // Page ids outside [0, num_pages) throw std::out_of_range here and in every call taking a page.
  int32_t refcount(int32_t page) const { return refcount_[index(page)]; }
  bool is_published(int32_t page) const { return published_[index(page)] != 0; }

  // All-or-nothing: appends `n` pages (refcount 1) to `out`, or returns false untouched. Free pages
  // go first, then cached pages nobody holds, which leave the cache. Negative `n`: invalid_argument.
  bool allocate(int32_t n, std::vector<int32_t>& out);
  // Another holder of `page` (a shared prefix, a forked view).
  void retain(int32_t page);
  // Drops one reference. With none left a published page stays cached (most recently released
  // last in line for eviction); any other page goes back to the free list.
  void release(int32_t page);

  // The page published under `hash`, with one more holder, or -1.
  int32_t lookup(uint64_t hash);
  // Publishes a held page whose KV is complete under `hash`; false (and nothing changes) when the
  // hash already names a page or this page is already published.
  bool publish(int32_t page, uint64_t hash);
  // Takes a held page out of the cache: its KV is about to be overwritten.
  void unpublish(int32_t page);
  // Throws std::logic_error when the free list, the cache and the reference counts disagree.
  void check_invariants() const;

 private:
  size_t index(int32_t page) const;
  void held_or_throw(int32_t page, const char* what) const;

  std::vector<int32_t> free_;      // stack of free page ids
  std::vector<int32_t> refcount_;  // per page
  std::unordered_map<uint64_t, int32_t> by_hash_;  // published pages
  std::vector<uint64_t> hash_;                     // per page, when published
  std::vector<uint8_t> published_;                 // per page
  std::list<int32_t> evictable_;                   // published, refcount 0; front: released longest ago
  std::vector<std::list<int32_t>::iterator> evictable_at_;  // per page, valid while in evictable_
};

}  // namespace sre
