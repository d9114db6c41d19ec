#include "page_allocator.h"

#include <stdexcept>
#include <string>

namespace sre {

PageAllocator::PageAllocator(int32_t num_pages) : refcount_(num_pages, 0) {
  if (num_pages <= 0) throw std::invalid_argument("PageAllocator: num_pages must be positive");
  free_.reserve(num_pages);
  // Pop order 0, 1, 2, ... so fresh pools hand out ascending ids (easier to read in traces).
  for (int32_t p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

bool PageAllocator::allocate(int32_t n, std::vector<int32_t>& out) {
  if (n < 0 || n > num_free()) return false;
  for (int32_t i = 0; i < n; ++i) {
    int32_t page = free_.back();
    free_.pop_back();
    refcount_[page] = 1;
    out.push_back(page);
  }
  return true;
}

void PageAllocator::retain(int32_t page) {
  if (refcount_.at(page) <= 0) throw std::logic_error("retain of free page " + std::to_string(page));
  ++refcount_[page];
}

void PageAllocator::release(int32_t page) {
  if (refcount_.at(page) <= 0) throw std::logic_error("release of free page " + std::to_string(page));
  if (--refcount_[page] == 0) free_.push_back(page);
}

}  // namespace sre
