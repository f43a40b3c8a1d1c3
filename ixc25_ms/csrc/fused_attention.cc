// Fused attention on CPU (MindSpore Custom "aot" ops, see ixc25_ms/fused_attention.py): forward
// (out, each row's log of its softmax sum after the max is subtracted) and backward (dq, dk, dv). The max is
// recomputed in the backward, not folded into the saved value: a fully masked row (left padding) sits at
// -3.4e38, where max + log(sum) rounds back to the max and the row would no longer sum to one. The scores of
// one KV group live in a scratch buffer of kRowChunk rows at a time and are recomputed in the backward, so a
// compiled training step holds no (heads, L, L) tensor: MindSpore's CPU graph kept ~1.1 GB per mid-config layer of score-sized buffers
// (training) and the ViT's and prefill's graphs hold them too.
// GEMMs are oneDNN's dnnl_sgemm (row-major), the library MindSpore's own CPU MatMul ships with.
// Layout (contiguous fp32): q (B, H, L, D) pre-scaled, k/v (B, KV, C, D), additive mask (B or 1, 1, L, C) or
// (1, 1, 1, 1) for none;
// H = KV * G, heads g*G .. g*G+G-1 read KV head g, so a group's queries are G*L consecutive rows.
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                          int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

namespace {

#include "kernel_threads.h"  // KernelThreads
#include "vec_math.h"        // Exp, Max16, Sum16

constexpr int64_t kRowChunk = 512;  // query rows whose scores are in the scratch at once

// fn(task, worker) for task in [0, n) on up to KernelThreads() threads (the caller is worker 0); the first nonzero
// return code, or 0
template <typename F>
int ParallelTasks(int64_t n, const F &fn) {
  const int nt = static_cast<int>(std::min<int64_t>(KernelThreads(), n));
  std::atomic<int64_t> next{0};
  std::atomic<int> err{0};
  auto work = [&](int w) {
    for (int64_t t; (t = next.fetch_add(1)) < n;)
      if (int rc = fn(t, w)) err.store(rc);
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < nt; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto &th : pool) th.join();
  return err.load();
}

bool F32(const char *t) { return std::strcmp(t, "float32") == 0 || std::strcmp(t, "float") == 0; }

struct Dims {
  int64_t B, H, KV, G, L, C, D;
  int64_t mask_stride;  // elements between batch rows of the mask; 0: shared; -1: no mask
};

int64_t Numel4(const int64_t *s) { return s[0] * s[1] * s[2] * s[3]; }

// q, k, v, mask shapes -> Dims; false when they do not fit together
bool GetDims(int *ndims, int64_t **shapes, Dims *d) {
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 4) return false;
  d->B = shapes[0][0], d->H = shapes[0][1], d->L = shapes[0][2], d->D = shapes[0][3];
  d->KV = shapes[1][1], d->C = shapes[1][2];
  if (d->KV <= 0 || d->H % d->KV != 0) return false;
  d->G = d->H / d->KV;
  for (int i = 1; i < 3; ++i)
    if (shapes[i][0] != d->B || shapes[i][1] != d->KV || shapes[i][2] != d->C || shapes[i][3] != d->D) return false;
  if (Numel4(shapes[3]) == 1) {  // (1, 1, 1, 1): no mask (the ViT)
    d->mask_stride = -1;
    return true;
  }
  if (shapes[3][1] != 1 || shapes[3][2] != d->L || shapes[3][3] != d->C) return false;
  if (shapes[3][0] != d->B && shapes[3][0] != 1) return false;
  d->mask_stride = shapes[3][0] == 1 ? 0 : d->L * d->C;  // one mask for the batch, or one per row
  return true;
}

// s (n, C) = q rows [r0, r0 + n) of a group (row r is query position r % L) times k^T, plus the mask
int Scores(const Dims &d, const float *q, const float *k, const float *mask, int64_t r0, int64_t n, float *s) {
  if (dnnl_sgemm('N', 'T', n, d.C, d.D, 1.f, q + r0 * d.D, d.D, k, d.D, 0.f, s, d.C) != 0) return 3;
  if (mask == nullptr) return 0;
  for (int64_t i = 0; i < n; ++i) {
    const float *m = mask + ((r0 + i) % d.L) * d.C;
    float *row = s + i * d.C;
    for (int64_t j = 0; j < d.C; ++j) row[j] += m[j];
  }
  return 0;
}

}  // namespace

// q, k, v, mask -> out (B, H, L, D), lse (B, H, L) (log of each row's sum of exp(s - max))
extern "C" int IxcAttnFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  Dims d;
  if (nparam != 6) return 1;
  for (int i = 0; i < 6; ++i)
    if (!F32(dtypes[i])) return 1;
  if (!GetDims(ndims, shapes, &d)) return 2;
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]), *mask = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]), *lse = static_cast<float *>(params[5]);
  const int64_t rows = d.G * d.L, chunk = std::min(rows, kRowChunk);
  std::vector<std::vector<float>> scratch(KernelThreads());
  return ParallelTasks(d.B * d.KV, [&](int64_t task, int w) -> int {
      const int64_t b = task / d.KV, g = task % d.KV;
      std::vector<float> &s = scratch[w];
      s.resize(chunk * d.C);
      const int64_t head0 = b * d.H + g * d.G;  // first head of the group
      const float *qg = q + head0 * d.L * d.D, *kg = k + (b * d.KV + g) * d.C * d.D;
      const float *vg = v + (b * d.KV + g) * d.C * d.D, *mb = d.mask_stride < 0 ? nullptr : mask + b * d.mask_stride;
      for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const int64_t n = std::min(kRowChunk, rows - r0);
        if (int rc = Scores(d, qg, kg, mb, r0, n, s.data())) return rc;
        for (int64_t i = 0; i < n; ++i) {  // softmax in place, keeping the row's log-sum
          float *row = s.data() + i * d.C;
          const float mx = Max16(row, d.C);
          for (int64_t j = 0; j < d.C; ++j) row[j] = Exp(row[j] - mx);
          const double sum = Sum16(row, d.C);
          const float inv = static_cast<float>(1.0 / sum);
          for (int64_t j = 0; j < d.C; ++j) row[j] *= inv;
          lse[head0 * d.L + r0 + i] = static_cast<float>(std::log(sum));  // the max is recomputed in bwd
        }
        if (dnnl_sgemm('N', 'N', n, d.D, d.C, 1.f, s.data(), d.C, vg, d.D, 0.f, out + (head0 * d.L + r0) * d.D,
                       d.D) != 0)
          return 3;
      }
      return 0;
    });
}

// q, k, v, mask, out, lse, dout -> dq (B, H, L, D), dk, dv (B, KV, C, D)
extern "C" int IxcAttnBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  Dims d;
  if (nparam != 10) return 1;
  for (int i = 0; i < 10; ++i)
    if (!F32(dtypes[i])) return 1;
  if (!GetDims(ndims, shapes, &d)) return 2;
  const float *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]), *mask = static_cast<const float *>(params[3]);
  const float *out = static_cast<const float *>(params[4]), *lse = static_cast<const float *>(params[5]);
  const float *dout = static_cast<const float *>(params[6]);
  float *dq = static_cast<float *>(params[7]), *dk = static_cast<float *>(params[8]);
  float *dv = static_cast<float *>(params[9]);
  const int64_t rows = d.G * d.L, chunk = std::min(rows, kRowChunk);
  std::vector<std::vector<float>> scratch(KernelThreads());
  return ParallelTasks(d.B * d.KV, [&](int64_t task, int w) -> int {
      const int64_t b = task / d.KV, g = task % d.KV;
      std::vector<float> &buf = scratch[w];
      buf.resize(2 * chunk * d.C);
      float *p = buf.data(), *ds = p + chunk * d.C;
      const int64_t head0 = b * d.H + g * d.G;
      const float *qg = q + head0 * d.L * d.D, *kg = k + (b * d.KV + g) * d.C * d.D;
      const float *vg = v + (b * d.KV + g) * d.C * d.D, *mb = d.mask_stride < 0 ? nullptr : mask + b * d.mask_stride;
      const float *og = out + head0 * d.L * d.D, *dog = dout + head0 * d.L * d.D, *lg = lse + head0 * d.L;
      float *dkg = dk + (b * d.KV + g) * d.C * d.D, *dvg = dv + (b * d.KV + g) * d.C * d.D;
      for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const int64_t n = std::min(kRowChunk, rows - r0);
        if (int rc = Scores(d, qg, kg, mb, r0, n, p)) return rc;
        for (int64_t i = 0; i < n; ++i) {  // P = exp(S - max - log(sum)), exactly the forward's rows
          float *row = p + i * d.C;
          const float mx = Max16(row, d.C), l = lg[r0 + i];  // (s - mx) - l: mx + l rounds to mx at -3.4e38
          for (int64_t j = 0; j < d.C; ++j) row[j] = Exp(row[j] - mx - l);
        }
        // dP = dout V^T; dS = P * (dP - rowsum(dout * out))
        if (dnnl_sgemm('N', 'T', n, d.C, d.D, 1.f, dog + r0 * d.D, d.D, vg, d.D, 0.f, ds, d.C) != 0) return 3;
        for (int64_t i = 0; i < n; ++i) {
          const float *o = og + (r0 + i) * d.D, *dor = dog + (r0 + i) * d.D;
          double dd = 0.0;
          for (int64_t c = 0; c < d.D; ++c) dd += static_cast<double>(o[c]) * dor[c];
          const float di = static_cast<float>(dd);
          float *dsr = ds + i * d.C;
          const float *pr = p + i * d.C;
          for (int64_t j = 0; j < d.C; ++j) dsr[j] = pr[j] * (dsr[j] - di);
        }
        const float beta = r0 == 0 ? 0.f : 1.f;  // dk/dv sum over every chunk of the group's rows
        if (dnnl_sgemm('N', 'N', n, d.D, d.C, 1.f, ds, d.C, kg, d.D, 0.f, dq + (head0 * d.L + r0) * d.D,
                       d.D) != 0 ||
            dnnl_sgemm('T', 'N', d.C, d.D, n, 1.f, ds, d.C, qg + r0 * d.D, d.D, beta, dkg, d.D) != 0 ||
            dnnl_sgemm('T', 'N', d.C, d.D, n, 1.f, p, d.C, dog + r0 * d.D, d.D, beta, dvg, d.D) != 0)
          return 3;
      }
      return 0;
    });
}

// Shape inference in C++, which MindSpore needs for a Custom op inside a dynamic-shape graph (the Python out_shape
// is only called while compiling; training compiles with dynamic lengths). -2 is an unknown rank.
class AotExtra;
extern "C" std::vector<std::vector<int64_t>> IxcAttnFwdInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  if (ndims[0] != 4 || shapes[0][0] == -2) return {{-2}, {-2}};
  std::vector<int64_t> q(shapes[0], shapes[0] + 4);
  return {q, {q[0], q[1], q[2]}};
}

extern "C" std::vector<std::vector<int64_t>> IxcAttnBwdInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  auto shape = [&](int i) { return std::vector<int64_t>(shapes[i], shapes[i] + ndims[i]); };
  return {shape(0), shape(1), shape(2)};
}
