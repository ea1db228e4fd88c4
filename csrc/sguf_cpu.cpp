// Fused CPU SGUF patch descriptors of one uint8 RGB image (the arithmetic of
// kawhi_kernels/regions/descriptors_cpu.py, stage for stage, without full-image temporaries
// beyond the padded lightness and the smoothed image):
//   Y = red_green[r + 256 g] + blue[b]; L = 116 f(Y) - 16 (cbrt, linear branch at Y <= eps);
//   scipy "reflect" padding by the Gaussian radius; Gaussian along rows (first tap multiplied,
//   then one add per non-zero tap, as the torch path), then along columns, row by row through an
//   L1-sized line buffer; a 1-pixel edge-copy rim; Sobel (difference, then [1, 2, 1]); per-patch
//   sums of gx^2, gx gy, gy^2 and L accumulated in double, divided by P^2 and rounded to T;
//   closed-form eigenvalues clamped at 0.
// Portable C++ (no intrinsics): the inner loops run over contiguous rows so the compiler can
// vectorise them with the SSE2 baseline.
#include "sguf_cpu.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace kawhi {
namespace {

// scipy "reflect" source index of position i in [-radius, n + radius) for any n >= 1.
int64_t reflect_index(int64_t i, int64_t n) {
  const int64_t period = 2 * n;
  int64_t pos = i % period;
  if (pos < 0) pos += period;
  return pos >= n ? period - 1 - pos : pos;
}

template <typename T>
struct Workspace {
  std::vector<T> padded, smoothed, line;
  std::vector<double> sums;
};

template <typename T>
Workspace<T>& workspace() {
  thread_local Workspace<T> ws;
  return ws;
}

// Cube root of y in [eps, ~1] (eps = 0.008856; y <= eps takes the linear branch, whose lanes
// compute a discarded value here): a bit-level first guess, then Halley steps in double
// (cubic convergence: 3% -> 1e-5 -> 1e-15 -> rounding), rounded to T. Branch-free so the row
// loop vectorises; libm's cbrt is a scalar call and took longer than the rest of the kernel.
template <typename T>
inline T cube_root(T y) {
  // y >= 0; + 1e-30 keeps the discarded lanes (y = 0) finite and leaves y >= eps unchanged
  // (a plain std::max here stops GCC from vectorising the row loop).
  const float yf = static_cast<float>(y) + 1e-30f;
  uint32_t bits;
  std::memcpy(&bits, &yf, sizeof bits);
  bits = bits / 3u + 709921077u;
  float guess;
  std::memcpy(&guess, &bits, sizeof guess);
  const double x = static_cast<double>(y);
  double t = guess;
  constexpr int steps = sizeof(T) == 4 ? 2 : 3;
  for (int k = 0; k < steps; ++k) {
    const double t3 = t * t * t;
    t = t * (t3 + 2.0 * x) / (2.0 * t3 + x);
  }
  return static_cast<T>(t);
}

// cond ? a : b by bit masks: GCC (without -ffast-math) does not vectorise a floating-point
// select in this loop, but does vectorise the integer one; exact either way.
template <typename T>
inline T select_bits(bool cond, T a, T b) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U mask = U(0) - U(cond);
  const U bits = (ua & mask) | (ub & ~mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// out + src * wk: rounded once with FMA (as torch's vectorised add_(alpha=...) on an FMA CPU),
// or product then sum.
template <bool UseFma, typename T>
inline T madd(T out, T src, T wk) {
  if constexpr (UseFma) {
    return std::fma(src, wk, out);
  } else {
    return out + T(src * wk);
  }
}

template <bool UseFma, typename T>
__attribute__((always_inline)) inline void descriptors(const uint8_t* img, int64_t gh, int64_t gw, int64_t p, const std::vector<T>& w,
                 const T* red_green, const T* blue, T eps, T kappa, T* lam_max, T* lam_min,
                 T* light_out) {
  const int64_t h = gh * p, wd = gw * p;
  const int64_t r = static_cast<int64_t>(w.size()) / 2;
  const int64_t pw = wd + 2 * r;  // padded row length
  Workspace<T>& ws = workspace<T>();
  ws.padded.resize(static_cast<size_t>((h + 2 * r) * pw));
  ws.smoothed.resize(static_cast<size_t>((h + 2) * (wd + 2)));
  ws.line.resize(static_cast<size_t>(pw));
  ws.sums.assign(static_cast<size_t>(4 * wd), 0.0);
  T* padded = ws.padded.data();
  T* smoothed = ws.smoothed.data();
  T* line = ws.line.data();

  // Lightness into the interior of the padded buffer: the table lookups (scalar) into a line
  // buffer, then f and L over the row (vectorisable).
  const T c116 = T(116.0), c16 = T(16.0), c16_116 = T(16.0 / 116.0);
  for (int64_t i = 0; i < h; ++i) {
    const uint8_t* px = img + i * wd * 3;
    T* out = padded + (i + r) * pw + r;
    for (int64_t j = 0; j < wd; ++j) {
      const uint8_t* q = px + 3 * j;
      line[j] = red_green[q[0] + 256 * q[1]] + blue[q[2]];
    }
    for (int64_t j = 0; j < wd; ++j) {
      const T y = line[j];
      const T root = cube_root(y), linear = T(y * kappa) + c16_116;
      const T f = select_bits(y <= eps, linear, root);
      out[j] = T(f * c116) - c16;
    }
    for (int64_t j = 0; j < r; ++j) {  // left and right reflect columns
      out[-r + j] = out[reflect_index(j - r, wd)];
      out[wd + j] = out[reflect_index(wd + j, wd)];
    }
  }
  for (int64_t k = 0; k < r; ++k) {  // top and bottom reflect rows (whole rows: corners follow)
    const int64_t top = k - r, bottom = h + k;
    std::copy(padded + (reflect_index(top, h) + r) * pw, padded + (reflect_index(top, h) + r + 1) * pw,
              padded + (top + r) * pw);
    std::copy(padded + (reflect_index(bottom, h) + r) * pw,
              padded + (reflect_index(bottom, h) + r + 1) * pw, padded + (bottom + r) * pw);
  }

  // Gaussian: rows (along the height) into the line buffer, then columns into smoothed.
  const int64_t sw = wd + 2;
  for (int64_t i = 0; i < h; ++i) {
    bool first = true;
    for (size_t k = 0; k < w.size(); ++k) {
      const T wk = w[k];
      if (wk == T(0)) continue;
      const T* src = padded + (i + static_cast<int64_t>(k)) * pw;
      if (first) {
        for (int64_t j = 0; j < pw; ++j) line[j] = src[j] * wk;
        first = false;
      } else {
        for (int64_t j = 0; j < pw; ++j) line[j] = madd<UseFma>(line[j], src[j], wk);
      }
    }
    T* out = smoothed + (i + 1) * sw + 1;
    first = true;
    for (size_t k = 0; k < w.size(); ++k) {
      const T wk = w[k];
      if (wk == T(0)) continue;
      const T* src = line + k;
      if (first) {
        for (int64_t j = 0; j < wd; ++j) out[j] = src[j] * wk;
        first = false;
      } else {
        for (int64_t j = 0; j < wd; ++j) out[j] = madd<UseFma>(out[j], src[j], wk);
      }
    }
    out[-1] = out[0];
    out[wd] = out[wd - 1];
  }
  std::copy(smoothed + sw, smoothed + 2 * sw, smoothed);
  std::copy(smoothed + h * sw, smoothed + (h + 1) * sw, smoothed + (h + 1) * sw);

  // Sobel and products one output row at a time, added column by column into float64 row
  // sums over the patch row's P rows; each patch's P columns are summed at the patch row's end.
  double* sxx = ws.sums.data();
  double* sxy = sxx + wd;
  double* syy = sxy + wd;
  double* sl = syy + wd;
  const T two = T(2.0);
  const double inv_area = 1.0 / static_cast<double>(p * p);
  for (int64_t i = 0; i < h; ++i) {
    const T* a = smoothed + i * sw;
    const T* b = a + sw;
    const T* c = b + sw;
    for (int64_t j = 0; j < wd; ++j) {
      const T gx = T(T(a[j + 2] - a[j]) + T(two * T(b[j + 2] - b[j]))) + T(c[j + 2] - c[j]);
      const T gy = T(T(c[j] - a[j]) + T(two * T(c[j + 1] - a[j + 1]))) + T(c[j + 2] - a[j + 2]);
      sxx[j] += static_cast<double>(T(gx * gx));
      sxy[j] += static_cast<double>(T(gx * gy));
      syy[j] += static_cast<double>(T(gy * gy));
      sl[j] += static_cast<double>(b[j + 1]);
    }
    if ((i + 1) % p == 0) {
      const int64_t row = i / p;
      for (int64_t pc = 0; pc < gw; ++pc) {
        double axx = 0.0, axy = 0.0, ayy = 0.0, al = 0.0;
        for (int64_t j = pc * p; j < (pc + 1) * p; ++j) {
          axx += sxx[j];
          axy += sxy[j];
          ayy += syy[j];
          al += sl[j];
        }
        const T jxx = T(axx * inv_area), jxy = T(axy * inv_area), jyy = T(ayy * inv_area);
        const T half_trace = T(0.5) * T(jxx + jyy);
        const T radius = std::hypot(T(T(0.5) * T(jxx - jyy)), jxy);
        const T hi = half_trace + radius, lo = half_trace - radius;
        lam_max[row * gw + pc] = hi > T(0) ? hi : T(0);
        lam_min[row * gw + pc] = lo > T(0) ? lo : T(0);
        light_out[row * gw + pc] = T(al * inv_area);
      }
      std::fill(sxx, sxx + 4 * wd, 0.0);
    }
  }
}

// The lightness stage must not contract 116 f - 16 into an FMA (the NumPy path rounds twice):
// it is compiled without FMA in both variants below because only madd() asks for one.
template <typename T>
void descriptors_generic(const uint8_t* img, int64_t gh, int64_t gw, int64_t p,
                         const std::vector<T>& w, const T* rg, const T* bl, T eps, T kappa,
                         T* a, T* b, T* c) {
  descriptors<false, T>(img, gh, gw, p, w, rg, bl, eps, kappa, a, b, c);
}

// x86-64 CPUs with AVX2+FMA (chosen at run time: wheels keep the SSE2 baseline): the Gaussian
// taps fused as torch's vectorised kernels do, and 256-bit vectors.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KAWHI_SGUF_HAVE_FMA_VARIANT 1
template <typename T>
__attribute__((target("avx2,fma"))) void descriptors_fma(
    const uint8_t* img, int64_t gh, int64_t gw, int64_t p, const std::vector<T>& w, const T* rg,
    const T* bl, T eps, T kappa, T* a, T* b, T* c) {
  descriptors<true, T>(img, gh, gw, p, w, rg, bl, eps, kappa, a, b, c);
}
#endif

bool cpu_has_fma() {
#ifdef KAWHI_SGUF_HAVE_FMA_VARIANT
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

template <typename T>
py::tuple descriptors_py(const py::array& image, int64_t gh, int64_t gw, int64_t p,
                         const py::array_t<double, py::array::c_style | py::array::forcecast>& kernel,
                         const py::array& red_green, const py::array& blue, double eps,
                         double kappa) {
  if (gh < 1 || gw < 1 || p < 1)
    throw py::value_error("gh, gw, p: expected positive ints, got " + std::to_string(gh) + ", " +
                          std::to_string(gw) + ", " + std::to_string(p));
  auto img = py::array_t<uint8_t, py::array::c_style>::ensure(image);
  if (!img || img.ndim() != 3 || img.shape(0) != gh * p || img.shape(1) != gw * p ||
      img.shape(2) != 3)
    throw py::value_error("image: expected a C-contiguous uint8 array [gh*p, gw*p, 3] = [" +
                          std::to_string(gh * p) + ", " + std::to_string(gw * p) + ", 3]");
  auto rg = py::array_t<T, py::array::c_style>::ensure(red_green);
  auto bl = py::array_t<T, py::array::c_style>::ensure(blue);
  if (!rg || rg.ndim() != 1 || rg.shape(0) != 65536)
    throw py::value_error("red_green: expected a 1-D table of 65536 entries of the output dtype");
  if (!bl || bl.ndim() != 1 || bl.shape(0) != 256)
    throw py::value_error("blue: expected a 1-D table of 256 entries of the output dtype");
  if (kernel.ndim() != 1 || kernel.shape(0) % 2 != 1)
    throw py::value_error("kernel: expected a 1-D float64 array with an odd number of taps");
  const int64_t radius = kernel.shape(0) / 2;
  std::vector<T> w(static_cast<size_t>(kernel.shape(0)));
  for (size_t k = 0; k < w.size(); ++k) w[k] = static_cast<T>(kernel.data()[k]);
  (void)radius;
  const py::ssize_t n = static_cast<py::ssize_t>(gh * gw);
  py::array_t<T> lam_max(n), lam_min(n), light(n);
  T* pmax = lam_max.mutable_data();
  T* pmin = lam_min.mutable_data();
  T* pl = light.mutable_data();
  {
    py::gil_scoped_release release;
#ifdef KAWHI_SGUF_HAVE_FMA_VARIANT
    if (cpu_has_fma()) {
      descriptors_fma<T>(img.data(), gh, gw, p, w, rg.data(), bl.data(), static_cast<T>(eps),
                         static_cast<T>(kappa), pmax, pmin, pl);
    } else
#endif
      descriptors_generic<T>(img.data(), gh, gw, p, w, rg.data(), bl.data(), static_cast<T>(eps),
                             static_cast<T>(kappa), pmax, pmin, pl);
  }
  return py::make_tuple(lam_max, lam_min, light);
}

}  // namespace

void bind_sguf_cpu(py::module_& m) {
  const char* doc = R"doc(SGUF patch descriptors of one uint8 RGB image [gh*p, gw*p, 3] on the CPU
(single-threaded, fused). kernel: float64 Gaussian taps (odd count); red_green [65536] (index
r + 256 g) and blue [256]: luminance tables of the output dtype; eps, kappa: CIELab constants.
Returns (lam_max, lam_min, lightness), each [gh*gw] of the tables' dtype.)doc";
  m.def("sguf_descriptors_cpu_f32", &descriptors_py<float>, py::arg("image"), py::arg("gh"),
        py::arg("gw"), py::arg("p"), py::arg("kernel"), py::arg("red_green"), py::arg("blue"),
        py::arg("eps"), py::arg("kappa"), doc);
  m.def("sguf_descriptors_cpu_f64", &descriptors_py<double>, py::arg("image"), py::arg("gh"),
        py::arg("gw"), py::arg("p"), py::arg("kernel"), py::arg("red_green"), py::arg("blue"),
        py::arg("eps"), py::arg("kappa"), doc);
}

}  // namespace kawhi
