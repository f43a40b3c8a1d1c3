// Fused fp32 CPU kernels for one decode step, called by MindSpore Custom "aot" ops (see cpu_kernels.py).
// Every kernel: int f(nparam, params, ndims, shapes, dtypes, stream, extra); inputs first, then outputs;
// contiguous row-major float32 only (the Python side checks); a nonzero return makes MindSpore raise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

void IxcPoolRun(int nt, const std::function<void(int, int)> &fn);  // quant_kernels.cc's thread pool
int IxcPoolThreads();

namespace {

int64_t Numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

bool AllFloat32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  }
  return true;
}

// y = s * rsqrt(mean(s^2) + eps) * w for one row of h values (sum of squares in double)
inline void NormRow(const float *s, const float *w, float eps, int64_t h, float *y) {
  double ss = 0.0;
  for (int64_t i = 0; i < h; ++i) ss += static_cast<double>(s[i]) * s[i];
  const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(h) + eps));
  for (int64_t i = 0; i < h; ++i) y[i] = s[i] * r * w[i];
}

#include "vec_math.h"  // Exp

// out (n) = in (d) @ m (d, n): rows of m are contiguous, so the inner loop vectorises
inline void RowTimesMatrix(const float *in, const float *m, int64_t d, int64_t n, float *out) {
  for (int64_t e = 0; e < n; ++e) out[e] = 0.f;
  for (int64_t c = 0; c < d; ++c) {
    const float a = in[c];
    const float *mr = m + c * n;
    for (int64_t e = 0; e < n; ++e) out[e] += a * mr[e];
  }
}

}  // namespace

// x (..., H), w (H), eps (1) -> y (..., H)
extern "C" int IxcRmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 4 || !AllFloat32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t h = shapes[0][ndims[0] - 1];
  if (Numel(ndims[1], shapes[1]) != h) return 2;
  const int64_t rows = Numel(ndims[0], shapes[0]) / h;
  for (int64_t r = 0; r < rows; ++r) NormRow(x + r * h, w, eps, h, y + r * h);
  return 0;
}

// x, r (..., H), w (H), eps (1) -> s = x + r, y = rms_norm(s) * w   (the residual add and the next norm)
extern "C" int IxcAddRmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 6 || !AllFloat32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *res = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *s = static_cast<float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  const int64_t h = shapes[0][ndims[0] - 1];
  const int64_t n = Numel(ndims[0], shapes[0]);
  if (Numel(ndims[1], shapes[1]) != n || Numel(ndims[2], shapes[2]) != h) return 2;
  for (int64_t i = 0; i < n; ++i) s[i] = x[i] + res[i];
  for (int64_t r = 0; r < n / h; ++r) NormRow(s + r * h, w, eps, h, y + r * h);
  return 0;
}

// qkv (B, 1, kvh*(G+2)*d) in the fused layout [q_0 .. q_(G-1), k, v] per KV group, mq/mk (B, d, d)
// -> q (B*kvh, G, d) = q_row @ mq, k (B*kvh, 1, d) = k_row @ mk, v (B*kvh, 1, d) copied:
// the split, RoPE and the softmax scale (folded into mq) in one pass
extern "C" int IxcRopeSplit(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 6 || !AllFloat32(nparam, dtypes) || ndims[1] != 3 || ndims[3] != 3) return 1;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *mq = static_cast<const float *>(params[1]);
  const float *mk = static_cast<const float *>(params[2]);
  float *q = static_cast<float *>(params[3]);
  float *k = static_cast<float *>(params[4]);
  float *v = static_cast<float *>(params[5]);
  const int64_t b = shapes[1][0], d = shapes[1][2];
  const int64_t g = shapes[3][1], kvh = shapes[3][0] / b;
  if (Numel(ndims[0], shapes[0]) != b * kvh * (g + 2) * d) return 2;
  for (int64_t bi = 0; bi < b; ++bi) {
    const float *mqb = mq + bi * d * d, *mkb = mk + bi * d * d;
    for (int64_t h = 0; h < kvh; ++h) {
      const float *grp = qkv + (bi * kvh + h) * (g + 2) * d;
      float *qo = q + (bi * kvh + h) * g * d;
      for (int64_t j = 0; j < g; ++j) RowTimesMatrix(grp + j * d, mqb, d, d, qo + j * d);
      RowTimesMatrix(grp + g * d, mkb, d, d, k + (bi * kvh + h) * d);
      std::memcpy(v + (bi * kvh + h) * d, grp + (g + 1) * d, sizeof(float) * d);
    }
  }
  return 0;
}

// a, b (..., I) -> silu(a) * b = a * sigmoid(a) * b
extern "C" int IxcSwiGLU(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  if (nparam != 3 || !AllFloat32(nparam, dtypes)) return 1;
  const float *a = static_cast<const float *>(params[0]);
  const float *bb = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t n = Numel(ndims[0], shapes[0]);
  if (Numel(ndims[1], shapes[1]) != n) return 2;
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] / (1.f + Exp(-a[i])) * bb[i];
  return 0;
}

// One query token's attention over the cache, per KV head: q (B*kvh, G, d) scaled and rotated, k/v caches
// (B*kvh, C, d), additive mask (B, 1, 1, C) -> out (B*kvh, G, d). The scores of a head's G queries are made in
// one pass over its keys and the output in one pass over its values (each cache row read once); softmax in
// fp32 with the max subtracted, sums in double. Replaces BatchMatMul, Add, Softmax and BatchMatMul (4 launches).
extern "C" int IxcDecodeAttn(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 5 || !AllFloat32(nparam, dtypes) || ndims[0] != 3 || ndims[1] != 3 || ndims[3] != 4) return 1;
  const float *q = static_cast<const float *>(params[0]), *kc = static_cast<const float *>(params[1]);
  const float *vc = static_cast<const float *>(params[2]), *mask = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  const int64_t bk = shapes[0][0], g = shapes[0][1], d = shapes[0][2], c = shapes[1][1], b = shapes[3][0];
  if (shapes[1][0] != bk || shapes[1][2] != d || Numel(ndims[2], shapes[2]) != bk * c * d || b <= 0 ||
      bk % b != 0 || shapes[3][3] != c || Numel(ndims[3], shapes[3]) != b * c)
    return 2;
  const int64_t kvh = bk / b;
  auto head = [&](int64_t i, std::vector<float> &s) {
    const float *qi = q + i * g * d, *k = kc + i * c * d, *v = vc + i * c * d, *m = mask + (i / kvh) * c;
    s.resize(g * c);
    for (int64_t j = 0; j < c; ++j) {  // s[a][j] = q_a . k_j + mask_j
      const float *kr = k + j * d;
      for (int64_t a = 0; a < g; ++a) {
        const float *qa = qi + a * d;
        float acc = 0.f;
        for (int64_t e = 0; e < d; ++e) acc += qa[e] * kr[e];
        s[a * c + j] = acc + m[j];
      }
    }
    for (int64_t a = 0; a < g; ++a) {  // softmax of each query's row
      float *row = s.data() + a * c;
      const float mx = Max16(row, c);
      for (int64_t j = 0; j < c; ++j) row[j] = Exp(row[j] - mx);
      const float inv = static_cast<float>(1.0 / Sum16(row, c));
      for (int64_t j = 0; j < c; ++j) row[j] *= inv;
    }
    float *o = out + i * g * d;
    std::fill(o, o + g * d, 0.f);
    for (int64_t j = 0; j < c; ++j) {  // out[a] = sum_j p[a][j] v_j
      const float *vr = v + j * d;
      for (int64_t a = 0; a < g; ++a) {
        const float p = s[a * c + j];
        float *oa = o + a * d;
        for (int64_t e = 0; e < d; ++e) oa[e] += p * vr[e];
      }
    }
  };
  const int nt = static_cast<int>(std::min<int64_t>(bk, IxcPoolThreads()));
  IxcPoolRun(nt, [&](int t, int n) {
    std::vector<float> s;
    for (int64_t i = t; i < bk; i += n) head(i, s);
  });
  return 0;
}
