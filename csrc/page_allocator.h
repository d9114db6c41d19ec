// Fixed-size page allocator with reference counts, shared by every model in the engine.
#pragma once
#include <cstdint>
#include <vector>

namespace sre {

class PageAllocator {
 public:
  explicit PageAllocator(int32_t num_pages);

  int32_t num_pages() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t refcount(int32_t page) const { return refcount_.at(page); }

  // All-or-nothing: appends `n` fresh pages (refcount 1) to `out`, or returns false untouched.
  bool allocate(int32_t n, std::vector<int32_t>& out);
  // Another holder of `page` (a shared prefix, a forked view).
  void retain(int32_t page);
  // Drops one reference; the page returns to the free list when none remain.
  void release(int32_t page);

 private:
  std::vector<int32_t> free_;      // stack of free page ids
  std::vector<int32_t> refcount_;  // per page
};

}  // namespace sre
