// Weight-only quantised linears for MindSpore Custom "aot" ops (see ixc25_ms/quantize/kernels.py).
// int8 weights (out, in) with one fp32 scale per output row, or fp16 weights; activations and sums fp32.
// Every kernel: int f(nparam, params, ndims, shapes, dtypes, stream, extra); inputs first, then outputs;
// contiguous row-major only; a nonzero return makes MindSpore raise.
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

#include "kernel_threads.h"  // KernelThreads

int64_t Numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

bool Is(const char *dtype, const char *a, const char *b = nullptr) {
  return std::strcmp(dtype, a) == 0 || (b != nullptr && std::strcmp(dtype, b) == 0);
}

// ------------------------------------------------------------------------------------------ thread pool
// A persistent pool (IXC25_KERNEL_THREADS threads in all, the caller included; default: the CPUs this process
// may run on, at most 8). Workers spin briefly on a generation counter, then sleep; one job at a time (a
// second concurrent caller runs its job alone). Rebuilt lazily after fork (the child has no workers).
class Pool {
 public:
  static Pool &Get() {
    static Pool *pool = new Pool();  // never destroyed: workers may outlive static destruction
    return *pool;
  }

  int threads() const { return nthreads_; }
  // threads of the memory-bound decode kernels (mat-vecs of <= 8 rows, decode attention): IXC25_DECODE_THREADS,
  // else threads(); fewer than threads() leaves MindSpore's own runtime threads a core (notes/quantization.md)
  int decode_threads() const { return decode_threads_; }

  // fn(t, nt) for t in [0, nt), nt <= threads(); the caller runs t = 0
  void Run(int nt, const std::function<void(int, int)> &fn) {
    nt = std::max(1, std::min(nt, nthreads_));
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (nt == 1 || !busy.owns_lock()) {
      fn(0, 1);
      return;
    }
    Start();
    job_ = &fn;
    job_threads_ = nt;
    pending_.store(nt - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    sleep_cv_.notify_all();
    fn(0, nt);
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  Pool() {
    nthreads_ = KernelThreads();
    const char *dec = std::getenv("IXC25_DECODE_THREADS");
    decode_threads_ = dec && std::atoi(dec) > 0 ? std::min(std::atoi(dec), nthreads_) : nthreads_;
    const char *spin = std::getenv("IXC25_KERNEL_SPIN");
    spin_ = spin ? std::max(0, std::atoi(spin)) : spin_;
    pthread_atfork(nullptr, nullptr, [] { Get().started_ = false; });  // the child's workers are gone
  }

  void Start() {
    if (started_) return;
    started_ = true;
    const uint64_t now = generation_.load(std::memory_order_acquire);  // before this job's increment
    for (int t = 1; t < nthreads_; ++t) std::thread([this, t, now] { Loop(t, now); }).detach();
  }

  void Loop(int t, uint64_t seen) {
    for (;;) {
      int spins = 0;
      uint64_t g;
      while ((g = generation_.load(std::memory_order_acquire)) == seen && spins < spin_) {
        _mm_pause();
        ++spins;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(sleep_mutex_);
        sleep_cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;
      if (t < job_threads_) {
        (*job_)(t, job_threads_);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  int nthreads_ = 1;
  int decode_threads_ = 1;
  int spin_ = 2000;  // pause iterations a worker spins before it sleeps (IXC25_KERNEL_SPIN)
  bool started_ = false;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int, int)> *job_ = nullptr;
  int job_threads_ = 1;
};

// rows [r0, r1) of a split of n rows into nt parts, each a multiple of `align` rows (but the last)
void Part(int64_t n, int t, int nt, int64_t align, int64_t *r0, int64_t *r1) {
  int64_t blocks = (n + align - 1) / align;
  *r0 = std::min(n, blocks * t / nt * align);
  *r1 = std::min(n, blocks * (t + 1) / nt * align);
}

// ------------------------------------------------------------------------------------------ weight rows
// 16 weights of row w at column c as fp32
#if defined(__AVX512F__)
inline __m512 Load16(const int8_t *w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w))));
}
inline __m512 Load16(const uint16_t *w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w)));
}
#endif

inline float Scalar(int8_t v) { return static_cast<float>(v); }
inline float Scalar(uint16_t h) { return _cvtsh_ss(h); }

// y[m, o] = scale[o] * sum_k x[m, k] w[o, k] for rows o in [o0, o1) and every m < M (M small: each weight row
// block is read once for all M rows of x). Four output rows at a time, M in blocks of up to MB rows.
template <typename W, int MB>
void RowsBlock(const float *x, int64_t m0, int64_t mb, const W *w, const float *scale, int64_t K, int64_t N,
               int64_t o0, int64_t o1, float *y) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const W *w0 = w + o * K;
#if defined(__AVX512F__)
    __m512 acc[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = Load16(w0 + r * K + k);
      for (int i = 0; i < MB; ++i) {
        if (i >= mb) break;
        const __m512 xv = _mm512_loadu_ps(x + (m0 + i) * K + k);
        for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
      }
    }
    for (int i = 0; i < mb; ++i) {
      for (int r = 0; r < 4; ++r) {
        float s = _mm512_reduce_add_ps(acc[i][r]);
        for (int64_t kk = k; kk < K; ++kk) s += x[(m0 + i) * K + kk] * Scalar(w0[r * K + kk]);
        y[(m0 + i) * N + o + r] = s * (scale ? scale[o + r] : 1.0f);
      }
    }
#else
    for (int i = 0; i < mb; ++i) {
      for (int r = 0; r < 4; ++r) {
        float s = 0.f;
        for (int64_t kk = 0; kk < K; ++kk) s += x[(m0 + i) * K + kk] * Scalar(w0[r * K + kk]);
        y[(m0 + i) * N + o + r] = s * (scale ? scale[o + r] : 1.0f);
      }
    }
#endif
  }
  for (; o < o1; ++o) {  // the last out % 4 rows
    for (int i = 0; i < mb; ++i) {
      float s = 0.f;
      for (int64_t kk = 0; kk < K; ++kk) s += x[(m0 + i) * K + kk] * Scalar(w[o * K + kk]);
      y[(m0 + i) * N + o] = s * (scale ? scale[o] : 1.0f);
    }
  }
}

constexpr int kRowBlock = 4;  // rows of x per pass over the weights
constexpr int64_t kDecodeRows = 8;  // up to this many rows of x a mat-vec is memory-bound (decode_threads)

// threads for an (M, K) x (N, K)^T product: one for small weights (the wake-up costs more than the rows),
// decode_threads() for memory-bound mat-vecs of <= kDecodeRows rows, else all
int LinearThreads(const Pool &pool, int64_t M, int64_t K, int64_t N) {
  return N * K < (1 << 16) ? 1 : M <= kDecodeRows ? pool.decode_threads() : pool.threads();
}

template <typename W>
void Linear(const float *x, int64_t M, const W *w, const float *scale, int64_t K, int64_t N, float *y) {
  Pool &pool = Pool::Get();
  const int nt = LinearThreads(pool, M, K, N);
  pool.Run(nt, [&](int t, int n) {
    int64_t o0, o1;
    Part(N, t, n, 16, &o0, &o1);
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock)
      RowsBlock<W, kRowBlock>(x, m0, std::min<int64_t>(kRowBlock, M - m0), w, scale, K, N, o0, o1, y);
  });
}

// ------------------------------------------------------------------------------------------ packed int8 rows
// The decode layout of an int8 weight (N, K), N % 8 == 0 and K % 16 == 0 (ixc25_ms.quantize.int8.pack_rows):
// blocks of 8 rows, each block stored as K/16 chunks of 8 rows x 16 columns, so element (8b + r, 16c + j) sits
// at b*8*K + c*128 + r*16 + j. A block is then one sequential 8*K-byte stream; the row-major layout read 8 rows
// at a time is 8 streams K bytes apart, which the prefetchers follow badly (measured on this machine's EPYC:
// 92,544 x 1,024 at 1 thread 3.7 ms packed vs 11.9 ms row-major).
constexpr int kPackRows = 8, kPackCols = 16;

// rows [o + r0, o + r0 + RB) of y for the mb <= MB rows of x starting at x (row stride K, output row stride N);
// wb is the 8-row block holding them
template <int MB, int RB>
void PackedBlock(const float *x, int mb, const int8_t *wb, const float *scale, int64_t K, int64_t N, int64_t o,
                 int r0, float *y) {
#if defined(__AVX512F__)
  __m512 acc[MB][RB];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < RB; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K / kPackCols; ++c) {
    const int8_t *wc = wb + (c * kPackRows + r0) * kPackCols;
    __m512 wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = Load16(wc + r * kPackCols);
    for (int i = 0; i < MB; ++i) {
      if (i >= mb) break;
      const __m512 xv = _mm512_loadu_ps(x + i * K + c * kPackCols);
      for (int r = 0; r < RB; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < mb; ++i)
    for (int r = 0; r < RB; ++r) y[i * N + o + r0 + r] = _mm512_reduce_add_ps(acc[i][r]) * scale[o + r0 + r];
#else
  for (int i = 0; i < mb; ++i)
    for (int r = r0; r < r0 + RB; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k)
        s += x[i * K + k] * static_cast<float>(wb[((k / kPackCols) * kPackRows + r) * kPackCols + k % kPackCols]);
      y[i * N + o + r] = s * scale[o + r];
    }
#endif
}

void PackedLinear(const float *x, int64_t M, const int8_t *w, const float *scale, int64_t K, int64_t N, float *y) {
  Pool &pool = Pool::Get();
  const int nt = LinearThreads(pool, M, K, N);
  pool.Run(nt, [&](int t, int n) {
    int64_t b0, b1;
    Part(N / kPackRows, t, n, 1, &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t *wb = w + b * kPackRows * K;
      const int64_t o = b * kPackRows;
      if (M == 1) {  // decode: 8 accumulators, the block read once
        PackedBlock<1, 8>(x, 1, wb, scale, K, N, o, 0, y);
        continue;
      }
      // several rows of x: 4 of them x 4 weight rows per pass (21 of the 32 vector registers); the block
      // (8*K bytes) is re-read from cache, each weight converted once per 4 rows of x
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
        PackedBlock<4, 4>(x + m0 * K, mb, wb, scale, K, N, o, 0, y + m0 * N);
        PackedBlock<4, 4>(x + m0 * K, mb, wb, scale, K, N, o, 4, y + m0 * N);
      }
    }
  });
}

}  // namespace

// The pool for the other kernel sources of this library (decode_kernels.cc): fn(t, nt) for t in [0, nt).
void IxcPoolRun(int nt, const std::function<void(int, int)> &fn) { Pool::Get().Run(nt, fn); }
int IxcPoolThreads() { return Pool::Get().threads(); }
int IxcPoolDecodeThreads() { return Pool::Get().decode_threads(); }
// y (M, N) = (x (M, K) @ w^T) * scale for a weight in the packed layout: the int8 decode blocks of
// decode_kernels.cc call it between their other steps
void IxcPackedLinear(const float *x, int64_t M, const int8_t *w, const float *scale, int64_t K, int64_t N, float *y) {
  PackedLinear(x, M, w, scale, K, N, y);
}

// x (..., K) fp32, w (N, K) int8 packed (see PackedBlock), scale (N) fp32 -> y (..., N) fp32 = (x @ w^T) * scale
extern "C" int IxcInt8LinearPacked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  if (nparam != 4 || !Is(dtypes[0], "float32", "float") || !Is(dtypes[1], "int8") ||
      !Is(dtypes[2], "float32", "float") || !Is(dtypes[3], "float32", "float") || ndims[1] != 2)
    return 1;
  const int64_t N = shapes[1][0], K = shapes[1][1];
  if (shapes[0][ndims[0] - 1] != K || Numel(ndims[2], shapes[2]) != N || shapes[3][ndims[3] - 1] != N ||
      N % kPackRows != 0 || K % kPackCols != 0)
    return 2;
  const int64_t M = Numel(ndims[0], shapes[0]) / K;
  PackedLinear(static_cast<const float *>(params[0]), M, static_cast<const int8_t *>(params[1]),
               static_cast<const float *>(params[2]), K, N, static_cast<float *>(params[3]));
  return 0;
}

// w (N, K) int8 packed, scale (N) fp32 -> (N, K) fp32 row-major = w * scale (per row): prefill's weight
extern "C" int IxcInt8DequantPacked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  if (nparam != 3 || !Is(dtypes[0], "int8") || !Is(dtypes[1], "float32", "float") || ndims[0] != 2) return 1;
  const int64_t N = shapes[0][0], K = shapes[0][1];
  if (Numel(ndims[1], shapes[1]) != N || Numel(ndims[2], shapes[2]) != N * K || N % kPackRows != 0 ||
      K % kPackCols != 0)
    return 2;
  const int8_t *w = static_cast<const int8_t *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  Pool::Get().Run(Pool::Get().threads(), [&](int t, int nt) {
    int64_t b0, b1;
    Part(N / kPackRows, t, nt, 1, &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t *wb = w + b * kPackRows * K;
      for (int64_t c = 0; c < K / kPackCols; ++c)
        for (int r = 0; r < kPackRows; ++r) {
          const int64_t row = b * kPackRows + r;
          const float s = scale[row];
          const int8_t *src = wb + (c * kPackRows + r) * kPackCols;
          float *dst = out + row * K + c * kPackCols;
          for (int j = 0; j < kPackCols; ++j) dst[j] = static_cast<float>(src[j]) * s;
        }
    }
  });
  return 0;
}

// x (..., K) fp32, w (N, K) int8, scale (N) fp32 -> y (..., N) fp32 = (x @ w^T) * scale
extern "C" int IxcInt8Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 4 || !Is(dtypes[0], "float32", "float") || !Is(dtypes[1], "int8") ||
      !Is(dtypes[2], "float32", "float") || !Is(dtypes[3], "float32", "float") || ndims[1] != 2)
    return 1;
  const int64_t N = shapes[1][0], K = shapes[1][1];
  if (shapes[0][ndims[0] - 1] != K || Numel(ndims[2], shapes[2]) != N || shapes[3][ndims[3] - 1] != N) return 2;
  const int64_t M = Numel(ndims[0], shapes[0]) / K;
  Linear(static_cast<const float *>(params[0]), M, static_cast<const int8_t *>(params[1]),
         static_cast<const float *>(params[2]), K, N, static_cast<float *>(params[3]));
  return 0;
}

// x (..., K) fp32, w (N, K) fp16 -> y (..., N) fp32 = x @ w^T (fp16 weights widened exactly, fp32 sums)
extern "C" int IxcF16Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 3 || !Is(dtypes[0], "float32", "float") || !Is(dtypes[1], "float16") ||
      !Is(dtypes[2], "float32", "float") || ndims[1] != 2)
    return 1;
  const int64_t N = shapes[1][0], K = shapes[1][1];
  if (shapes[0][ndims[0] - 1] != K || shapes[2][ndims[2] - 1] != N) return 2;
  const int64_t M = Numel(ndims[0], shapes[0]) / K;
  Linear(static_cast<const float *>(params[0]), M, static_cast<const uint16_t *>(params[1]), nullptr, K, N,
         static_cast<float *>(params[2]));
  return 0;
}

// w (N, K) int8, scale (N) fp32 -> (N, K) fp32 = w * scale (per row): the weight for an fp32 matmul (prefill)
extern "C" int IxcInt8Dequant(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (nparam != 3 || !Is(dtypes[0], "int8") || !Is(dtypes[1], "float32", "float") || ndims[0] != 2) return 1;
  const int64_t N = shapes[0][0], K = shapes[0][1];
  if (Numel(ndims[1], shapes[1]) != N || Numel(ndims[2], shapes[2]) != N * K) return 2;
  const int8_t *w = static_cast<const int8_t *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  Pool::Get().Run(Pool::Get().threads(), [&](int t, int nt) {
    int64_t r0, r1;
    Part(N, t, nt, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      const float s = scale[r];
      for (int64_t k = 0; k < K; ++k) out[r * K + k] = static_cast<float>(w[r * K + k]) * s;
    }
  });
  return 0;
}
