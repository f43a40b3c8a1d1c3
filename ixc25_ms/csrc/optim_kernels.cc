// In-place optimizer updates for the eager CPU path of ixc25_ms/train/optim.py (MindSpore Custom "aot" ops):
// the parameter and its moments are updated where they lie, so an update of a 379 MB embedding allocates
// nothing (the op-by-op update held several parameter-sized temporaries). Called eagerly only: the writes go
// to the buffers of the inputs, which a compiled graph would not know about. Same float32 formulas, in the
// same order, as the op-by-op `_Update`.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

bool IsF32(const char *t) { return std::strcmp(t, "float32") == 0 || std::strcmp(t, "float") == 0; }

int64_t Count(int nd, const int64_t *s) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= s[i];
  return n;
}

}  // namespace

// p, m, v, g (same size, fp32), hyper (7,) = scale, decay, step_size, bc2_sqrt, eps, beta1, beta2 -> done (1,);
// torch.optim.AdamW (_single_tensor_adamw) as optim._Update writes it: p = p*decay - m/(sqrt(v)/bc2 + eps)*step
extern "C" int IxcAdamWInPlace(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 6) return 1;
  for (int i = 0; i < 5; ++i)
    if (!IsF32(dtypes[i])) return 1;
  const int64_t n = Count(ndims[0], shapes[0]);
  for (int i = 1; i < 4; ++i)
    if (Count(ndims[i], shapes[i]) != n) return 2;
  if (Count(ndims[4], shapes[4]) != 7) return 2;
  float *p = static_cast<float *>(params[0]), *m = static_cast<float *>(params[1]);
  float *v = static_cast<float *>(params[2]);
  const float *g = static_cast<const float *>(params[3]), *h = static_cast<const float *>(params[4]);
  const float scale = h[0], decay = h[1], step = h[2], bc2 = h[3], eps = h[4];
  const float one_b1 = 1.0f - h[5], b2 = h[6], one_b2 = 1.0f - h[6];
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * scale;
    const float w = p[i] * decay;
    const float mi = m[i] + (gi - m[i]) * one_b1;
    const float vi = v[i] * b2 + gi * gi * one_b2;
    m[i] = mi;
    v[i] = vi;
    p[i] = w - mi / (std::sqrt(vi) / bc2 + eps) * step;
  }
  static_cast<int32_t *>(params[5])[0] = 1;
  return 0;
}

// p, g (fp32), hyper (3,) = scale, weight decay, lr -> done (1,); torch.optim.SGD: p -= lr * (g + wd * p)
extern "C" int IxcSgdInPlace(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 4 || !IsF32(dtypes[0]) || !IsF32(dtypes[1]) || !IsF32(dtypes[2])) return 1;
  const int64_t n = Count(ndims[0], shapes[0]);
  if (Count(ndims[1], shapes[1]) != n || Count(ndims[2], shapes[2]) != 3) return 2;
  float *p = static_cast<float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]), *h = static_cast<const float *>(params[2]);
  for (int64_t i = 0; i < n; ++i) {
    const float w = p[i];
    p[i] = w - (g[i] * h[0] + w * h[1]) * h[2];
  }
  static_cast<int32_t *>(params[3])[0] = 1;
  return 0;
}
