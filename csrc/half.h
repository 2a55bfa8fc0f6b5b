/* half.h - fp16 / bf16 <-> fp32 conversions by bit manipulation.
 *
 * Branch-free (ternaries only) so that GCC vectorises loops that call them:
 * GCC 12 does not vectorise _Float16 <-> float casts without AVX512-FP16.
 * Both narrowing conversions round to nearest even, like torch's; a NaN
 * stays a (quiet) NaN with its sign.
 */
#ifndef QVIT_HALF_H
#define QVIT_HALF_H

#include <stdint.h>
#include <string.h>

static inline float qvit_bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t qvit_f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* bf16 is the top half of an fp32. */
static inline float qvit_bf16_to_f32(uint16_t h)
{
    return qvit_bits_to_f32((uint32_t)h << 16);
}

static inline uint16_t qvit_f32_to_bf16(float f)
{
    uint32_t u = qvit_f32_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* fp16 -> fp32: shift exponent and mantissa into place and rescale by
 * 2^(127-15) with one exact multiply (this also normalises subnormals);
 * Inf / NaN get the all-ones exponent back. */
static inline float qvit_f16_to_f32(uint16_t h)
{
    uint32_t em = (uint32_t)h & 0x7fffu;
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    float scaled = qvit_bits_to_f32(em << 13) * qvit_bits_to_f32(0x77800000u); /* 2^112 */
    uint32_t bits = qvit_f32_to_bits(scaled);
    bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : bits;
    return qvit_bits_to_f32(bits | sign);
}

/* fp32 -> fp16, round to nearest even. Subnormal results come from one
 * float add against a magic constant (the FPU does the rounding); normal
 * results from integer rounding of the mantissa; overflow gives Inf. */
static inline uint16_t qvit_f32_to_f16(float f)
{
    uint32_t u = qvit_f32_to_bits(f);
    uint32_t sign = u & 0x80000000u;
    uint32_t a = u ^ sign;
    /* subnormal or zero half: a < 2^-14 */
    const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float sub_f = qvit_bits_to_f32(a) + qvit_bits_to_f32(denorm_magic_bits);
    uint32_t sub = qvit_f32_to_bits(sub_f) - denorm_magic_bits;
    /* normal half */
    uint32_t odd = (a >> 13) & 1u;
    uint32_t norm = (a + ((uint32_t)(15 - 127) << 23) + 0xfffu + odd) >> 13;
    uint32_t o = a < (113u << 23) ? sub : norm;
    o = a >= (143u << 23) ? 0x7c00u : o;            /* overflow and Inf */
    o = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : o; /* NaN */
    return (uint16_t)(o | (sign >> 16));
}

#endif /* QVIT_HALF_H */
