// A caching CPU allocator whose resident memory follows the peak of the live tensors (sparsetrain.lean_allocator).
//
// Why: PyTorch's CPU tensors come from malloc. glibc keeps freed blocks below a threshold it raises by itself in its
// heap, fragmented between the blocks still alive, and unmaps the ones above it; the first costs resident memory (a
// sparse step frees each dense activation early, and its process's peak RSS then shows none of the saving), the
// second a page fault per 4 KiB each time a block is reused (ResNet-18 at batch 128: ~500k faults, a second of
// system time, per step, dense or sparse).
//
// Here every block of at least `min_size` bytes is anonymous memory of its own, kept after free in a cache and
// handed out again for a request of its size class. A request no cached block matches is *composed* of cached pages
// of other sizes: mremap moves their page-table entries into one new range, no copy and no page fault. So the cache
// is one pool of resident pages, whatever sizes freed them, and a step whose live total never passes its peak maps
// nothing new after warm-up. (Exact size classes alone needed 1.5x the live peak for SWAT's mix of sizes; bounded
// below that, the cache evicted what the same step needed next: 47 new mappings and ~11k faults, ~40 ms, per
// ResNet-20 step.) The cache is bounded so that live + cached stays within `1 + slack` times the largest live total
// seen: the process's RSS is the live peak, not a heap's high-water mark; older blocks are unmapped first when new
// pages would pass the bound. Smaller blocks go to c10's own aligned malloc. Every data pointer is 64-byte aligned
// and is its own context (the raw allocate/deallocate interface works). Without mremap (macOS) a request takes only
// its own size class.
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#define SPARSETRAIN_HAVE_MMAP 1
#endif

namespace {

#ifdef SPARSETRAIN_HAVE_MMAP

constexpr size_t kHeader = 64;  // before the data: a Header; keeps the data 64-byte aligned
constexpr uint64_t kMappedTag = 0x7370617273654d31ull, kHeapTag = 0x7370617273654831ull;
constexpr size_t kMaxPieces = 32;  // mappings one composed block may span (bounds the process's mapping count)
struct Header {
  uint64_t tag;
  size_t size;  // bytes mapped (kMappedTag) or allocated (kHeapTag), header included
};

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// Sizes within 1/16 of a power of two share a class (at most ~6 % padding), so a step's many activation-sized
// requests of one shape and its near neighbours reuse the same blocks. Classes are whole pages (mremap moves pages).
size_t size_class(size_t n) {
  const size_t need = n + kHeader;
  const size_t top = size_t(1) << (63 - __builtin_clzll(need));
  const size_t step = std::max<size_t>(page_size(), top / 16 / page_size() * page_size());
  return (need + step - 1) / step * step;
}

struct CachingAllocator final : c10::Allocator {
  struct Block {
    char* base;
    size_t size;
    std::vector<size_t> pieces;  // the lengths of the mappings it spans, in address order (one unless composed)
  };
  using Lru = std::list<Block>;

  std::mutex mu;
  Lru lru;  // cached blocks, least recently freed first
  std::map<size_t, std::vector<Lru::iterator>> by_size;  // ordered: a composition looks for the best fit
  std::unordered_map<char*, std::vector<size_t>> spans;  // live blocks made of more than one mapping
  size_t min_size = size_t(128) << 10;
  double slack = 1.0 / 16;
  size_t mapped = 0, cached = 0, live = 0, peak_live = 0;
  uint64_t hits = 0, composed = 0, moves = 0, misses = 0, unmapped = 0;

  static void del(void* data);

  void forget_size(Lru::iterator it) {
    auto f = by_size.find(it->size);
    auto& v = f->second;
    v.erase(std::find(v.begin(), v.end(), it));
    if (v.empty()) by_size.erase(f);
  }

  // Unmap a cached block that is in no by_size list (drop_locked: one that is).
  void unmap_locked(Lru::iterator it) {
    munmap(it->base, it->size);
    mapped -= it->size;
    cached -= it->size;
    ++unmapped;
    lru.erase(it);
  }

  void drop_locked(Lru::iterator it) {
    forget_size(it);
    unmap_locked(it);
  }

  // Fill [dst, dst + sz) with cached pages, moving them with mremap: the page-table entries change address,
  // nothing is copied or faulted. The smallest cached block that covers the rest gives its tail (usually one move;
  // its front stays cached under its new size), else the largest block gives what it has: few moves, few pieces.
  // Returns the bytes filled; `pieces` gets the lengths of the mappings used.
  size_t gather(char* dst, size_t sz, std::vector<size_t>& pieces) {
    size_t filled = 0;
    while (filled < sz && !by_size.empty() && pieces.size() + 1 < kMaxPieces) {
      auto f = by_size.lower_bound(sz - filled);
      if (f == by_size.end()) f = std::prev(by_size.end());
      auto it = f->second.back();
      forget_size(it);
      Block& b = *it;
      bool failed = false;
      while (filled < sz && !b.pieces.empty() && pieces.size() + 1 < kMaxPieces) {
        const size_t n = std::min(b.pieces.back(), sz - filled);
        char* src = b.base + b.size - n;
#ifdef MREMAP_FIXED
        if (mremap(src, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, dst + filled) == MAP_FAILED) {
          failed = true;
          break;
        }
#else
        failed = true;  // no mremap (macOS): the cache serves its own sizes only
        break;
#endif
        ++moves;
        pieces.push_back(n);
        filled += n;
        b.size -= n;
        cached -= n;
        if ((b.pieces.back() -= n) == 0) b.pieces.pop_back();
      }
      if (b.size == 0) {
        lru.erase(it);
      } else if (b.size < min_size) {
        // A remainder below the smallest request would only ever be a small piece of another block (a move of a
        // few pages costs about what faulting them does): unmapped now, it splits no later composition.
        unmap_locked(it);
      } else {
        by_size[b.size].push_back(it);  // what is left of it, cached under its new size
      }
      if (failed) break;  // map the rest
    }
    return filled;
  }

  // The cached block made of the most mappings (the oldest of those): the first to unmap when the bound needs room,
  // so the cache heals from a pattern that split it (a composition stops at kMaxPieces and maps the rest anew).
  Lru::iterator most_split() {
    auto best = lru.begin();
    for (auto it = lru.begin(); it != lru.end(); ++it)
      if (it->pieces.size() > best->pieces.size()) best = it;
    return best;
  }

  char* fresh(char* at, size_t n) {
    void* p = mmap(at, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED : 0), -1, 0);
    if (p == MAP_FAILED) return nullptr;
    // No MADV_HUGEPAGE: with blocks composed from cached pages almost nothing faults after warm-up, and with huge
    // pages a SWAT-U ResNet-20 step measured 1.42x dense after a ResNet-18 run in the same process, 1.21-1.23x with
    // THP disabled for the process (without the madvise: 1.21-1.39x, this VM's noise).
    mapped += n;
    return static_cast<char*>(p);
  }

  // A block of class `sz`: a cached one of that size (the most recently freed: its pages are the likeliest in the
  // CPU cache), else one composed of cached pages (no page faults), else new pages for what the cache lacks. The
  // bound: live + cached stays within (1 + slack) times the largest live total seen; the cached blocks split into the
  // most mappings are unmapped first to keep it (only new pages can pass it: a hit or a composition moves bytes from
  // cached to live).
  char* take(size_t sz) {
    std::lock_guard<std::mutex> g(mu);
    live += sz;
    peak_live = std::max(peak_live, live);
    if (auto f = by_size.find(sz); f != by_size.end()) {
      auto it = f->second.back();
      f->second.pop_back();
      if (f->second.empty()) by_size.erase(f);
      char* base = it->base;
      if (it->pieces.size() > 1) spans[base] = std::move(it->pieces);
      lru.erase(it);
      cached -= sz;
      ++hits;
      return base;
    }
    std::vector<size_t> pieces;
    char* base = nullptr;
    size_t filled = 0;
    if (!lru.empty()) {
      // Reserve the addresses first; the moves (and any new pages) replace the reservation piece by piece.
      void* r = mmap(nullptr, sz, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (r != MAP_FAILED) {
        base = static_cast<char*>(r);
        filled = gather(base, sz, pieces);
        if (filled < sz && pieces.size() + 1 >= kMaxPieces) {
          // The cache is split too finely for this request: its pages go back to the system and the block is
          // mapped whole (a new block appended to those pieces would only pass the splitting on).
          munmap(base, sz);
          mapped -= filled;
          unmapped += pieces.size();
          pieces.clear();
          filled = 0;
          base = nullptr;
        }
      }
    }
    const auto bound = static_cast<size_t>(static_cast<double>(peak_live) * (1.0 + slack));
    while (!lru.empty() && live + cached > bound) drop_locked(most_split());
    if (filled == sz) {
      ++composed;
    } else {
      ++misses;
      char* tail = fresh(base ? base + filled : nullptr, sz - filled);
      if (tail == nullptr) {
        while (!lru.empty()) drop_locked(lru.begin());  // the cache may be what stands in the system's way
        tail = fresh(base ? base + filled : nullptr, sz - filled);
      }
      if (tail == nullptr) {
        if (base) munmap(base, sz);
        mapped -= filled;
        live -= sz;
        return nullptr;
      }
      if (!base) base = tail;
      pieces.push_back(sz - filled);
    }
    if (pieces.size() > 1) spans[base] = std::move(pieces);
    return base;
  }

  c10::DataPtr allocate(size_t n) override {
    char* base = nullptr;
    size_t size = n + kHeader;
    uint64_t tag = kHeapTag;
    if (n < min_size) {
      base = static_cast<char*>(c10::alloc_cpu(size));
    } else {
      size = size_class(n);
      tag = kMappedTag;
      base = take(size);
      if (base == nullptr) {
        c10::profiledCPUMemoryReporter().OutOfMemory(n);
        TORCH_CHECK_WITH(OutOfMemoryError, false, "sparsetrain allocator: cannot map ", size, " bytes (out of memory)");
      }
    }
    auto* h = reinterpret_cast<Header*>(base);
    h->tag = tag;
    h->size = size;
    void* data = base + kHeader;
    c10::profiledCPUMemoryReporter().New(data, n);
    return {data, data, &CachingAllocator::del, c10::Device(c10::DeviceType::CPU)};
  }

  void give_back(char* base, size_t sz) {
    std::lock_guard<std::mutex> g(mu);
    std::vector<size_t> pieces;
    if (auto f = spans.find(base); f != spans.end()) {
      pieces = std::move(f->second);
      spans.erase(f);
    } else {
      pieces.push_back(sz);
    }
    auto it = lru.insert(lru.end(), Block{base, sz, std::move(pieces)});
    by_size[sz].push_back(it);
    cached += sz;
    live -= sz;
  }

  void release() {
    std::lock_guard<std::mutex> g(mu);
    while (!lru.empty()) drop_locked(lru.begin());
    peak_live = live;  // the bound restarts from what is live now
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingAllocator::del; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

// Never destroyed: tensors allocated here may be freed during interpreter shutdown, after static destructors.
CachingAllocator* const g_alloc = new CachingAllocator();

void CachingAllocator::del(void* data) {
  if (data == nullptr) return;
  c10::profiledCPUMemoryReporter().Delete(data);
  void* base = static_cast<char*>(data) - kHeader;
  const auto* h = static_cast<const Header*>(base);
  TORCH_INTERNAL_ASSERT(h->tag == kMappedTag || h->tag == kHeapTag, "sparsetrain allocator: foreign pointer freed");
  if (h->tag == kHeapTag) {
    c10::free_cpu(base);
  } else {
    g_alloc->give_back(static_cast<char*>(base), h->size);
  }
}

// A fork (DataLoader workers) while another thread holds the lock would leave the child's copy locked forever.
void lock_for_fork() { g_alloc->mu.lock(); }
void unlock_after_fork() { g_alloc->mu.unlock(); }

c10::Allocator* g_previous = nullptr;

bool install(int64_t min_size, double slack) {
  TORCH_CHECK(min_size >= 4096, "lean_allocator: min_size must be >= 4096 bytes");
  TORCH_CHECK(slack >= 0.0, "lean_allocator: slack must be >= 0");
  {
    std::lock_guard<std::mutex> g(g_alloc->mu);
    g_alloc->min_size = static_cast<size_t>(min_size);
    g_alloc->slack = slack;
  }
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current == g_alloc) return true;
  static const bool fork_handlers = pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork) == 0;
  (void)fork_handlers;
  c10::SetCPUAllocator(g_alloc, /*priority=*/0);
  if (c10::GetCPUAllocator() != g_alloc) return false;  // another allocator holds a higher priority
  g_previous = current;
  return true;
}

bool uninstall() {
  if (c10::GetCPUAllocator() != g_alloc || g_previous == nullptr) return false;
  c10::SetCPUAllocator(g_previous, /*priority=*/0);  // blocks still alive keep our deleter and return to the cache
  return true;
}

std::unordered_map<std::string, int64_t> stats() {
  std::lock_guard<std::mutex> g(g_alloc->mu);
  const auto& a = *g_alloc;
  return {{"mapped_bytes", int64_t(a.mapped)}, {"cached_bytes", int64_t(a.cached)},
          {"live_bytes", int64_t(a.live)}, {"peak_live_bytes", int64_t(a.peak_live)},
          {"hits", int64_t(a.hits)}, {"composed", int64_t(a.composed)},
          {"moves", int64_t(a.moves)}, {"misses", int64_t(a.misses)}, {"unmapped", int64_t(a.unmapped)}};
}

void empty_cache() { g_alloc->release(); }

#else  // no mmap (Windows): the Python side keeps the default allocator

bool install(int64_t, double) { return false; }
bool uninstall() { return false; }
std::unordered_map<std::string, int64_t> stats() { return {}; }
void empty_cache() {}

#endif

}  // namespace

void register_allocator(pybind11::module& m) {
  m.def("allocator_install", &install, "install the caching CPU allocator (min_size bytes, slack)");
  m.def("allocator_uninstall", &uninstall, "restore the allocator that was installed before");
  m.def("allocator_stats", &stats, "mapped / cached / live / peak-live bytes, hits, misses, unmapped blocks");
  m.def("allocator_empty_cache", &empty_cache, "unmap every cached block");
}
