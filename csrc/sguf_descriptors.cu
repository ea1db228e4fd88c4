// SGUF per-patch descriptors (see ops.h), matching kawhi_kernels/regions/descriptors.py.
//
// One launch for a batch of same-size images, one thread block per P x P patch, fp32:
//  1. lightness L on the patch plus a halo of radius + 1 pixels into shared memory, at scipy
//     "reflect" positions (half-sample symmetric, periodic with period 2n, any image size);
//  2. Gaussian along y (rows first, as scipy/the reference) for the P + 2 rows around the patch;
//  3. Gaussian along x -> smoothed L on the patch plus a one-pixel ring. The reflected L is
//     symmetric about both image borders and the Gaussian is symmetric, so the ring values outside
//     the image equal scipy's reflected smoothed image: the Sobel step needs no special case;
//  4. Sobel gx = [1, 2, 1]_y * [-1, 0, 1]_x and gy = [1, 2, 1]_x * [-1, 0, 1]_y (unnormalised),
//     per-thread sums of gx^2, gx*gy, gy^2 and L over the patch pixels, a block reduction in a
//     fixed order, the closed-form eigenvalues of the mean structure tensor (clamped at 0) and the
//     mean lightness.
#include <cmath>

#include "common.cuh"
#include "ops.h"

namespace kawhi {
namespace {

constexpr int kThreads = 256;

struct SgufParams {
  const uint8_t* image;
  const float* lut;      // [3, 256]
  const float* weights;  // [2 * radius + 1]
  float* lam_max;
  float* lam_min;
  float* lightness;
  int64_t height, width, stride_b, stride_y, stride_x, stride_c;
  int64_t grid_w, patches_per_image, patch, radius;
};

// scipy "reflect" index of position p on an axis of length n (n >= 1, any p).
__device__ __forceinline__ int64_t reflect_index(int64_t p, int64_t n) {
  const int64_t period = 2 * n;
  p %= period;
  if (p < 0) p += period;
  return p >= n ? period - 1 - p : p;
}

// CIELab L of one pixel, as the reference: Y from three fp32 lookups added in channel order,
// f = Y^(1/3) above 0.008856, else 7.787 Y + 16/116, and L = 116 f - 16 (no FMA contraction,
// matching the reference's separate elementwise ops).
__device__ __forceinline__ float lightness_of(const float* lut, uint8_t r, uint8_t g, uint8_t b) {
  float y = __fadd_rn(lut[r], lut[256 + g]);
  y = __fadd_rn(y, lut[512 + b]);
  const float f = y > 0.008856f ? powf(fmaxf(y, 0.008856f), 1.0f / 3.0f)
                                : __fadd_rn(__fmul_rn(7.787f, y), 16.0f / 116.0f);
  return __fsub_rn(__fmul_rn(116.0f, f), 16.0f);
}

// Sum of `v` over the block (kThreads threads), in a fixed order; the result is in every thread.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / kWarpSize; ++w) total += scratch[w];
  return total;
}

__global__ void __launch_bounds__(kThreads) sguf_descriptor_kernel(SgufParams p) {
  extern __shared__ float smem[];
  const int64_t pp = p.patch;
  const int64_t radius = p.radius;
  const int64_t taps = 2 * radius + 1;
  const int64_t edge = pp + 2 * (radius + 1);  // L tile: rows/cols y0 - radius - 1 .. y0 + P + radius
  const int64_t inner = pp + 2;                // smoothed tile: rows/cols y0 - 1 .. y0 + P
  float* tile_l = smem;                        // [edge][edge]
  float* tile_v = tile_l + edge * edge;        // [inner][edge] after the y pass
  float* w = tile_v + inner * edge;            // [taps]
  float* scratch = w + taps;                   // [kThreads / 32] reduction scratch
  float* tile_s = tile_l;                      // [inner][inner] smoothed, reuses tile_l

  const int64_t patch_index = blockIdx.x;      // over all images: b * patches + cell
  const int64_t b = patch_index / p.patches_per_image;
  const int64_t cell = patch_index % p.patches_per_image;
  const int64_t y0 = (cell / p.grid_w) * pp;
  const int64_t x0 = (cell % p.grid_w) * pp;
  const uint8_t* img = p.image + b * p.stride_b;

  for (int64_t i = threadIdx.x; i < taps; i += blockDim.x) w[i] = p.weights[i];
  // 1. lightness on the reflected patch + halo
  for (int64_t i = threadIdx.x; i < edge * edge; i += blockDim.x) {
    const int64_t ty = i / edge, tx = i % edge;
    const int64_t y = reflect_index(y0 - radius - 1 + ty, p.height);
    const int64_t x = reflect_index(x0 - radius - 1 + tx, p.width);
    const uint8_t* px = img + y * p.stride_y + x * p.stride_x;
    tile_l[i] = lightness_of(p.lut, px[0], px[p.stride_c], px[2 * p.stride_c]);
  }
  __syncthreads();
  // 2. Gaussian along y: tile_v[o][x] = sum_a w[a] * tile_l[o + a][x]
  for (int64_t i = threadIdx.x; i < inner * edge; i += blockDim.x) {
    const int64_t o = i / edge, x = i % edge;
    float acc = w[0] * tile_l[o * edge + x];
    for (int64_t a = 1; a < taps; ++a) acc += w[a] * tile_l[(o + a) * edge + x];
    tile_v[i] = acc;
  }
  __syncthreads();
  // 3. Gaussian along x: tile_s[o][c] = sum_a w[a] * tile_v[o][c + a]
  for (int64_t i = threadIdx.x; i < inner * inner; i += blockDim.x) {
    const int64_t o = i / inner, c = i % inner;
    float acc = w[0] * tile_v[o * edge + c];
    for (int64_t a = 1; a < taps; ++a) acc += w[a] * tile_v[o * edge + c + a];
    tile_s[i] = acc;
  }
  __syncthreads();
  // 4. Sobel, structure tensor sums and lightness sum over the patch pixels
  float sxx = 0.0f, sxy = 0.0f, syy = 0.0f, sl = 0.0f;
  for (int64_t i = threadIdx.x; i < pp * pp; i += blockDim.x) {
    const int64_t y = i / pp + 1, x = i % pp + 1;  // position in tile_s
    const float* s = tile_s;
    // d/dx at rows y-1, y, y+1, then [1, 2, 1] along y (reference order)
    const float dx_up = s[(y - 1) * inner + x + 1] - s[(y - 1) * inner + x - 1];
    const float dx_mid = s[y * inner + x + 1] - s[y * inner + x - 1];
    const float dx_down = s[(y + 1) * inner + x + 1] - s[(y + 1) * inner + x - 1];
    const float gx = (dx_up + 2.0f * dx_mid) + dx_down;
    const float dy_left = s[(y + 1) * inner + x - 1] - s[(y - 1) * inner + x - 1];
    const float dy_mid = s[(y + 1) * inner + x] - s[(y - 1) * inner + x];
    const float dy_right = s[(y + 1) * inner + x + 1] - s[(y - 1) * inner + x + 1];
    const float gy = (dy_left + 2.0f * dy_mid) + dy_right;
    sxx += gx * gx;
    sxy += gx * gy;
    syy += gy * gy;
    sl += s[y * inner + x];
  }
  const float area = static_cast<float>(pp * pp);
  const float jxx = block_sum(sxx, scratch) / area;
  const float jxy = block_sum(sxy, scratch) / area;
  const float jyy = block_sum(syy, scratch) / area;
  const float light = block_sum(sl, scratch) / area;
  if (threadIdx.x == 0) {
    const float half_trace = 0.5f * (jxx + jyy);
    const float rad = hypotf(0.5f * (jxx - jyy), jxy);
    p.lam_max[patch_index] = fmaxf(half_trace + rad, 0.0f);
    p.lam_min[patch_index] = fmaxf(half_trace - rad, 0.0f);
    p.lightness[patch_index] = light;
  }
}

}  // namespace

void launch_sguf_descriptors(const SgufDescriptorArgs& a) {
  validate(a);
  const int64_t patches = a.num_images * a.grid_h * a.grid_w;
  if (patches == 0) return;
  DeviceGuard guard(a.device, "sguf_descriptors (select device)");
  const int64_t bytes = sguf_shared_bytes(a.patch, a.radius);
  int limit = 0;
  KAWHI_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device),
                   "sguf_descriptors (query shared memory)");
  if (bytes > limit)
    throw std::invalid_argument(
        "sguf_descriptors: patch size " + std::to_string(a.patch) + " with Gaussian radius " +
        std::to_string(a.radius) + " needs " + std::to_string(bytes) +
        " bytes of shared memory per block, the device allows " + std::to_string(limit) +
        "; use a smaller sigma or the torch backend");
  KAWHI_CUDA_CHECK(cudaFuncSetAttribute(sguf_descriptor_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)),
                   "sguf_descriptor_kernel (set shared memory size)");
  SgufParams p{};
  p.image = reinterpret_cast<const uint8_t*>(a.image);
  p.lut = reinterpret_cast<const float*>(a.lut);
  p.weights = reinterpret_cast<const float*>(a.weights);
  p.lam_max = reinterpret_cast<float*>(a.lam_max);
  p.lam_min = reinterpret_cast<float*>(a.lam_min);
  p.lightness = reinterpret_cast<float*>(a.lightness);
  p.height = a.height;
  p.width = a.width;
  p.stride_b = a.stride_b;
  p.stride_y = a.stride_y;
  p.stride_x = a.stride_x;
  p.stride_c = a.stride_c;
  p.grid_w = a.grid_w;
  p.patches_per_image = a.grid_h * a.grid_w;
  p.patch = a.patch;
  p.radius = a.radius;
  sguf_descriptor_kernel<<<static_cast<unsigned>(patches), kThreads, static_cast<size_t>(bytes),
                           as_stream(a.stream)>>>(p);
  KAWHI_CHECK_LAUNCH("sguf_descriptor_kernel");
}

}  // namespace kawhi
