/* fq_cuda.cu - CUDA kernels and extern "C" launchers of the fake-quant op.
 *
 * x is viewed as [outer, G, inner] (qvit.h); the element math is fq_math.h,
 * shared with the CPU kernels. Everything runs on p->stream of p->device:
 * no synchronisation, no host reads of parameters, no allocation, no memset,
 * so the op is legal inside CUDA-graph capture.
 *
 * Two work mappings, chosen from the shape alone (so the workspace size is a
 * function of (outer, G, inner, device) only):
 *
 *  rows  (G == 1, outer == 1 or inner >= ROWS_MIN_INNER): per-tensor,
 *        per-head activations (inner = N*d), per-head / per-channel weight
 *        rows (outer = 1).
 *        The grid is G x S blocks; block (g, s) owns a balanced contiguous
 *        range of group g's outer*inner elements, so the group's parameters
 *        are decoded once into registers and its three backward sums are one
 *        block reduction, written as one partial per block: ws[3][G][S].
 *  cols  (inner small): per-channel of [T, C] (inner = 1), proj columns
 *        (inner = d). x is [outer, P] with P = G*inner; a thread owns V
 *        adjacent columns (fixed groups, decoded once) and walks the rows of
 *        its block's balanced row range. Blocks are (column tile, row chunk);
 *        the partials are per column and row chunk: ws[3][gy][P].
 *
 * A second, small kernel (finish) reduces the partials of each group in a
 * fixed order (fp64 lane sums, a fixed shuffle tree; no atomics), so two
 * backwards on the same device give bitwise equal results. It applies the LSQ
 * factor and the bit-width coefficient and writes the [Gs, K] gradient tables
 * in full (zeros in inactive entries). With a shared table (Gs == 1, G > 1)
 * several groups may select the same column: the finish stores per-group
 * values in the workspace and a third one-block kernel (table) sums, per
 * column, the groups that selected it, in a fixed order.
 *
 * Loads and stores are 16-byte vectors (4 x fp32, 8 x fp16 / bf16) when the
 * pointers are 16-byte aligned and the contiguous run (inner, or P) is a
 * multiple of the vector width; otherwise the same kernels run with scalars.
 * Indices are int64 throughout (tensors beyond 2^31 elements). Grids are one
 * full wave: the SM count (cached per device) times the resident blocks per
 * SM of the kernel (occupancy API, cached per kernel and device); blocks get
 * equal shares, so there is no tail wave. A tensor on a device other than
 * the current one is handled by switching to it and back.
 *
 * Bad parameter values: the CUDA path cannot check values without a host
 * sync, so it poisons instead. A group whose bit-width is not finite, whose
 * active scale is not finite or <= 0, or whose active offset is not finite
 * computes with scale NaN: its y, grad_x and parameter gradients are NaN
 * (visible, never a silently wrong number). The CPU path raises instead.
 * A NaN bit-width selects table column 0 for that (NaN) gradient.
 */
#include <atomic>
#include <cstdint>
#include <cstdio>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "qvit.h"
#include "fq_math.h"

namespace {

constexpr int NT = 256;                /* threads per block of the streaming kernels */
constexpr int NWARP = NT / 32;
/* 16-byte vectors in flight per thread and input in the rows mapping: 64 bytes
 * for fp32 and for scalars, 32 for fp16 / bf16 (whose unpacked 8-lane vectors
 * would otherwise cost ~110 registers and half the occupancy). */
template <typename T, int V> struct unroll_for { static constexpr int value = (V > 1 && sizeof(T) == 2) ? 2 : 4; };
constexpr int BLOCKS_PER_SM = 8;       /* 8 x 256 = 2048 threads: a full SM on sm_80 / sm_90 */
constexpr int64_t ROWS_MIN_INNER = 1024;
constexpr int64_t COLS_MIN_ROWS = 16;  /* rows per thread at least, in the cols mapping */
constexpr int FIN_NT = 256;            /* finish kernel: one warp per group */
constexpr int MAX_DEVICES = 64;

thread_local char g_last_error[256] = "no error";

void set_error(const char *where, cudaError_t err)
{
    snprintf(g_last_error, sizeof g_last_error, "%s: %s (%s, code %d)", where,
             cudaGetErrorString(err), cudaGetErrorName(err), (int)err);
}

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

/* ------------------------------------------------------ rows mapping */

/* One contiguous run of n elements of one group: forward (BWD false) or
 * backward (BWD true, accumulating into r/h/l). UNROLL vectors per thread are
 * loaded before any is used, so each thread keeps several 16-byte loads in
 * flight. In the vector path n is a multiple of V. */
template <typename T, int V, bool BWD>
__device__ __forceinline__ void run_rows(const T *__restrict__ x, const T *__restrict__ u,
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
__global__ void __launch_bounds__(NT) fq_rows_kernel(fq_args a, int64_t S, float *__restrict__ part)
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
        run_rows<T, V, BWD>(x + base, u + base, out + base, n, q, r, h, l);
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
    int64_t S;              /* rows mapping: partials per group */
    int64_t gy;             /* cols mapping: row chunks (0 in the rows mapping) */
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

/* ------------------------------------------------------ host side */

/* Multiprocessor count per device: immutable device info, cached. */
std::atomic<int> g_sm_count[MAX_DEVICES];

qvit_status sm_count(int device, int *out)
{
    if (device >= 0 && device < MAX_DEVICES) {
        const int c = g_sm_count[device].load(std::memory_order_relaxed);
        if (c > 0) { *out = c; return QVIT_OK; }
    }
    int c = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) {
        set_error("cudaDeviceGetAttribute(MultiProcessorCount)", err);
        (void)cudaGetLastError();
        return QVIT_ERR_CUDA;
    }
    if (c < 1) c = 1;
    if (device >= 0 && device < MAX_DEVICES) g_sm_count[device].store(c, std::memory_order_relaxed);
    *out = c;
    return QVIT_OK;
}

/* Launch geometry of the main kernel for bps resident blocks per SM. The
 * workspace is sized with bps = BLOCKS_PER_SM, the most that can be resident
 * (2048 threads), and V = 0, so it bounds every launch on that device whatever
 * the dtype, vector width or register use. */
struct plan {
    bool rows;
    int64_t S;          /* rows: blocks per group */
    int64_t gy;         /* cols: row chunks */
    int64_t n_part;     /* partial slots per component */
    dim3 grid, block;
};

/* The cols mapping pays off with many rows of a short period; a single row
 * (weights split along dim 0) has nothing to walk down. */
bool use_rows(int64_t outer, int64_t groups, int64_t inner)
{
    return groups == 1 || outer <= 1 || inner >= ROWS_MIN_INNER;
}

plan make_plan(int64_t outer, int64_t groups, int64_t inner, int sms, int bps, int V)
{
    plan pl{};
    const int64_t target = (int64_t)sms * bps;
    pl.rows = use_rows(outer, groups, inner);
    if (pl.rows) {
        const int64_t n = outer * inner;
        int64_t S = (target + groups - 1) / groups;
        const int64_t cap = (n + (int64_t)NT * 4 - 1) / ((int64_t)NT * 4);  /* >= 1024 elements a block */
        if (S > cap) S = cap;
        if (S < 1) S = 1;
        pl.S = S;
        pl.n_part = groups * S;
        pl.grid = dim3((unsigned)(groups * S), 1, 1);
        pl.block = dim3(NT, 1, 1);
    } else {
        /* V == 0: the bound for every V (gx >= 1 and by >= 1 only lower gy). */
        const int64_t P = groups * inner;
        const int64_t ncv = V > 0 ? (P + V - 1) / V : P;
        const int64_t bx = ncv >= NT ? NT : ((ncv + 31) / 32) * 32;
        const int64_t by = V > 0 ? NT / bx : 1;
        const int64_t gx = V > 0 ? (ncv + bx - 1) / bx : 1;
        int64_t gy = (target + gx - 1) / gx;
        const int64_t rows_cap = (outer + by * COLS_MIN_ROWS - 1) / (by * COLS_MIN_ROWS);
        if (gy > rows_cap) gy = rows_cap;
        if (gy > 65535) gy = 65535;
        if (gy < 1) gy = 1;
        pl.gy = gy;
        pl.n_part = gy * P;
        pl.grid = dim3((unsigned)gx, (unsigned)gy, 1);
        pl.block = dim3((unsigned)bx, (unsigned)by, 1);
    }
    return pl;
}

constexpr int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

/* Workspace: [3][groups] doubles, then [3][n_part] floats. */
int64_t workspace_for(int64_t outer, int64_t groups, int64_t inner, int sms)
{
    const plan pl = make_plan(outer, groups, inner, sms, BLOCKS_PER_SM, 0);
    return align_up(3 * groups * (int64_t)sizeof(double), 256) +
           align_up(3 * pl.n_part * (int64_t)sizeof(float), 256);
}

bool aligned16(const void *p) { return p == nullptr || ((uintptr_t)p & 15u) == 0; }

/* Switches to p->device for the launcher's lifetime when it differs. */
struct device_guard {
    int prev = -1;
    bool switched = false;
    qvit_status open(int device)
    {
        cudaError_t err = cudaGetDevice(&prev);
        if (err != cudaSuccess) { set_error("cudaGetDevice", err); (void)cudaGetLastError(); return QVIT_ERR_CUDA; }
        if (prev != device) {
            err = cudaSetDevice(device);
            if (err != cudaSuccess) { set_error("cudaSetDevice", err); (void)cudaGetLastError(); return QVIT_ERR_CUDA; }
            switched = true;
        }
        return QVIT_OK;
    }
    ~device_guard()
    {
        if (switched) (void)cudaSetDevice(prev);
    }
};

qvit_status check_common(const qvit_fq_params *p, bool bwd)
{
    if (!p) return QVIT_ERR_BAD_ARG;
    if (p->x_dtype != QVIT_F32 && p->x_dtype != QVIT_F16 && p->x_dtype != QVIT_BF16) return QVIT_ERR_DTYPE;
    if (p->param_dtype != QVIT_F32) return QVIT_ERR_DTYPE;
    if (p->outer < 0 || p->groups < 1 || p->inner < 0) return QVIT_ERR_BAD_ARG;
    if (p->scale_groups != 1 && p->scale_groups != p->groups) return QVIT_ERR_BAD_ARG;
    if (p->bits_min < 1 || p->bits_max < p->bits_min || p->bits_max > 30) return QVIT_ERR_BAD_ARG;
    if (p->is_signed && p->bits_min < 2) return QVIT_ERR_BAD_ARG;
    if (!p->scale || !p->bits || (p->has_offset && !p->offset)) return QVIT_ERR_BAD_ARG;
    if (p->device < 0) return QVIT_ERR_BAD_ARG;
    const int64_t n = p->outer * p->inner;
    if (p->outer > 0 && p->inner > INT64_MAX / p->outer / p->groups) return QVIT_ERR_BAD_ARG;
    if (n > 0 && !p->x) return QVIT_ERR_BAD_ARG;
    if (bwd) {
        if (n > 0 && (!p->grad_y || !p->grad_x)) return QVIT_ERR_BAD_ARG;
        if (!p->grad_scale_out || !p->grad_bits || (p->has_offset && !p->grad_offset)) return QVIT_ERR_BAD_ARG;
    } else if (n > 0 && !p->y) {
        return QVIT_ERR_BAD_ARG;
    }
    return QVIT_OK;
}

fq_args make_args(const qvit_fq_params *p)
{
    fq_args a;
    a.x = p->x; a.gy = p->grad_y; a.y = p->y; a.gx = p->grad_x;
    a.scale = static_cast<const float *>(p->scale);
    a.bits = static_cast<const float *>(p->bits);
    a.offset = p->has_offset ? static_cast<const float *>(p->offset) : nullptr;
    a.outer = p->outer; a.groups = p->groups; a.inner = p->inner;
    a.scale_groups = p->scale_groups;
    a.bits_min = p->bits_min; a.bits_max = p->bits_max; a.is_signed = p->is_signed ? 1 : 0;
    if (a.groups == 1) {  /* one group: one row of outer*inner elements */
        a.inner = a.outer * a.inner;
        a.outer = a.inner > 0 ? 1 : 0;
    }
    return a;
}

/* Resident blocks per SM of one kernel on the current device (immutable, cached). */
template <typename T, int V, bool BWD, bool ROWS>
qvit_status blocks_per_sm(int device, int *out)
{
    static std::atomic<int> cache[MAX_DEVICES];
    if (device < MAX_DEVICES) {
        const int c = cache[device].load(std::memory_order_relaxed);
        if (c > 0) { *out = c; return QVIT_OK; }
    }
    int nb = 0;
    const void *fn = ROWS ? (const void *)fq_rows_kernel<T, V, BWD> : (const void *)fq_cols_kernel<T, V, BWD>;
    const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, fn, NT, 0);
    if (err != cudaSuccess) {
        set_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
        (void)cudaGetLastError();
        return QVIT_ERR_CUDA;
    }
    nb = nb < 1 ? 1 : (nb > BLOCKS_PER_SM ? BLOCKS_PER_SM : nb);
    if (device < MAX_DEVICES) cache[device].store(nb, std::memory_order_relaxed);
    *out = nb;
    return QVIT_OK;
}

/* Sizes the grid to one full wave of the chosen kernel and launches it;
 * *pl_out tells the finish where the partials are. */
template <typename T, int V, bool BWD>
qvit_status launch_v(const fq_args &a, int device, int sms, cudaStream_t st, float *part, plan *pl_out)
{
    const bool rows = use_rows(a.outer, a.groups, a.inner);
    int bps = 0;
    const qvit_status status = rows ? blocks_per_sm<T, V, BWD, true>(device, &bps)
                                    : blocks_per_sm<T, V, BWD, false>(device, &bps);
    if (status != QVIT_OK) return status;
    const plan pl = make_plan(a.outer, a.groups, a.inner, sms, bps, V);
    if (rows) fq_rows_kernel<T, V, BWD><<<pl.grid, pl.block, 0, st>>>(a, pl.S, part);
    else fq_cols_kernel<T, V, BWD><<<pl.grid, pl.block, 0, st>>>(a, part);
    *pl_out = pl;
    return QVIT_OK;
}

/* 16-byte vectors when every pointer is 16-byte aligned and the contiguous
 * run (inner in the rows mapping, P = G*inner in the cols mapping) is a
 * multiple of the vector width; scalars otherwise. */
template <typename T, bool BWD>
qvit_status launch_main(const fq_args &a, int device, int sms, cudaStream_t st, float *part, plan *pl)
{
    constexpr int VV = 16 / (int)sizeof(T);
    const bool al = aligned16(a.x) && aligned16(BWD ? a.gx : a.y) && (!BWD || aligned16(a.gy));
    const int64_t run = use_rows(a.outer, a.groups, a.inner) ? a.inner : a.groups * a.inner;
    if (al && run % VV == 0) return launch_v<T, VV, BWD>(a, device, sms, st, part, pl);
    return launch_v<T, 1, BWD>(a, device, sms, st, part, pl);
}

qvit_status launch_status(const char *what)
{
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) { set_error(what, err); return QVIT_ERR_CUDA; }
    return QVIT_OK;
}

}  // namespace

extern "C" {

int qvit_cuda_built(void) { return 1; }

int qvit_cuda_device_count(void)
{
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        set_error("cudaGetDeviceCount", err);
        (void)cudaGetLastError();
        return -(int)err;
    }
    return n;
}

const char *qvit_cuda_last_error(void) { return g_last_error; }

/* Bytes of scratch qvit_fq_backward_cuda needs: a function of outer, groups,
 * inner and the device's SM count only (not of dtype or alignment). -1 when
 * the device cannot be queried (see qvit_cuda_last_error); 0 for bad sizes. */
int64_t qvit_fq_cuda_workspace_bytes(const qvit_fq_params *p)
{
    if (!p || p->outer < 0 || p->groups < 1 || p->inner < 0 || p->device < 0) return 0;
    int sms = 0;
    if (sm_count(p->device, &sms) != QVIT_OK) return -1;
    int64_t outer = p->outer, inner = p->inner;
    if (p->groups == 1) { inner = outer * inner; outer = inner > 0 ? 1 : 0; }
    return workspace_for(outer, p->groups, inner, sms);
}

qvit_status qvit_fq_forward_cuda(const qvit_fq_params *p)
{
    qvit_status st = check_common(p, false);
    if (st != QVIT_OK) return st;
    const fq_args a = make_args(p);
    if (a.outer * a.inner == 0) return QVIT_OK;
    device_guard guard;
    if ((st = guard.open(p->device)) != QVIT_OK) return st;
    int sms = 0;
    if ((st = sm_count(p->device, &sms)) != QVIT_OK) return st;
    cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
    plan pl;
    switch (p->x_dtype) {
    case QVIT_F32: st = launch_main<float, false>(a, p->device, sms, stream, nullptr, &pl); break;
    case QVIT_F16: st = launch_main<__half, false>(a, p->device, sms, stream, nullptr, &pl); break;
    case QVIT_BF16: st = launch_main<__nv_bfloat16, false>(a, p->device, sms, stream, nullptr, &pl); break;
    default: return QVIT_ERR_DTYPE;
    }
    if (st != QVIT_OK) return st;
    return launch_status("fake-quant forward kernel launch");
}

qvit_status qvit_fq_backward_cuda(const qvit_fq_params *p)
{
    qvit_status st = check_common(p, true);
    if (st != QVIT_OK) return st;
    const fq_args a = make_args(p);
    device_guard guard;
    if ((st = guard.open(p->device)) != QVIT_OK) return st;
    int sms = 0;
    if ((st = sm_count(p->device, &sms)) != QVIT_OK) return st;
    const int64_t need = workspace_for(a.outer, a.groups, a.inner, sms);
    if (!p->workspace || p->workspace_bytes < need || ((uintptr_t)p->workspace & 7u) != 0)
        return QVIT_ERR_BAD_ARG;
    double *grp = static_cast<double *>(p->workspace);
    float *part = reinterpret_cast<float *>(static_cast<char *>(p->workspace) +
                                            align_up(3 * a.groups * (int64_t)sizeof(double), 256));
    cudaStream_t stream = static_cast<cudaStream_t>(p->stream);

    fin_args f;
    f.scale = a.scale; f.bits = a.bits; f.offset = a.offset;
    f.grad_scale = static_cast<float *>(p->grad_scale_out);
    f.grad_bits = static_cast<float *>(p->grad_bits);
    f.grad_offset = p->has_offset ? static_cast<float *>(p->grad_offset) : nullptr;
    f.part = part; f.grp = grp;
    f.groups = a.groups; f.inner = a.inner; f.outer = a.outer; f.scale_groups = a.scale_groups;
    f.grad_scale_const = p->grad_scale;
    f.bits_min = a.bits_min; f.bits_max = a.bits_max; f.is_signed = a.is_signed;
    f.S = 0; f.gy = 0; f.n_part = 0;   /* empty x: no partials, every sum and gradient is 0 */

    if (a.outer * a.inner > 0) {
        plan pl;
        switch (p->x_dtype) {
        case QVIT_F32: st = launch_main<float, true>(a, p->device, sms, stream, part, &pl); break;
        case QVIT_F16: st = launch_main<__half, true>(a, p->device, sms, stream, part, &pl); break;
        case QVIT_BF16: st = launch_main<__nv_bfloat16, true>(a, p->device, sms, stream, part, &pl); break;
        default: return QVIT_ERR_DTYPE;
        }
        if (st != QVIT_OK) return st;
        if ((st = launch_status("fake-quant backward kernel launch")) != QVIT_OK) return st;
        f.n_part = pl.n_part;
        if (pl.rows) f.S = pl.S;
        else f.gy = pl.gy;
    }
    const unsigned blocks = (unsigned)((a.groups + FIN_NT / 32 - 1) / (FIN_NT / 32));
    fq_finish_kernel<<<blocks, FIN_NT, 0, stream>>>(f);
    if ((st = launch_status("fake-quant backward finish launch")) != QVIT_OK) return st;
    if (a.scale_groups == 1 && a.groups > 1) {
        fq_table_kernel<<<1, FIN_NT, 0, stream>>>(f);
        return launch_status("fake-quant backward table launch");
    }
    return QVIT_OK;
}

}  // extern "C"
