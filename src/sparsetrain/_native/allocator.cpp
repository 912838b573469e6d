// A caching CPU allocator whose resident memory follows the peak of the live tensors (sparsetrain.lean_allocator).
//
// Why: PyTorch's CPU tensors come from malloc. glibc keeps freed blocks below a threshold it raises by itself in its
// heap, fragmented between the blocks still alive, and unmaps the ones above it; the first costs resident memory (a
// sparse step frees each dense activation early, and its process's peak RSS then shows none of the saving), the
// second a page fault per 4 KiB each time a block is reused (ResNet-18 at batch 128: ~500k faults, a second of
// system time, per step, dense or sparse). Here every block of at least `min_size` bytes is its own anonymous
// mapping, kept after free in a cache keyed by its rounded size and handed out again for a request of that size
// class or one down to 0.8x of it (a training step repeats its sizes, so after the first step few blocks fault). The cache is bounded so that live + cached stays within `1 + slack` times the largest live total seen so
// far: the process's RSS is the live peak, not the heap's high-water mark. Older cached blocks are unmapped first
// when a new mapping would pass that bound. Smaller blocks go to c10's own aligned malloc. Every data pointer is
// 64-byte aligned and is its own context (the raw allocate/deallocate interface works). Measured trade-offs (looser
// bounds, fits up to 2x) are in docs/performance.md.
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
#define SPARSETRAIN_HAVE_MMAP 1
#endif

namespace {

#ifdef SPARSETRAIN_HAVE_MMAP

constexpr size_t kHeader = 64;  // before the data: a Header; keeps the data 64-byte aligned
constexpr uint64_t kMappedTag = 0x7370617273654d31ull, kHeapTag = 0x7370617273654831ull;
struct Header {
  uint64_t tag;
  size_t size;     // bytes mapped (kMappedTag) or allocated (kHeapTag), header included
  size_t charged;  // the request's size class: what counts as live (a larger cached block's tail is released)
};

// Sizes within 1/16 of a power of two share a class (at most ~6 % padding), so a step's many activation-sized
// requests of one shape and its near neighbours reuse the same blocks.
size_t size_class(size_t n) {
  const size_t need = n + kHeader;
  const size_t top = size_t(1) << (63 - __builtin_clzll(need));
  const size_t step = std::max<size_t>(4096, top / 16);
  return (need + step - 1) / step * step;
}

struct CachingAllocator final : c10::Allocator {
  struct Block {
    void* base;
    size_t size;
  };
  using Lru = std::list<Block>;

  std::mutex mu;
  Lru lru;  // cached blocks, least recently freed first
  std::map<size_t, std::vector<Lru::iterator>> by_size;  // ordered: a request may take a larger cached block
  size_t min_size = size_t(128) << 10;
  double slack = 1.0 / 16;
  size_t mapped = 0, cached = 0, live = 0, peak_live = 0;  // live: the charged size classes of blocks in use
  uint64_t hits = 0, misses = 0, unmapped = 0;

  static void del(void* data);

  void drop_locked(Lru::iterator it) {
    auto& v = by_size[it->size];
    v.erase(std::find(v.begin(), v.end(), it));
    munmap(it->base, it->size);
    mapped -= it->size;
    cached -= it->size;
    ++unmapped;
    lru.erase(it);
  }

  // A cached block for a request of class `sz`: the smallest cached class from `sz` up to 1.25x it. Mapping a new
  // block while a larger one sits in the cache would fault its pages in and push older blocks out; the larger
  // block's tail beyond `sz` is released instead (allocate()), so resident memory grows by no more than `sz`.
  // The bound: live + cached (cached blocks counted whole, an upper bound of their resident pages) stays within
  // (1 + slack) times the largest live total seen; older cached blocks are unmapped first to keep it.
  void* take(size_t sz, size_t* got) {
    std::lock_guard<std::mutex> g(mu);
    live += sz;
    peak_live = std::max(peak_live, live);
    for (auto f = by_size.lower_bound(sz); f != by_size.end() && f->first <= sz + sz / 4; ++f) {
      if (f->second.empty()) continue;
      auto it = f->second.back();  // the most recently freed of its size: its pages are the likeliest in cache
      f->second.pop_back();
      void* base = it->base;
      *got = it->size;
      lru.erase(it);
      cached -= *got;
      ++hits;
      return base;
    }
    *got = sz;
    ++misses;
    const auto bound = static_cast<size_t>(static_cast<double>(peak_live) * (1.0 + slack));
    while (!lru.empty() && live + cached > bound) drop_locked(lru.begin());
    mapped += sz;  // reserved before the mapping exists, so concurrent misses see it; undone if mmap fails
    return nullptr;
  }

  void* map(size_t sz) {
    void* base = mmap(nullptr, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
      release();  // the cache may be what stands between this request and the system's limit
      base = mmap(nullptr, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (base == MAP_FAILED) {
      std::lock_guard<std::mutex> g(mu);
      mapped -= sz;
      live -= sz;
      return nullptr;
    }
#ifdef MADV_HUGEPAGE
    // One fault per 2 MiB instead of 512 where transparent huge pages are opt-in (madvise mode).
    if (sz >= (size_t(2) << 20)) madvise(base, sz, MADV_HUGEPAGE);
#endif
    return base;
  }

  c10::DataPtr allocate(size_t n) override {
    void* base = nullptr;
    if (n < min_size) {
      base = c10::alloc_cpu(n + kHeader);
      auto* h = static_cast<Header*>(base);
      h->tag = kHeapTag;
      h->size = n + kHeader;
    } else {
      const size_t sz = size_class(n);
      size_t got = sz;
      base = take(sz, &got);
      if (base == nullptr) base = map(sz);
      if (base == nullptr) {
        c10::profiledCPUMemoryReporter().OutOfMemory(n);
        TORCH_CHECK_WITH(OutOfMemoryError, false, "sparsetrain allocator: cannot map ", sz, " bytes (out of memory)");
      }
      // A larger cached block: its pages past this request go back to the system (they fault in again, zeroed,
      // only if a later request needs them). Classes are multiples of 4 KiB, so the tail is page-aligned.
      if (got > sz) madvise(static_cast<char*>(base) + sz, got - sz, MADV_DONTNEED);
      auto* h = static_cast<Header*>(base);
      h->tag = kMappedTag;
      h->size = got;
      h->charged = sz;
    }
    void* data = static_cast<char*>(base) + kHeader;
    c10::profiledCPUMemoryReporter().New(data, n);
    return {data, data, &CachingAllocator::del, c10::Device(c10::DeviceType::CPU)};
  }

  void give_back(void* base, size_t sz, size_t charged) {
    std::lock_guard<std::mutex> g(mu);
    auto it = lru.insert(lru.end(), Block{base, sz});
    by_size[sz].push_back(it);
    cached += sz;
    live -= charged;
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
    g_alloc->give_back(base, h->size, h->charged);
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
          {"hits", int64_t(a.hits)}, {"misses", int64_t(a.misses)}, {"unmapped", int64_t(a.unmapped)}};
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
