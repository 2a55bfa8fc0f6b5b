/* fq_cuda_kernels.cuh - the device side of the CUDA fake-quant op: loads and
 * stores, group decoding, block reductions and the kernels (runs, cols,
 * finish, table). Included once, by the host launchers in fq_cuda.cu, which
 * describes the work mappings, the workspace and the launch geometry.
 */
#ifndef QVIT_FQ_CUDA_KERNELS_CUH
#define QVIT_FQ_CUDA_KERNELS_CUH

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "qvit.h"
#include "fq_math.h"

namespace {

constexpr int NT = 256;                /* threads per block of the streaming kernels */
constexpr int NWARP = NT / 32;
/* 16-byte vectors in flight per thread and input in the runs mapping: 64 bytes
 * for fp32 and for scalars, 32 for fp16 / bf16 (whose unpacked 8-lane vectors
 * would otherwise cost ~110 registers and half the occupancy). */
template <typename T, int V> struct unroll_for { static constexpr int value = (V > 1 && sizeof(T) == 2) ? 2 : 4; };
constexpr int FIN_NT = 256;            /* finish kernel: one warp per group */

/* What the warp-synchronous code assumes of the block sizes. The shuffles use
 * the full mask 0xffffffff, so every warp of a block must be full: NT and
 * FIN_NT are whole warps, and the cols mapping's block width bx (NT, or the
 * column count rounded up to a warp) with by = NT / bx keeps bx * by <= NT.
 * block_sum3 keeps one shared slot per warp (NWARP of them); the launch
 * bounds are NT and FIN_NT, which a legal block (<= 1024 threads) must not
 * exceed; fq_table_kernel's shared-memory tree halves FIN_NT down to 1, so it
 * is a power of two. */
static_assert(NT % 32 == 0 && NWARP * 32 == NT, "NT must be a whole number of warps");
static_assert(NT >= 32 && NT <= 1024, "NT must be a legal block size");
static_assert(FIN_NT % 32 == 0 && FIN_NT >= 32 && FIN_NT <= 1024,
              "FIN_NT must be a legal block of whole warps (one warp per group)");
static_assert((FIN_NT & (FIN_NT - 1)) == 0, "fq_table_kernel's tree reduction needs a power of two");

/* ---------------------------------------------------------------- dtypes */

template <typename T> struct cvt;
template <> struct cvt<float> {
    __device__ static float to_f(float v) { return v; }
    __device__ static float from_f(float v) { return v; }
};
template <> struct cvt<__half> {
    __device__ static float to_f(__half v) { return __half2float(v); }
    __device__ static __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct cvt<__nv_bfloat16> {
    __device__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float lo16_to_f(uint32_t w, __half *) { return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu))); }
__device__ __forceinline__ float hi16_to_f(uint32_t w, __half *) { return __half2float(__ushort_as_half((unsigned short)(w >> 16))); }
__device__ __forceinline__ float lo16_to_f(uint32_t w, __nv_bfloat16 *) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)(w & 0xffffu))); }
__device__ __forceinline__ float hi16_to_f(uint32_t w, __nv_bfloat16 *) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)(w >> 16))); }
__device__ __forceinline__ uint32_t f_to16(float v, __half *) { return __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ uint32_t f_to16(float v, __nv_bfloat16 *) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

/* V elements of T at p into fp32 (V == 1: a scalar; else one 16-byte vector). */
template <typename T, int V>
__device__ __forceinline__ void load_v(const T *p, float *f)
{
    if constexpr (V == 1) {
        f[0] = cvt<T>::to_f(*p);
    } else {
        static_assert(V * sizeof(T) == 16, "vector width must be 16 bytes");
        uint4 r = *reinterpret_cast<const uint4 *>(p);
        if constexpr (sizeof(T) == 4) {
            f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
            f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
        } else {
            uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                f[2 * j] = lo16_to_f(w[j], (T *)nullptr);
                f[2 * j + 1] = hi16_to_f(w[j], (T *)nullptr);
            }
        }
    }
}

template <typename T, int V>
__device__ __forceinline__ void store_v(T *p, const float *f)
{
    if constexpr (V == 1) {
        *p = cvt<T>::from_f(f[0]);
    } else {
        uint4 r;
        if constexpr (sizeof(T) == 4) {
            r.x = __float_as_uint(f[0]); r.y = __float_as_uint(f[1]);
            r.z = __float_as_uint(f[2]); r.w = __float_as_uint(f[3]);
        } else {
            uint32_t w[4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                w[j] = f_to16(f[2 * j], (T *)nullptr) | (f_to16(f[2 * j + 1], (T *)nullptr) << 16);
            r.x = w[0]; r.y = w[1]; r.z = w[2]; r.w = w[3];
        }
        *reinterpret_cast<uint4 *>(p) = r;
    }
}

/* ---------------------------------------------------------------- params */

/* What a kernel needs of qvit_fq_params, passed by value. */
struct fq_args {
    const void *x;
    const void *gy;
    void *y;
    void *gx;
    const float *scale;
    const float *bits;
    const float *offset;   /* NULL without offset */
    int64_t outer, groups, inner, scale_groups;
    int bits_min, bits_max, is_signed;
};

/* Group g's decoded parameters (see "Bad parameter values" above). */
__device__ __forceinline__ qvit_group_f32 decode_group(const fq_args &a, int64_t g)
{
    const float b = a.bits[g];
    const int bh = qvit_round_bits((double)b, a.bits_min, a.bits_max);
    const int K = a.bits_max - a.bits_min + 1;
    const int64_t e = (a.scale_groups == 1 ? 0 : g) * K + (bh - a.bits_min);
    const float s = a.scale[e];
    const float beta = a.offset ? a.offset[e] : 0.0f;
    const bool ok = isfinite(b) && isfinite(s) && s > 0.0f && isfinite(beta);
    qvit_group_f32 q;
    q.s = ok ? s : __int_as_float(0x7fc00000);
    q.beta = beta;
    q.qn = (float)qvit_qn(bh, a.is_signed);
    q.qp = (float)qvit_qp(bh, a.is_signed);
    return q;
}

/* [begin, end) of part i when n items are split into parts as evenly as possible. */
__host__ __device__ __forceinline__ int64_t split_at(int64_t n, int64_t i, int64_t parts)
{
    const int64_t q = n / parts, r = n % parts;
    return q * i + (i < r ? i : r);
}

/* Sum of v over the block in a fixed order; the result is valid in thread 0. */
__device__ __forceinline__ void block_sum3(float &r, float &h, float &l)
{
    __shared__ float sh[3][NWARP];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        r += __shfl_down_sync(0xffffffffu, r, o);
        h += __shfl_down_sync(0xffffffffu, h, o);
        l += __shfl_down_sync(0xffffffffu, l, o);
    }
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { sh[0][w] = r; sh[1][w] = h; sh[2][w] = l; }
    __syncthreads();
    if (threadIdx.x == 0) {
        r = sh[0][0]; h = sh[1][0]; l = sh[2][0];
        for (int i = 1; i < NWARP; ++i) { r += sh[0][i]; h += sh[1][i]; l += sh[2][i]; }
    }
}

/* ------------------------------------------------------ runs mapping */

/* One contiguous run of n elements of one group: forward (BWD false) or
 * backward (BWD true, accumulating into r/h/l). UNROLL vectors per thread are
 * loaded before any is used, so each thread keeps several 16-byte loads in
 * flight. In the vector path n is a multiple of V. */
template <typename T, int V, bool BWD>
__device__ __forceinline__ void do_run(const T *__restrict__ x, const T *__restrict__ u,
                                         T *__restrict__ out, int64_t n, qvit_group_f32 q,
                                         float &r, float &h, float &l)
{
    constexpr int UNROLL = unroll_for<T, V>::value;
    const int64_t stride = (int64_t)NT * V;
    int64_t i = (int64_t)threadIdx.x * V;
    for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
        float fx[UNROLL][V], fu[UNROLL][V];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            load_v<T, V>(x + i + k * stride, fx[k]);
            if constexpr (BWD) load_v<T, V>(u + i + k * stride, fu[k]);
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                if constexpr (BWD) fx[k][j] = qvit_fq_bwd_f32(fx[k][j], fu[k][j], q, &r, &h, &l);
                else fx[k][j] = qvit_fq_fwd_f32(fx[k][j], q);
            }
            store_v<T, V>(out + i + k * stride, fx[k]);
        }
    }
    for (; i < n; i += stride) {
        float fx[V], fu[V];
        load_v<T, V>(x + i, fx);
        if constexpr (BWD) load_v<T, V>(u + i, fu);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            if constexpr (BWD) fx[j] = qvit_fq_bwd_f32(fx[j], fu[j], q, &r, &h, &l);
            else fx[j] = qvit_fq_fwd_f32(fx[j], q);
        }
        store_v<T, V>(out + i, fx);
    }
}

/* Grid: groups * S blocks of NT threads. Block (g, s) owns elements
 * [split_at(outer*inner, s, S), split_at(.., s+1, S)) of group g, counted in
 * vectors so that every run starts on a vector boundary. */
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(NT) fq_runs_kernel(fq_args a, int64_t S, float *__restrict__ part)
{
    const int64_t g = (int64_t)blockIdx.x / S;
    const int64_t s = (int64_t)blockIdx.x - g * S;
    const qvit_group_f32 q = decode_group(a, g);
    const int64_t nvec = a.outer * a.inner / V;
    int64_t e = split_at(nvec, s, S) * V;
    const int64_t end = split_at(nvec, s + 1, S) * V;
    const T *x = static_cast<const T *>(a.x);
    const T *u = static_cast<const T *>(a.gy);
    T *out = static_cast<T *>(BWD ? a.gx : a.y);
    float r = 0.0f, h = 0.0f, l = 0.0f;
    while (e < end) {
        const int64_t row = e / a.inner;
        const int64_t col = e - row * a.inner;
        const int64_t n = (end - e) < (a.inner - col) ? (end - e) : (a.inner - col);
        const int64_t base = (row * a.groups + g) * a.inner + col;
        do_run<T, V, BWD>(x + base, u + base, out + base, n, q, r, h, l);
        e += n;
    }
    if constexpr (BWD) {
        block_sum3(r, h, l);
        if (threadIdx.x == 0) {
            const int64_t np = a.groups * S;
            part[blockIdx.x] = r;
            part[np + blockIdx.x] = h;
            part[2 * np + blockIdx.x] = l;
        }
    }
}

/* ------------------------------------------------------ cols mapping */

/* Block (bx, by) threads; grid (gx, gy). Thread (tx, ty) of block (cx, cy)
 * owns columns c0 .. c0+V-1, c0 = (cx*bx + tx)*V, and rows
 * r0+ty, r0+ty+by, ... of the block's row range [r0, r1). Backward writes one
 * partial per column and row chunk: part[k][cy][c], reduced over ty in order. */
template <typename T, int V, bool BWD>
__global__ void __launch_bounds__(NT) fq_cols_kernel(fq_args a, float *__restrict__ part)
{
    const int64_t P = a.groups * a.inner;
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
    const int64_t c0 = ((int64_t)blockIdx.x * bx + tx) * V;
    const bool active = c0 < P;   /* in the vector path P % V == 0: all V columns valid */
    qvit_group_f32 q[V];
#pragma unroll
    for (int j = 0; j < V; ++j)
        q[j] = decode_group(a, active ? (c0 + j) / a.inner : 0);
    float r[V], h[V], l[V];
#pragma unroll
    for (int j = 0; j < V; ++j) { r[j] = 0.0f; h[j] = 0.0f; l[j] = 0.0f; }

    const T *x = static_cast<const T *>(a.x);
    const T *u = static_cast<const T *>(a.gy);
    T *out = static_cast<T *>(BWD ? a.gx : a.y);
    const int64_t r0 = split_at(a.outer, blockIdx.y, gridDim.y);
    const int64_t r1 = split_at(a.outer, blockIdx.y + 1, gridDim.y);
    if (active) {
        constexpr int U = V == 1 ? 4 : 2;
        int64_t row = r0 + ty;
        for (; row + (U - 1) * by < r1; row += U * by) {
            float fx[U][V], fu[U][V];
#pragma unroll
            for (int k = 0; k < U; ++k) {
                const int64_t i = (row + (int64_t)k * by) * P + c0;
                load_v<T, V>(x + i, fx[k]);
                if constexpr (BWD) load_v<T, V>(u + i, fu[k]);
            }
#pragma unroll
            for (int k = 0; k < U; ++k) {
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    if constexpr (BWD) fx[k][j] = qvit_fq_bwd_f32(fx[k][j], fu[k][j], q[j], &r[j], &h[j], &l[j]);
                    else fx[k][j] = qvit_fq_fwd_f32(fx[k][j], q[j]);
                }
                store_v<T, V>(out + (row + (int64_t)k * by) * P + c0, fx[k]);
            }
        }
        for (; row < r1; row += by) {
            const int64_t i = row * P + c0;
            float fx[V], fu[V];
            load_v<T, V>(x + i, fx);
            if constexpr (BWD) load_v<T, V>(u + i, fu);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                if constexpr (BWD) fx[j] = qvit_fq_bwd_f32(fx[j], fu[j], q[j], &r[j], &h[j], &l[j]);
                else fx[j] = qvit_fq_fwd_f32(fx[j], q[j]);
            }
            store_v<T, V>(out + i, fx);
        }
    }
    if constexpr (BWD) {
        /* Reduce over ty in order: [ty][tx][j][3] in shared memory. */
        __shared__ float sh[NT * V * 3];
        if (by > 1) {
            float *mine = sh + ((int64_t)ty * bx + tx) * V * 3;
#pragma unroll
            for (int j = 0; j < V; ++j) { mine[3 * j] = r[j]; mine[3 * j + 1] = h[j]; mine[3 * j + 2] = l[j]; }
            __syncthreads();
            if (ty == 0) {
                for (int t = 1; t < by; ++t) {
                    const float *o = sh + ((int64_t)t * bx + tx) * V * 3;
#pragma unroll
                    for (int j = 0; j < V; ++j) { r[j] += o[3 * j]; h[j] += o[3 * j + 1]; l[j] += o[3 * j + 2]; }
                }
            }
        }
        if (ty == 0 && active) {
            const int64_t np = (int64_t)gridDim.y * P;
            float *pr = part + (int64_t)blockIdx.y * P + c0;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                pr[j] = r[j];
                pr[np + j] = h[j];
                pr[2 * np + j] = l[j];
            }
        }
    }
}

/* ------------------------------------------------------ finish */

struct fin_args {
    const float *scale;
    const float *bits;
    const float *offset;
    float *grad_scale;
    float *grad_bits;
    float *grad_offset;     /* NULL without offset */
    const float *part;      /* [3][n_part] */
    double *grp;            /* [3][groups] scratch for the shared-table case */
    int64_t n_part;
    int64_t groups, inner, outer, scale_groups;
    int64_t S;              /* runs mapping: partials per group */
    int64_t gy;             /* cols mapping: row chunks (0 in the runs mapping) */
    double grad_scale_const;
    int bits_min, bits_max, is_signed;
};

__device__ __forceinline__ double warp_sum_d(double v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

/* One warp per group: fixed-order fp64 sums of the group's partials, then the
 * per-group gradients. Per-group tables (scale_groups == groups) are written
 * here in full; with a shared table (scale_groups == 1 < groups) the
 * per-group values go to f.grp and fq_table_kernel sums them. */
__global__ void __launch_bounds__(FIN_NT) fq_finish_kernel(fin_args f)
{
    const int lane = threadIdx.x % 32;
    const int nw = blockDim.x / 32;
    const int K = f.bits_max - f.bits_min + 1;
    const bool shared_table = f.scale_groups == 1 && f.groups > 1;
    for (int64_t g = (int64_t)blockIdx.x * nw + threadIdx.x / 32; g < f.groups;
         g += (int64_t)gridDim.x * nw) {
        double sr = 0.0, sh = 0.0, sl = 0.0;
        if (f.gy == 0) {
#pragma unroll 4
            for (int64_t i = lane; i < f.S; i += 32) {
                const int64_t idx = g * f.S + i;
                sr += f.part[idx]; sh += f.part[f.n_part + idx]; sl += f.part[2 * f.n_part + idx];
            }
        } else {
            const int64_t P = f.groups * f.inner, n = f.gy * f.inner;
#pragma unroll 4
            for (int64_t i = lane; i < n; i += 32) {
                const int64_t cy = i / f.inner;
                const int64_t idx = cy * P + g * f.inner + (i - cy * f.inner);
                sr += f.part[idx]; sh += f.part[f.n_part + idx]; sl += f.part[2 * f.n_part + idx];
            }
        }
        sr = warp_sum_d(sr); sh = warp_sum_d(sh); sl = warp_sum_d(sl);
        sr = __shfl_sync(0xffffffffu, sr, 0);
        sh = __shfl_sync(0xffffffffu, sh, 0);
        sl = __shfl_sync(0xffffffffu, sl, 0);

        const float b = f.bits[g];
        const int bh = qvit_round_bits((double)b, f.bits_min, f.bits_max);
        const int k = bh - f.bits_min;
        const int64_t row = f.scale_groups == 1 ? 0 : g;
        const float s = f.scale[row * K + k];
        const float beta = f.offset ? f.offset[row * K + k] : 0.0f;
        const bool ok = isfinite(b) && isfinite(s) && s > 0.0f && isfinite(beta);
        const double sd = ok ? (double)s : __longlong_as_double(0x7ff8000000000000LL);
        const double qp = qvit_qp(bh, f.is_signed);
        const int64_t n_group = f.outer * f.inner;
        const double gs = n_group > 0 ? qvit_lsq_grad_scale(f.grad_scale_const, n_group, qp) * sr : 0.0;
        const double gb = f.is_signed ? qvit_bits_coef(bh, 1, sd) * (sh - sl)
                                      : qvit_bits_coef(bh, 0, sd) * sh;
        /* A poisoned group's scale / offset gradients are NaN too. */
        const double go = ok ? sh + sl : sd;
        const double gsv = ok ? gs : sd;
        if (lane == 0) f.grad_bits[g] = (float)gb;
        if (!shared_table) {
            for (int kk = lane; kk < K; kk += 32) {
                f.grad_scale[g * K + kk] = kk == k ? (float)gsv : 0.0f;
                if (f.grad_offset) f.grad_offset[g * K + kk] = kk == k ? (float)go : 0.0f;
            }
        } else if (lane == 0) {
            f.grp[g] = gsv;
            f.grp[f.groups + g] = go;
            f.grp[2 * f.groups + g] = (double)k;
        }
    }
}

/* Shared table: column kk of grad_scale / grad_offset is the sum of the
 * groups that selected it. One block; thread t adds groups t, t + NT, ... in
 * order, then a fixed shared-memory tree: deterministic. */
__global__ void __launch_bounds__(FIN_NT) fq_table_kernel(fin_args f)
{
    __shared__ double red[2][FIN_NT];
    const int t = threadIdx.x;
    const int K = f.bits_max - f.bits_min + 1;
    const int64_t G = f.groups;
    for (int kk = 0; kk < K; ++kk) {
        double as = 0.0, ao = 0.0;
        for (int64_t g = t; g < G; g += FIN_NT) {
            if (f.grp[2 * G + g] == (double)kk) { as += f.grp[g]; ao += f.grp[G + g]; }
        }
        red[0][t] = as;
        red[1][t] = ao;
        __syncthreads();
        for (int o = FIN_NT / 2; o > 0; o >>= 1) {
            if (t < o) { red[0][t] += red[0][t + o]; red[1][t] += red[1][t + o]; }
            __syncthreads();
        }
        if (t == 0) {
            f.grad_scale[kk] = (float)red[0][0];
            if (f.grad_offset) f.grad_offset[kk] = (float)red[1][0];
        }
        __syncthreads();
    }
}

}  // namespace

#endif /* QVIT_FQ_CUDA_KERNELS_CUH */
