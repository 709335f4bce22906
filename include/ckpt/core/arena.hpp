// ckpt — a chunked bump-pointer arena with marks, for the small trivially destructible records
// that tape entries keep (expression trees, operand references, label arrays).
#pragma once
#include "ckpt/config.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

namespace ckpt {

class arena {
 public:
  struct mark {
    std::size_t chunk = 0;
    std::size_t offset = 0;
  };

  explicit arena(std::size_t chunk_bytes = 64 * 1024) : chunk_bytes_(std::max<std::size_t>(chunk_bytes, 64)) {}
  arena(const arena&) = delete;
  arena& operator=(const arena&) = delete;

  /// Copies `value` into the arena. Nothing with a destructor may live here: rolling back
  /// the arena runs no destructors.
  template <class V>
  V* make(const V& value) {
    static_assert(std::is_trivially_destructible_v<V>,
                  "ckpt::arena holds only trivially destructible records");
    return ::new (allocate(sizeof(V), alignof(V))) V(value);
  }

  template <class V>
  V* make_array(std::size_t n) {
    static_assert(std::is_trivially_destructible_v<V>, "ckpt::arena holds only trivially destructible records");
    V* p = static_cast<V*>(allocate(sizeof(V) * std::max<std::size_t>(n, 1), alignof(V)));
    for (std::size_t i = 0; i < n; ++i) ::new (p + i) V();
    return p;
  }

  void* allocate(std::size_t bytes, std::size_t align) {
    for (;;) {
      if (cur_ < chunks_.size()) {
        chunk& c = chunks_[cur_];
        std::size_t at = (off_ + align - 1) / align * align;
        if (at + bytes <= c.size) {
          off_ = at + bytes;
          return c.data.get() + at;
        }
        if (cur_ + 1 < chunks_.size() && chunks_[cur_ + 1].size >= bytes + align) {
          ++cur_;
          off_ = 0;
          continue;
        }
        if (cur_ + 1 < chunks_.size()) {  // the next chunk is too small for this record
          chunks_.insert(chunks_.begin() + static_cast<long>(cur_) + 1, new_chunk(bytes + align));
          ++cur_;
          off_ = 0;
          continue;
        }
      }
      chunks_.push_back(new_chunk(bytes + align));
      cur_ = chunks_.size() - 1;
      off_ = 0;
    }
  }

  mark position() const { return {cur_, off_}; }
  void reset_to(mark m) {
    cur_ = m.chunk;
    off_ = m.offset;
  }
  std::size_t chunk_count() const { return chunks_.size(); }

 private:
  struct chunk {
    std::unique_ptr<std::byte[]> data;
    std::size_t size = 0;
  };
  chunk new_chunk(std::size_t at_least) const {
    std::size_t size = std::max(chunk_bytes_, at_least);
    return chunk{std::unique_ptr<std::byte[]>(new std::byte[size]), size};
  }

  std::size_t chunk_bytes_;
  std::vector<chunk> chunks_;
  std::size_t cur_ = 0;
  std::size_t off_ = 0;
};

}  // namespace ckpt
