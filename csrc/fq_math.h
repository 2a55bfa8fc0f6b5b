/* fq_math.h - element math of the learnable fake-quant op, written once.
 *
 * Included by the CPU kernels (C) and the CUDA kernels (nvcc), which must call
 * these functions rather than restate the formulas. The pure-PyTorch
 * reference (qvit/reference.py) pins the same numerics; tests hold every
 * kernel to it.
 *
 * Per group g (b = bits[g], s = scale[row, k], beta = offset[row, k] or 0):
 *   b^   = round_half_even(clamp(b, bits_min, bits_max)),   k = b^ - bits_min
 *   signed:   Qn = -2^(b^-1), Qp = 2^(b^-1) - 1;   unsigned: Qn = 0, Qp = 2^b^ - 1
 * Forward, per element:
 *   v = (x - beta) / s                  (a true division, not x * (1/s))
 *   y = round_half_even(clamp(v, Qn, Qp)) * s + beta
 * Clamp-then-round equals round-then-clamp because Qn, Qp are integers.
 * Backward, u = dL/dy, with H = [v > Qp], L = [v < Qn], I = not (H or L)
 * (the boundary v == Qn or v == Qp is inside; NaN counts as inside):
 *   dL/dx    = I ? u : 0, and NaN where v is NaN (NaN propagates)
 *   acc_r   += u * (r - (I ? v : 0)),  r = round_half_even(clamp(v, Qn, Qp))
 *              i.e. u*(round(v) - v) inside, u*Qp above, u*Qn below
 *   acc_hi  += H ? u : 0
 *   acc_lo  += L ? u : 0
 * and per group, after the sums:
 *   dL/ds_active    = g_s * acc_r,  g_s = 1/sqrt(N_g * Qp) unless overridden
 *   dL/dbits        = s ln2 2^(b^-1) (acc_hi - acc_lo)      (signed)
 *                   = s ln2 2^b^ acc_hi                     (unsigned)
 *   dL/dbeta_active = acc_hi + acc_lo
 */
#ifndef QVIT_FQ_MATH_H
#define QVIT_FQ_MATH_H

#include <stdint.h>

#if defined(__CUDACC__)
#define QVIT_HD static __host__ __device__ __forceinline__
#else
#include <math.h>
#define QVIT_HD static inline
#endif

#define QVIT_LN2 0.693147180559945309417232121458176568

/* Decoded parameters of one group, in the arithmetic type of the element loop. */
typedef struct qvit_group_f32 {
    float s, beta, qn, qp;
} qvit_group_f32;

typedef struct qvit_group_f64 {
    double s, beta, qn, qp;
} qvit_group_f64;

/* b^ = round_half_even(clamp(bits, bits_min, bits_max)) as an int. A NaN
 * bit-width must be rejected before this point (the CPU path validates; the
 * CUDA path maps it to bits_min, see the kernels). */
QVIT_HD int qvit_round_bits(double bits, int bits_min, int bits_max)
{
    double c = bits < (double)bits_min ? (double)bits_min
             : (bits > (double)bits_max ? (double)bits_max : bits);
    c = c == c ? c : (double)bits_min;
    return (int)rint(c);
}

/* Integer range of the codes at bit-width b (exact in float for b <= 24). */
QVIT_HD double qvit_qn(int b, int is_signed)
{
    return is_signed ? -(double)((int64_t)1 << (b - 1)) : 0.0;
}

QVIT_HD double qvit_qp(int b, int is_signed)
{
    return is_signed ? (double)(((int64_t)1 << (b - 1)) - 1)
                     : (double)(((int64_t)1 << b) - 1);
}

/* d(Qp)/db^ and the bit-width gradient coefficient:
 * signed: s ln2 2^(b^-1) multiplies (acc_hi - acc_lo); unsigned: s ln2 2^b^ acc_hi. */
QVIT_HD double qvit_bits_coef(int b, int is_signed, double s)
{
    return s * QVIT_LN2 * (double)((int64_t)1 << (is_signed ? b - 1 : b));
}

/* y = round_half_even(clamp((x - beta) / s, Qn, Qp)) * s + beta.
 * Ternary clamps, not fminf/fmaxf: GCC 12 vectorises these and not those,
 * and they let NaN through to the output. */
QVIT_HD float qvit_fq_fwd_f32(float x, qvit_group_f32 g)
{
    float v = (x - g.beta) / g.s;
    float c = v < g.qn ? g.qn : v;
    c = c > g.qp ? g.qp : c;
    return rintf(c) * g.s + g.beta;
}

QVIT_HD double qvit_fq_fwd_f64(double x, qvit_group_f64 g)
{
    double v = (x - g.beta) / g.s;
    double c = v < g.qn ? g.qn : v;
    c = c > g.qp ? g.qp : c;
    return rint(c) * g.s + g.beta;
}

/* One element of the fused backward: returns dL/dx and adds into the three
 * group accumulators (see the block comment at the top). */
QVIT_HD float qvit_fq_bwd_f32(float x, float u, qvit_group_f32 g,
                              float *acc_r, float *acc_hi, float *acc_lo)
{
    float v = (x - g.beta) / g.s;
    int hi = v > g.qp;
    int lo = v < g.qn;
    int in = !(hi | lo);
    float c = lo ? g.qn : v;
    c = hi ? g.qp : c;
    float r = rintf(c);
    *acc_r += u * (r - (in ? v : 0.0f));
    *acc_hi += hi ? u : 0.0f;
    *acc_lo += lo ? u : 0.0f;
    float gx = in ? u : 0.0f;
    return v != v ? v : gx;
}

QVIT_HD double qvit_fq_bwd_f64(double x, double u, qvit_group_f64 g,
                               double *acc_r, double *acc_hi, double *acc_lo)
{
    double v = (x - g.beta) / g.s;
    int hi = v > g.qp;
    int lo = v < g.qn;
    int in = !(hi | lo);
    double c = lo ? g.qn : v;
    c = hi ? g.qp : c;
    double r = rint(c);
    *acc_r += u * (r - (in ? v : 0.0));
    *acc_hi += hi ? u : 0.0;
    *acc_lo += lo ? u : 0.0;
    double gx = in ? u : 0.0;
    return v != v ? v : gx;
}

/* The LSQ gradient scale of a group: 1/sqrt(N_g * Qp), or the override when
 * grad_scale >= 0. N_g = outer * inner elements share the group's scale. */
QVIT_HD double qvit_lsq_grad_scale(double grad_scale, int64_t n_group, double qp)
{
    return grad_scale >= 0.0 ? grad_scale : 1.0 / sqrt((double)n_group * qp);
}

#endif /* QVIT_FQ_MATH_H */
