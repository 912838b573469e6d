// sparsetrain's native CPU kernels: the exact top-K selection of an activation in two streaming passes, and the
// 1-bit ReLU mask. Built on first use by sparsetrain/_native.py (torch.utils.cpp_extension); when no compiler is
// available the pure-PyTorch path computes the same results. Every function here is bit-identical to that path:
// tests/test_native.py compares them element for element (tests/test_compile.py the ReLU mask read in the other
// layout, against threshold_backward).
//
// Why native: in eager PyTorch the selection is ~15 ops per activation (magnitudes, a compare, a compaction, gathers,
// two selections), i.e. six passes over the activation plus dispatch; here it is two passes over chunks that fit in
// cache, spread over torch's intra-op threads (at::parallel_for), with no magnitude buffer.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per chunk: the partition is fixed, so results never depend on threads
// Fewer chunks than this run on the calling thread: waking the intra-op pool costs more than a small tensor's pass
// (a 37k-element weight took 5x longer on 2 threads than on 1).
constexpr int64_t kSerialChunks = 8;
constexpr int64_t kSerialElems = kSerialChunks * kChunk;  // the same rule for the elementwise kernels

template <typename T>
inline float mag(T v) { return std::fabs(static_cast<float>(v)); }

// The k-th largest of v (1-based k <= v.size()), by selection.
float kth_largest(std::vector<float>& v, int64_t k) {
  auto it = v.begin() + (static_cast<int64_t>(v.size()) - k);
  std::nth_element(v.begin(), it, v.end());
  return *it;
}

// The k-th largest of the band v, all inside [lo, hi]. A large band is first narrowed by a histogram of 1024
// equal-width bins: the bin index is a monotone function of the value (one expression, evaluated identically in
// both passes), so every value in a higher bin is larger than every value in a lower one, and the k-th largest is
// the right rank inside one bin. nth_element over the whole band was most of an activation's selection time.
float kth_largest_in_band(std::vector<float>& v, int64_t k, float lo, float hi) {
  constexpr int kBins = 1024;
  const int64_t m = static_cast<int64_t>(v.size());
  if (m < 4096) return kth_largest(v, k);
  if (!std::isfinite(hi)) {  // no bracket (a small tensor, or the sample missed): the band's own range
    const auto mm = std::minmax_element(v.begin(), v.end());
    lo = *mm.first;
    hi = *mm.second;
  }
  if (!(hi > lo) || !std::isfinite(hi) || !std::isfinite(lo)) return kth_largest(v, k);
  const float scale = static_cast<float>(kBins) / (hi - lo);
  if (!std::isfinite(scale)) return kth_largest(v, k);
  auto bin = [&](float a) { return std::min(kBins - 1, static_cast<int>((a - lo) * scale)); };
  std::vector<int64_t> hist(kBins, 0);
  for (float a : v) ++hist[bin(a)];
  int target = kBins - 1;
  int64_t above = 0;  // values in bins above target
  while (above + hist[target] < k) above += hist[target--];
  std::vector<float> in;
  in.reserve(hist[target]);
  for (float a : v)
    if (bin(a) == target) in.push_back(a);
  return kth_largest(in, k - above);
}

struct ChunkStats {
  int64_t above = 0;        // elements with |v| > hi
  std::vector<float> band;  // magnitudes in [lo, hi]
  bool nan = false;
};

// One chunk of pass A: count |v| > hi, note NaNs, write the magnitudes inside [lo, hi] to bp; returns how many.
// Branch-free (every magnitude is written, the slot advances only inside the band): a branch at the band's edges
// mispredicts on about one element in ten. float32 with AVX-512 takes 16 elements per step first; compaction by
// in-register compress and a masked store (the memory form of vcompressps is slow on some cores, e.g. AMD Zen 4).
// Same results either way: same compares, same order.
template <typename T>
int64_t scan_chunk(const T* x, int64_t b, int64_t e, float lo, float hi, float* bp, int64_t& above, bool& nan) {
  int64_t ab = 0, cnt = 0, i = b;
  int nn = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    for (; i + 16 <= e; i += 16) {
      const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
      ab += __builtin_popcount(_mm512_cmp_ps_mask(a, vhi, _CMP_GT_OQ));
      nn |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0;
      const __mmask16 in = _mm512_cmp_ps_mask(a, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, vhi, _CMP_LE_OQ);
      const int c = __builtin_popcount(in);
      _mm512_mask_storeu_ps(bp + cnt, static_cast<__mmask16>((1u << c) - 1u), _mm512_maskz_compress_ps(in, a));
      cnt += c;
    }
  }
#endif
  for (; i < e; ++i) {
    const float a = mag(x[i]);
    ab += a > hi;
    nn |= a != a;
    bp[cnt] = a;
    cnt += (a >= lo) & (a <= hi);
  }
  above = ab;
  nan = nn != 0;
  return cnt;
}

// One chunk of pass C: write position and value of every kept element from slot j on (at most end - j of them);
// float32 with int32 positions and AVX-512 takes 16 elements per step first, as in pass A.
template <typename T, typename I>
void compact_chunk(const T* x, int64_t b, int64_t e, float thr, bool strict, int64_t j, int64_t end, I* pos, T* val) {
  int64_t i = b;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<I, int32_t>) {
    const __m512 vt = _mm512_set1_ps(thr);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(b)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (; i + 16 <= e && j < end; i += 16, idx = _mm512_add_epi32(idx, step)) {
      const __m512 v = _mm512_loadu_ps(x + i);
      const __m512 a = _mm512_abs_ps(v);
      const __mmask16 keep = strict ? _mm512_cmp_ps_mask(a, vt, _CMP_GT_OQ) : _mm512_cmp_ps_mask(a, vt, _CMP_GE_OQ);
      const int c = __builtin_popcount(keep);
      const __mmask16 head = static_cast<__mmask16>((1u << c) - 1u);
      _mm512_mask_storeu_ps(val + j, head, _mm512_maskz_compress_ps(keep, v));
      _mm512_mask_storeu_epi32(pos + j, head, _mm512_maskz_compress_epi32(keep, idx));
      j += c;
    }
  }
#endif
  for (; i < e && j < end; ++i) {
    const float a = mag(x[i]);
    pos[j] = static_cast<I>(i);
    val[j] = x[i];
    j += strict ? a > thr : a >= thr;
  }
}

// Pass A over every chunk: count |v| > hi, collect the magnitudes inside [lo, hi].
template <typename T>
void scan(const T* x, int64_t n, float lo, float hi, std::vector<ChunkStats>& st) {
  const int64_t nchunks = static_cast<int64_t>(st.size());
  at::parallel_for(0, nchunks, kSerialChunks, [&](int64_t c0, int64_t c1) {
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(std::min(n, kChunk)) + 16]);  // (not zeroed)
    for (int64_t c = c0; c < c1; ++c) {
      ChunkStats& s = st[c];
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      const int64_t cnt = scan_chunk<T>(x, b, e, lo, hi, buf.get(), s.above, s.nan);
      s.band.assign(buf.get(), buf.get() + cnt);
    }
  });
}

// Pass C: write the positions (memory order) and values of the kept elements, each chunk at its offset; a chunk
// stops once its slots are full, so it never writes into the next chunk's.
template <typename T, typename I>
void compact(const T* x, int64_t n, float thr, bool strict, const std::vector<int64_t>& offset, I* pos, T* val) {
  const int64_t nchunks = static_cast<int64_t>(offset.size()) - 1;
  at::parallel_for(0, nchunks, kSerialChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      compact_chunk<T, I>(x, b, e, thr, strict, offset[c], offset[c + 1], pos, val);
    }
  });
}

template <typename T>
std::vector<torch::Tensor> select_impl(const torch::Tensor& flat, int64_t k, const torch::Tensor& sample,
                                       bool threshold_only) {
  const T* x = flat.data_ptr<T>();
  const int64_t n = flat.numel();
  const int64_t nchunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<ChunkStats> st(nchunks);

  // Bracket the k-th largest from a fixed sample: [lo, hi] holds it with overwhelming probability; whether it does
  // is checked from the counts below, so the result is exact either way (a miss widens the band to everything).
  // The sample: the caller's fixed random indices for large tensors; for small ones (weights) 1024 evenly strided
  // elements, where sorting out the whole tensor would cost more than the two passes.
  float lo = 0.0f, hi = INFINITY;
  const bool given = sample.numel() > 0 && n >= (int64_t)1 << 16;
  const int64_t m = given ? sample.numel() : (n >= 4096 ? 1024 : 0);
  if (m > 0) {
    std::vector<float> s(m);
    if (given) {
      const int64_t* idx = sample.data_ptr<int64_t>();
      for (int64_t i = 0; i < m; ++i) s[i] = mag(x[idx[i]]);
    } else {
      for (int64_t i = 0; i < m; ++i) s[i] = mag(x[i * n / m]);
    }
    const double q = 1.0 - static_cast<double>(k) / n;
    const double half = 6.0 * std::sqrt(std::max(q * (1 - q), 1.0 / m) / m) + 2.0 / m;
    const int64_t i_lo = std::max<int64_t>(0, static_cast<int64_t>(std::floor((q - half) * m)));
    const int64_t i_hi = std::min<int64_t>(m - 1, static_cast<int64_t>(std::ceil((q + half) * m)));
    std::nth_element(s.begin(), s.begin() + i_lo, s.end());
    lo = s[i_lo];
    std::nth_element(s.begin(), s.begin() + i_hi, s.end());
    hi = s[i_hi];
  }
  scan(x, n, lo, hi, st);
  int64_t above = 0, band = 0;
  bool nan = false;
  for (const auto& s : st) {
    above += s.above;
    band += static_cast<int64_t>(s.band.size());
    nan |= s.nan;
  }
  if (nan) return {};  // NaN magnitudes: the caller takes the PyTorch path, which defines their order
  if (above >= k || above + band < k) {  // the sample missed: the band becomes every element
    lo = 0.0f;
    hi = INFINITY;
    scan(x, n, lo, hi, st);
    above = 0;
  }
  std::vector<float> all;
  all.reserve(band);
  for (const auto& s : st) all.insert(all.end(), s.band.begin(), s.band.end());
  const float thr = kth_largest_in_band(all, k - above, lo, hi);
  auto thr_t = torch::full({}, thr, flat.options().dtype(torch::kFloat32));
  if (threshold_only) return {thr_t};

  // Kept: |v| >= thr, every tie; when thr is 0 the ties are zeros, which a GEMM does not need: |v| > 0.
  const bool strict = !(thr > 0.0f);
  std::vector<int64_t> offset(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t kept = st[c].above;
    for (float a : st[c].band) kept += strict ? a > thr : a >= thr;
    offset[c + 1] = offset[c] + kept;
  }
  const int64_t total = offset[nchunks];
  const bool i32 = n < ((int64_t)1 << 31) - 1;
  auto pos = torch::empty({total}, flat.options().dtype(i32 ? torch::kInt32 : torch::kInt64));
  auto val = torch::empty({total}, flat.options());
  if (i32)
    compact<T, int32_t>(x, n, thr, strict, offset, pos.data_ptr<int32_t>(), val.data_ptr<T>());
  else
    compact<T, int64_t>(x, n, thr, strict, offset, pos.data_ptr<int64_t>(), val.data_ptr<T>());
  return {thr_t, pos, val};
}

// (thr, pos, values) of the exact top k of |flat|: every |v| >= thr kept (|v| > 0 when thr is 0), positions in
// memory order. threshold_only: (thr,). Empty when a magnitude is NaN.
std::vector<torch::Tensor> topk_select(torch::Tensor flat, int64_t k, torch::Tensor sample, bool threshold_only) {
  TORCH_CHECK(flat.device().is_cpu() && flat.dim() == 1 && flat.is_contiguous(), "topk_select: a flat CPU tensor");
  TORCH_CHECK(k >= 1 && k <= flat.numel(), "topk_select: k out of range");
  TORCH_CHECK(sample.scalar_type() == torch::kInt64, "topk_select: int64 sample indices");
  std::vector<torch::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "topk_select", [&] {
    out = select_impl<scalar_t>(flat, k, sample, threshold_only);
  });
  return out;
}

// The 1-bit mask of out > 0 (bit i of byte i / 8 = element i), as packing.packbits(flat > 0) writes it.
torch::Tensor pack_positive(torch::Tensor flat) {
  TORCH_CHECK(flat.device().is_cpu() && flat.dim() == 1 && flat.is_contiguous(), "pack_positive: a flat CPU tensor");
  const int64_t n = flat.numel(), nbytes = (n + 7) / 8;
  auto bits = torch::empty({nbytes}, flat.options().dtype(torch::kUInt8));
  uint8_t* o = bits.data_ptr<uint8_t>();
#if defined(__AVX512F__)
  if (flat.scalar_type() == torch::kFloat32) {  // one compare per 16 elements gives their 16 bits
    const float* x = flat.data_ptr<float>();
    const int64_t nvec = n / 16;
    at::parallel_for(0, nvec, kSerialElems / 16, [&](int64_t v0, int64_t v1) {
      const __m512 zero = _mm512_setzero_ps();
      for (int64_t v = v0; v < v1; ++v) {
        const uint16_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + v * 16), zero, _CMP_GT_OQ);
        std::memcpy(o + v * 2, &m, 2);  // little-endian: bit i of the pair is element i
      }
    });
    for (int64_t b = nvec * 2; b < nbytes; ++b) {
      uint8_t byte = 0;
      for (int64_t j = 0; j < 8 && b * 8 + j < n; ++j) byte |= static_cast<uint8_t>(x[b * 8 + j] > 0.0f) << j;
      o[b] = byte;
    }
    return bits;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "pack_positive", [&] {
    const scalar_t* x = flat.data_ptr<scalar_t>();
    at::parallel_for(0, nbytes, kSerialElems / 8, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * 8;
        uint8_t byte = 0;
        if (i0 + 8 <= n) {
          for (int j = 0; j < 8; ++j) byte |= static_cast<uint8_t>(static_cast<uint8_t>(static_cast<float>(x[i0 + j]) > 0.0f) << j);
        } else {
          for (int64_t j = 0; i0 + j < n; ++j) byte |= static_cast<uint8_t>(static_cast<float>(x[i0 + j]) > 0.0f) << j;
        }
        o[b] = byte;
      }
    });
  });
  return bits;
}

// ReLU's backward from its 1-bit mask: dy where the bit is set, +0 elsewhere (threshold_backward(dy, mask, 0)).
// Branch-free on the bit patterns (an all-ones or all-zeros mask per element), so the compiler vectorises it.
template <typename U>
void relu_backward_bits_impl(const U* g, const uint8_t* b, U* d, int64_t n) {
  const int64_t nfull = n / 8;
  at::parallel_for(0, nfull, kSerialElems / 8, [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) {
      const U byte = b[k];
      const int64_t i = k * 8;
      for (int j = 0; j < 8; ++j) d[i + j] = g[i + j] & static_cast<U>(U(0) - ((byte >> j) & U(1)));
    }
  });
  for (int64_t i = nfull * 8; i < n; ++i) d[i] = g[i] & static_cast<U>(U(0) - ((b[i >> 3] >> (i & 7)) & 1));
}

// The same for a 4-D gradient laid out the other way from its bitmap: contiguous NCHW with the bits in NHWC order
// (`bits_channels_last`), or channels_last with the bits in NCHW order. The result has dy's layout. Compiled CPU
// code packs a ReLU output in the channels_last order Inductor stores it in, but a gradient arriving through a
// residual add is NCHW; a transposing copy of it (a strided gather) cost more than the whole ReLU backward.
template <typename U>
void relu_backward_bits_transposed_impl(const U* g, const uint8_t* b, U* d, int64_t N, int64_t C, int64_t HW,
                                        bool bits_channels_last) {
  auto bit = [b](int64_t i) { return static_cast<U>(U(0) - ((b[i >> 3] >> (i & 7)) & 1)); };
  if (bits_channels_last && C % 8 == 0) {
    // dy NCHW, 8 channels at a time: the bits of 8 pixels x 8 channels are 8 bytes (one per pixel), transposed as
    // an 8x8 bit matrix into one byte per channel, each then masking 8 consecutive elements of its plane.
    const int64_t groups = C / 8;
    at::parallel_for(0, N * groups, std::max<int64_t>(1, kSerialElems / std::max<int64_t>(8 * HW, 1)),
                     [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / groups, c0 = (q % groups) * 8;
        const uint8_t* row = b + (n * HW * C + c0) / 8;  // pixel p's byte for channels c0..c0+7: row[p * C / 8]
        const int64_t stride = C / 8;
        auto transposed = [row, stride](int64_t p) {  // byte i: channel c0 + i over pixels p..p+7
          uint64_t x = 0;
          for (int j = 0; j < 8; ++j) x |= uint64_t(row[(p + j) * stride]) << (8 * j);
          uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
          x = x ^ t ^ (t << 7);
          t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
          x = x ^ t ^ (t << 14);
          t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
          return x ^ t ^ (t << 28);
        };
        int64_t p = 0;
#if defined(__AVX512F__)
        if constexpr (sizeof(U) == 4) {  // 16 pixels: a masked move per channel
          for (; p + 16 <= HW; p += 16) {
            const uint64_t lo = transposed(p), hi = transposed(p + 8);
            for (int i = 0; i < 8; ++i) {
              const __mmask16 m = __mmask16(((lo >> (8 * i)) & 0xFF) | (((hi >> (8 * i)) & 0xFF) << 8));
              const int64_t o = ((n * C) + c0 + i) * HW + p;
              _mm512_storeu_ps(reinterpret_cast<float*>(d + o),
                               _mm512_maskz_mov_ps(m, _mm512_loadu_ps(reinterpret_cast<const float*>(g + o))));
            }
          }
        }
#endif
        for (; p + 8 <= HW; p += 8) {
          const uint64_t x = transposed(p);
          for (int i = 0; i < 8; ++i) {
            const uint8_t m = uint8_t(x >> (8 * i));
            const int64_t o = ((n * C) + c0 + i) * HW + p;
            for (int j = 0; j < 8; ++j) d[o + j] = g[o + j] & static_cast<U>(U(0) - ((m >> j) & 1));
          }
        }
        for (; p < HW; ++p)
          for (int i = 0; i < 8; ++i) {
            const int64_t o = ((n * C) + c0 + i) * HW + p;
            d[o] = g[o] & bit((n * HW + p) * C + c0 + i);
          }
      }
    });
  } else {
    // Element by element: dy is N x R rows of L (NCHW: R = C planes of L = HW pixels; channels_last: R = HW pixels of
    // L = C channels), and the bit of row r's element i is at (n * L + i) * R + r in the other order.
    const int64_t R = bits_channels_last ? C : HW, L = bits_channels_last ? HW : C;
    at::parallel_for(0, N * R, std::max<int64_t>(1, kSerialElems / std::max<int64_t>(L, 1)), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b0 = (q / R) * R * L + q % R;
        for (int64_t i = 0; i < L; ++i) d[q * L + i] = g[q * L + i] & bit(b0 + i * R);
      }
    });
  }
}

torch::Tensor relu_backward_bits_transposed(torch::Tensor dy, torch::Tensor bits, bool bits_channels_last) {
  TORCH_CHECK(dy.device().is_cpu() && dy.dim() == 4, "relu_backward_bits_transposed: a 4-D CPU tensor");
  const auto layout = bits_channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(dy.is_contiguous(layout), "relu_backward_bits_transposed: dy must be laid out the other way from the bits");
  TORCH_CHECK(bits.numel() * 8 >= dy.numel(), "relu_backward_bits_transposed: bitmap too short");
  auto dx = torch::empty_like(dy, layout);
  const int64_t N = dy.size(0), C = dy.size(1), HW = dy.size(2) * dy.size(3);
  const uint8_t* b = bits.data_ptr<uint8_t>();
  switch (dy.element_size()) {
    case 4:
      relu_backward_bits_transposed_impl(static_cast<const uint32_t*>(dy.data_ptr()), b,
                                         static_cast<uint32_t*>(dx.data_ptr()), N, C, HW, bits_channels_last);
      break;
    case 2:
      relu_backward_bits_transposed_impl(static_cast<const uint16_t*>(dy.data_ptr()), b,
                                         static_cast<uint16_t*>(dx.data_ptr()), N, C, HW, bits_channels_last);
      break;
    default:
      TORCH_CHECK(false, "relu_backward_bits_transposed: float32, bfloat16 or float16 only");
  }
  return dx;
}

torch::Tensor relu_backward_bits(torch::Tensor dy_flat, torch::Tensor bits) {
  TORCH_CHECK(dy_flat.device().is_cpu() && dy_flat.dim() == 1 && dy_flat.is_contiguous(),
              "relu_backward_bits: a flat CPU tensor");
  const int64_t n = dy_flat.numel();
  TORCH_CHECK(bits.numel() * 8 >= n, "relu_backward_bits: bitmap too short");
  auto dx = torch::empty_like(dy_flat);
  const uint8_t* b = bits.data_ptr<uint8_t>();
#if defined(__AVX512F__)
  if (dy_flat.element_size() == 4) {  // a masked move per 16 elements (+0 where the bit is clear)
    const float* g = static_cast<const float*>(dy_flat.data_ptr());
    float* d = static_cast<float*>(dx.data_ptr());
    const int64_t nvec = n / 16;
    at::parallel_for(0, nvec, kSerialElems / 16, [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        uint16_t m;
        std::memcpy(&m, b + v * 2, 2);
        _mm512_storeu_ps(d + v * 16, _mm512_maskz_mov_ps(m, _mm512_loadu_ps(g + v * 16)));
      }
    });
    for (int64_t i = nvec * 16; i < n; ++i) d[i] = ((b[i >> 3] >> (i & 7)) & 1) ? g[i] : 0.0f;
    return dx;
  }
#endif
  switch (dy_flat.element_size()) {  // the float types sparsetrain passes: float32, and bf16 / fp16
    case 4:
      relu_backward_bits_impl(static_cast<const uint32_t*>(dy_flat.data_ptr()), b,
                              static_cast<uint32_t*>(dx.data_ptr()), n);
      break;
    case 2:
      relu_backward_bits_impl(static_cast<const uint16_t*>(dy_flat.data_ptr()), b,
                              static_cast<uint16_t*>(dx.data_ptr()), n);
      break;
    default:
      TORCH_CHECK(false, "relu_backward_bits: float32, bfloat16 or float16 only");
  }
  return dx;
}

// flat * (|flat| >= thr): a top-K weight from its threshold, in one pass (as PyTorch's four ops compute it: the
// product by 1 or 0, so a dropped negative value is -0 and a dropped NaN stays NaN).
torch::Tensor mask_by_threshold(torch::Tensor flat, torch::Tensor thr) {
  TORCH_CHECK(flat.device().is_cpu() && flat.dim() == 1 && flat.is_contiguous() &&
              flat.scalar_type() == torch::kFloat32, "mask_by_threshold: a flat float32 CPU tensor");
  const float t = thr.item<float>();
  auto out = torch::empty_like(flat);
  const float* x = flat.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, flat.numel(), kSerialElems, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = x[i] * static_cast<float>(std::fabs(x[i]) >= t);
  });
  return out;
}

// buf[:n] = 0, then buf[pos[j]] = val[j]: the unpacking of a selection into a reused buffer, in one parallel pass
// each (pos may hold the padding position n: buf has a spare element).
void scatter_into(torch::Tensor buf, torch::Tensor pos, torch::Tensor val) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous() && pos.is_contiguous() && val.is_contiguous(),
              "scatter_into: contiguous CPU tensors");
  TORCH_CHECK(buf.scalar_type() == val.scalar_type(), "scatter_into: dtypes differ");
  const int64_t n = buf.numel(), m = pos.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "scatter_into", [&] {
    scalar_t* o = buf.data_ptr<scalar_t>();
    const scalar_t* v = val.data_ptr<scalar_t>();
    at::parallel_for(0, n, kSerialElems, [&](int64_t i0, int64_t i1) {
      std::memset(static_cast<void*>(o + i0), 0, (i1 - i0) * sizeof(scalar_t));
    });
    auto put = [&](auto* p) {
      at::parallel_for(0, m, kSerialElems / 4, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t i = static_cast<int64_t>(p[j]);
          TORCH_CHECK(i >= 0 && i < n, "scatter_into: position out of range");
          o[i] = v[j];
        }
      });
    };
    if (pos.scalar_type() == torch::kInt32) put(pos.data_ptr<int32_t>());
    else put(pos.data_ptr<int64_t>());
  });
}

}  // namespace

void register_allocator(pybind11::module& m);  // allocator.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_select", &topk_select, "exact top-k of |flat|: (thr, pos, values) or (thr,)");
  m.def("pack_positive", &pack_positive, "1-bit mask of flat > 0");
  m.def("relu_backward_bits", &relu_backward_bits, "ReLU backward from a 1-bit mask");
  m.def("relu_backward_bits_transposed", &relu_backward_bits_transposed,
        "ReLU backward of a 4-D gradient laid out the other way (NCHW / channels_last) from its 1-bit mask");
  m.def("scatter_into", &scatter_into, "zero buf, then buf[pos] = val");
  m.def("mask_by_threshold", &mask_by_threshold, "flat * (|flat| >= thr)");
  register_allocator(m);
}
