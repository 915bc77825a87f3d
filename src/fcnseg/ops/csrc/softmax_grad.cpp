// The fused loss's per-pixel softmax, cross-entropy and gradient over one chunk of bf16 logits, in
// one pass for AVX-512 CPUs with native bf16 (fcnseg/native.py builds it on first use).
//
// torch has no fused kernel for this: in eager mode it takes eight passes over the logits (convert
// to float32, gather the target logits, exp2, sum, scale, subtract the one-hot, convert back),
// a fifth of a cached training step; here each group of 16 pixels is loaded once, its class scores
// kept in a small array in the L1 cache, and its gradients written back in place.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kMaxClasses = 64;

// Masked loads and stores only for a row's last, partial group: masked stores are slower here.
inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  // Round to nearest even, as torch's float -> bfloat16 conversion does.
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  if (m == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, m, h);
  }
}

// 2**x for x <= 0: n = round(x), a degree-5 polynomial for 2**(x - n) on [-1/2, 1/2] (fitted for
// relative error, 1.9e-7 at most, and exactly 1 at 0, so the largest class's term is exactly 1),
// vscalefps for 2**n (it flushes to zero below float32's range rather than wrapping; NaN stays NaN).
// Logits come from a GEMM of finite values, so x is never -inf.
inline __m512 exp2_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3264724508286643e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.671512967826389e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507337520864786e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242078224734e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469775932685e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// log2(x) for x >= 1 (a sum of exp2 whose largest term is 1): exponent plus the atanh series of
// the mantissa, t = (m - 1) / (m + 1) in [0, 1/3], absolute error below 2e-7.
inline __m512 log2_at_least_one(__m512 x) {
  const __m512 exponent = _mm512_getexp_ps(x);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 series = _mm512_set1_ps(1.0f / 11);
  series = _mm512_fmadd_ps(series, t2, _mm512_set1_ps(1.0f / 9));
  series = _mm512_fmadd_ps(series, t2, _mm512_set1_ps(1.0f / 7));
  series = _mm512_fmadd_ps(series, t2, _mm512_set1_ps(1.0f / 5));
  series = _mm512_fmadd_ps(series, t2, _mm512_set1_ps(1.0f / 3));
  series = _mm512_fmadd_ps(series, t2, one);
  const __m512 two_over_ln2 = _mm512_set1_ps(2.8853900817779268f);
  return _mm512_fmadd_ps(_mm512_mul_ps(series, t), two_over_ln2, exponent);
}

}  // namespace

// logits: (K, C, P) bfloat16 logits in base 2, replaced by d loss / d logits = weight * (softmax -
// one_hot); classes: (K, P) int32 target classes (a pixel whose class is outside 0..C-1 has no
// one-hot, which is right for void pixels: their weight is 0); weights: (K, P) float32 pixel
// weights; row_losses: (K,) float64 output, each row's sum of weight * -log2 softmax(target).
void softmax_cross_entropy_grad_(torch::Tensor logits, torch::Tensor classes, torch::Tensor weights,
                                 torch::Tensor row_losses) {
  TORCH_CHECK(logits.dim() == 3 && logits.scalar_type() == torch::kBFloat16 && logits.is_contiguous(),
              "logits must be a contiguous (K, C, P) bfloat16 tensor");
  const int64_t K = logits.size(0), C = logits.size(1), P = logits.size(2);
  TORCH_CHECK(C >= 1 && C <= kMaxClasses, "1 to 64 classes, got ", C);
  for (const auto& t : {classes, weights}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == P && t.is_contiguous(),
                "classes and weights must be contiguous (K, P) tensors");
  }
  TORCH_CHECK(classes.scalar_type() == torch::kInt32, "classes must be int32");
  TORCH_CHECK(weights.scalar_type() == torch::kFloat32, "weights must be float32");
  TORCH_CHECK(row_losses.dim() == 1 && row_losses.size(0) == K && row_losses.is_contiguous() &&
              row_losses.scalar_type() == torch::kFloat64, "row_losses must be a contiguous (K,) float64 tensor");
  uint16_t* L = reinterpret_cast<uint16_t*>(logits.data_ptr<at::BFloat16>());
  const int32_t* T = classes.data_ptr<int32_t>();
  const float* W = weights.data_ptr<float>();
  double* R = row_losses.data_ptr<double>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    __m512 e[kMaxClasses];  // one group's logits, then their exp2
    __mmask16 is_target[kMaxClasses];
    for (int64_t r = begin; r < end; ++r) {
      uint16_t* row = L + r * C * P;
      __m512 row_loss = _mm512_setzero_ps();
      for (int64_t p = 0; p < P; p += 16) {
        const int64_t left = P - p;
        const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
        __m512 largest = _mm512_set1_ps(-INFINITY);
        for (int64_t c = 0; c < C; ++c) {
          e[c] = load_bf16(row + c * P + p, m);
          largest = _mm512_max_ps(largest, e[c]);
        }
        const __m512i target = _mm512_maskz_loadu_epi32(m, T + r * P + p);
        const __m512 weight = _mm512_maskz_loadu_ps(m, W + r * P + p);
        __m512 sum = _mm512_setzero_ps(), target_logit = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
          const __m512 x = _mm512_sub_ps(e[c], largest);
          is_target[c] = _mm512_cmpeq_epi32_mask(target, _mm512_set1_epi32(c));
          target_logit = _mm512_mask_mov_ps(target_logit, is_target[c], x);
          e[c] = exp2_nonpositive(x);
          sum = _mm512_add_ps(sum, e[c]);
        }
        // -log2 softmax(target) = log2(sum) - (x_target - largest); masked lanes have weight 0.
        row_loss = _mm512_fmadd_ps(weight, _mm512_sub_ps(log2_at_least_one(sum), target_logit), row_loss);
        const __m512 scale = _mm512_div_ps(weight, sum);
        for (int64_t c = 0; c < C; ++c) {
          __m512 grad = _mm512_mul_ps(e[c], scale);
          grad = _mm512_mask_sub_ps(grad, is_target[c], grad, weight);
          store_bf16(row + c * P + p, grad, m);
        }
      }
      R[r] = static_cast<double>(_mm512_reduce_add_ps(row_loss));
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_cross_entropy_grad_", &softmax_cross_entropy_grad_,
        "Per-pixel softmax cross-entropy gradient over bf16 logits, in place");
}
