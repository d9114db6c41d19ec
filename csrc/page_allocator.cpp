#include "page_allocator.h"

#include <limits>
#include <stdexcept>
#include <string>

namespace sre {

PageAllocator::PageAllocator(int32_t num_pages) {
  if (num_pages <= 0)
    throw std::invalid_argument("PageAllocator: num_pages must be positive, got " + std::to_string(num_pages));
  refcount_.assign(num_pages, 0);
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

bool PageAllocator::allocate(int32_t n, std::vector<int32_t>& out) {
  if (n < 0) throw std::invalid_argument("allocate: negative page count " + std::to_string(n));
  if (n > num_free()) return false;
  for (int32_t i = 0; i < n; ++i) {
    int32_t page = free_.back();
    free_.pop_back();
    refcount_[page] = 1;
    out.push_back(page);
  }
  return true;
}

void PageAllocator::retain(int32_t page) {
  int32_t& count = refcount_[index(page)];
  if (count <= 0) throw std::logic_error("retain of free page " + std::to_string(page));
  if (count == std::numeric_limits<int32_t>::max())
    throw std::overflow_error("retain: page " + std::to_string(page) + " has too many holders");
  ++count;
}

void PageAllocator::release(int32_t page) {
  int32_t& count = refcount_[index(page)];
  if (count <= 0) throw std::logic_error("release of free page " + std::to_string(page));
  if (--count == 0) free_.push_back(page);
}

}  // namespace sre
