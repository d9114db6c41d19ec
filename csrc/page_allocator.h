// Fixed-size page allocator with reference counts, shared by every model in the engine.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace sre {

class PageAllocator {
 public:
  // Throws std::invalid_argument unless num_pages is positive.
  explicit PageAllocator(int32_t num_pages);

  int32_t num_pages() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  // Page ids outside [0, num_pages) throw std::out_of_range here and in retain / release.
  int32_t refcount(int32_t page) const { return refcount_[index(page)]; }

  // All-or-nothing: appends `n` fresh pages (refcount 1) to `out`, or returns false untouched.
  // A negative `n` throws std::invalid_argument.
  bool allocate(int32_t n, std::vector<int32_t>& out);
  // Another holder of `page` (a shared prefix, a forked view).
  void retain(int32_t page);
  // Drops one reference; the page returns to the free list when none remain.
  void release(int32_t page);

 private:
  size_t index(int32_t page) const;

  std::vector<int32_t> free_;      // stack of free page ids
  std::vector<int32_t> refcount_;  // per page
};

}  // namespace sre
