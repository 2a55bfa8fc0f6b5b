/* fq_params.c - the rules of the op's parameters, written once in C: the
 * bit-width range, the group layout [outer, G, inner] and the check of a
 * params struct. The CPU kernels, the CUDA launchers and the binding call
 * these; qvit/ops/contract.py states the same rules for Python.
 */
#include "qvit.h"

qvit_range_status qvit_bits_range_check(int bits_min, int bits_max, int is_signed)
{
    if (bits_min < 1 || bits_max < bits_min || bits_max > QVIT_BITS_LIMIT) {
        return QVIT_RANGE_BOUNDS;
    }
    if (is_signed && bits_min < 2) {
        return QVIT_RANGE_SIGNED;
    }
    return QVIT_RANGE_OK;
}

qvit_layout_status qvit_group_layout(const int64_t *shape, int ndim, int dim, int64_t groups,
                                     int64_t *outer, int64_t *inner)
{
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 0) {
            numel = 0;
            break;
        }
    }
    for (int i = 0; i < ndim && numel > 0; i++) {
        numel *= shape[i];  /* the caller checked that the product fits int64 */
    }
    if (groups <= 1) {
        *outer = 1;
        *inner = numel;
        return QVIT_LAYOUT_OK;
    }
    if (ndim == 0) {
        return QVIT_LAYOUT_0D;
    }
    if (dim < -ndim || dim >= ndim) {
        return QVIT_LAYOUT_DIM;
    }
    const int d = dim < 0 ? dim + ndim : dim;
    if (shape[d] % groups != 0) {
        return QVIT_LAYOUT_INDIVISIBLE;
    }
    if (numel == 0) {
        /* nothing to index; the other sizes may be huge and their partial
         * products overflow int64 (a raw capsule [0, 2^40, 2^40]) */
        *outer = 0;
        *inner = 0;
        return QVIT_LAYOUT_OK;
    }
    int64_t o = 1, n = shape[d] / groups;
    for (int i = 0; i < d; i++) {
        o *= shape[i];
    }
    for (int i = d + 1; i < ndim; i++) {
        n *= shape[i];
    }
    *outer = o;
    *inner = n;
    return QVIT_LAYOUT_OK;
}

qvit_status qvit_fq_check_params(const qvit_fq_params *p, int backward)
{
    if (!p) {
        return QVIT_ERR_BAD_ARG;
    }
    if (p->outer < 0 || p->groups < 1 || p->inner < 0) {
        return QVIT_ERR_BAD_ARG;
    }
    if (p->scale_groups != 1 && p->scale_groups != p->groups) {
        return QVIT_ERR_BAD_ARG;
    }
    if (p->is_signed != 0 && p->is_signed != 1) {
        return QVIT_ERR_BAD_ARG;
    }
    if (qvit_bits_range_check(p->bits_min, p->bits_max, p->is_signed) != QVIT_RANGE_OK) {
        return QVIT_ERR_BAD_ARG;
    }
    if (p->has_offset != 0 && p->has_offset != 1) {
        return QVIT_ERR_BAD_ARG;
    }
    if (p->grad_scale != p->grad_scale) {
        return QVIT_ERR_BAD_ARG;
    }
    /* outer * groups * inner must not overflow int64 */
    if (p->inner > 0 && p->groups > INT64_MAX / p->inner) {
        return QVIT_ERR_BAD_ARG;
    }
    if (p->outer > 0 && p->groups * p->inner > INT64_MAX / p->outer) {
        return QVIT_ERR_BAD_ARG;
    }
    switch (p->x_dtype) {
    case QVIT_F32:
    case QVIT_F16:
    case QVIT_BF16:
        if (p->param_dtype != QVIT_F32) {
            return QVIT_ERR_DTYPE;
        }
        break;
    case QVIT_F64:
        if (p->param_dtype != QVIT_F64) {
            return QVIT_ERR_DTYPE;
        }
        break;
    default:
        return QVIT_ERR_DTYPE;
    }
    if (!p->scale || !p->bits || (p->has_offset && !p->offset)) {
        return QVIT_ERR_BAD_ARG;
    }
    const int64_t n = p->outer * p->groups * p->inner;
    if (n > 0 && !p->x) {
        return QVIT_ERR_BAD_ARG;
    }
    if (backward) {
        if ((n > 0 && (!p->grad_y || !p->grad_x)) || !p->grad_scale_out || !p->grad_bits ||
            (p->has_offset && !p->grad_offset)) {
            return QVIT_ERR_BAD_ARG;
        }
    } else if (n > 0 && !p->y) {
        return QVIT_ERR_BAD_ARG;
    }
    return QVIT_OK;
}
