/* qvit.h - the C interface of the qvit kernel library.
 *
 * The only header the CPython binding includes. It declares the status codes,
 * the dtype codes, the one params struct of the fake-quant op family and the
 * CPU / CUDA entry points. Nothing here knows about Python or torch: tensors
 * arrive as raw pointers to contiguous memory plus int64 sizes.
 *
 * The op (docs/design.md section 2, the op contract): x is viewed as [outer, groups,
 * inner]; group g uses bit-width bits[g] and scale-table row
 * (scale_groups == 1 ? 0 : g). The element math lives in fq_math.h, shared
 * by CPU and CUDA.
 *
 * Work mappings. Both the CPU and the CUDA kernels pick one of two, from the
 * shape alone, and use these names for them:
 *   runs  x as outer*G contiguous runs of `inner` elements, run r belonging
 *         to group r % G (per-tensor: one run of every element). Work is
 *         cut along the flat array; inside a run the group's parameters are
 *         scalars. For G == 1 or a long inner (per-tensor, per-head).
 *   cols  x as a matrix [outer, P = G*inner]; column c belongs to group
 *         c / inner, so the parameters are vectors along a row and the work
 *         walks down the rows of a block of columns. For several groups with
 *         a short inner (per-channel inner = 1, proj input columns inner = d).
 * Where each switches (CPU: inner <= 64 takes cols; CUDA: G > 1, outer > 1
 * and inner < 1024 take cols) is a tuning choice of each device.
 */
#ifndef QVIT_H
#define QVIT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum qvit_status {
    QVIT_OK = 0,
    QVIT_ERR_BAD_ARG = 1,      /* sizes, flags or pointers inconsistent (a binding bug) */
    QVIT_ERR_BAD_SCALE = 2,    /* a scale table entry is <= 0 or not finite (CPU check) */
    QVIT_ERR_BAD_BITS = 3,     /* a bit-width is not finite (CPU check) */
    QVIT_ERR_BAD_OFFSET = 4,   /* an offset table entry is not finite (CPU check) */
    QVIT_ERR_NO_MEMORY = 5,    /* a scratch allocation failed */
    QVIT_ERR_DTYPE = 6,        /* dtype combination not compiled in */
    QVIT_ERR_NO_CUDA = 7,      /* CUDA path requested but not built */
    QVIT_ERR_CUDA = 8          /* a CUDA runtime call failed; see cuda_error */
} qvit_status;

/* Element dtypes of x / grad_y / y / grad_x. Parameters (scale, bits,
 * offset and their gradients) are QVIT_F32, or QVIT_F64 when x is QVIT_F64. */
typedef enum qvit_dtype {
    QVIT_F32 = 0,
    QVIT_F16 = 1,
    QVIT_BF16 = 2,
    QVIT_F64 = 3
} qvit_dtype;

/* One params struct for forward and backward. Fields that a direction does
 * not use are ignored (forward: grad_*; backward: y). All tensors contiguous,
 * all on the same device. */
typedef struct qvit_fq_params {
    /* shape: x viewed as [outer, groups, inner] */
    int64_t outer;
    int64_t groups;        /* G = number of bit-widths, >= 1 */
    int64_t inner;
    int64_t scale_groups;  /* rows of the scale / offset tables: 1 or groups */
    int32_t bits_min;      /* table column k holds the scale for bits_min + k */
    int32_t bits_max;      /* K = bits_max - bits_min + 1 columns */
    int32_t is_signed;     /* 1: [-2^(b-1), 2^(b-1)-1]; 0: [0, 2^b - 1] */
    int32_t has_offset;    /* offset / grad_offset present */
    /* LSQ gradient scale on the scale gradient. < 0: the default
     * 1/sqrt(outer*inner*Qp_g) per group; >= 0: this constant (1 disables). */
    double grad_scale;
    qvit_dtype x_dtype;
    qvit_dtype param_dtype;

    /* inputs */
    const void *x;         /* [outer*groups*inner], x_dtype */
    const void *grad_y;    /* backward: like x */
    const void *scale;     /* [scale_groups, K], param_dtype */
    const void *bits;      /* [groups], param_dtype */
    const void *offset;    /* [scale_groups, K] or NULL */

    /* outputs */
    void *y;               /* forward: like x */
    void *grad_x;          /* backward: like x */
    void *grad_scale_out;  /* backward: [scale_groups, K], param_dtype; inactive entries 0 */
    void *grad_bits;       /* backward: [groups], param_dtype */
    void *grad_offset;     /* backward: [scale_groups, K] or NULL */

    /* execution */
    int32_t num_threads;   /* CPU: OpenMP threads, <= 0 means the OpenMP default */
    int32_t device;        /* CUDA: device ordinal of every pointer above */
    void *stream;          /* CUDA: cudaStream_t to launch on (torch's current) */
    void *workspace;       /* CUDA backward: scratch of qvit_fq_cuda_workspace_bytes() */
    int64_t workspace_bytes;
} qvit_fq_params;

/* ------------------------------------------------------------------------
 * The rules of the parameters, one function each (fq_params.c); Python's
 * copy of them is qvit/ops/contract.py.
 *
 * Bit-widths: 1 <= bits_min <= bits_max <= QVIT_BITS_LIMIT, and bits_min >= 2
 * when signed. 24 is what the fp32 arithmetic supports: every code of
 * [Qn, Qp] is an integer the kernels hold in float, and 2^24 - 1 (unsigned,
 * b = 24) is the largest Qp whose integers a float represents exactly; at 25
 * bits rint(v) and the clamp bounds would round. */
#define QVIT_BITS_LIMIT 24

typedef enum qvit_range_status {
    QVIT_RANGE_OK = 0,
    QVIT_RANGE_BOUNDS = 1,   /* not 1 <= bits_min <= bits_max <= QVIT_BITS_LIMIT */
    QVIT_RANGE_SIGNED = 2    /* signed with bits_min < 2 */
} qvit_range_status;

qvit_range_status qvit_bits_range_check(int bits_min, int bits_max, int is_signed);

/* Layout: x of shape[ndim] split along dim into `groups` equal contiguous
 * chunks is viewed as [outer, groups, inner]; groups == 1 is [1, 1, numel]
 * whatever dim. An empty x split in groups > 1 is [0, groups, 0]. The caller
 * has checked that the element count fits int64. */
typedef enum qvit_layout_status {
    QVIT_LAYOUT_OK = 0,
    QVIT_LAYOUT_0D = 1,          /* groups > 1 and x is 0-d */
    QVIT_LAYOUT_DIM = 2,         /* dim outside [-ndim, ndim) */
    QVIT_LAYOUT_INDIVISIBLE = 3  /* shape[dim] % groups != 0 */
} qvit_layout_status;

qvit_layout_status qvit_group_layout(const int64_t *shape, int ndim, int dim, int64_t groups,
                                     int64_t *outer, int64_t *inner);

/* Checks the sizes, flags, dtypes and pointers of p for a forward
 * (backward = 0) or a backward (1); not the parameter values. QVIT_OK,
 * QVIT_ERR_BAD_ARG or QVIT_ERR_DTYPE. The CPU and the CUDA entry points both
 * start with it. */
qvit_status qvit_fq_check_params(const qvit_fq_params *p, int backward);

/* CPU. Both validate the parameter values (finite bits, finite positive
 * scales, finite offsets) before touching x. Deterministic for any
 * num_threads: partial sums are formed over fixed chunks and added in order. */
qvit_status qvit_fq_forward_cpu(const qvit_fq_params *p);
/* The x86-64 level the CPU loops run at: "v4", "v3", "v2" or "base" (the
 * CPU's, capped by the environment variable QVIT_ISA; read per call). */
const char *qvit_cpu_isa(void);
qvit_status qvit_fq_backward_cpu(const qvit_fq_params *p);

/* CUDA (present when built with QVIT_WITH_CUDA). Launch on p->stream of
 * p->device; never synchronize; never read parameters on the host. */
int qvit_cuda_built(void);
/* Number of usable devices, or a negative cudaError_t when the runtime fails
 * (no driver: a CPU-only machine). */
int qvit_cuda_device_count(void);
int64_t qvit_fq_cuda_workspace_bytes(const qvit_fq_params *p);
qvit_status qvit_fq_forward_cuda(const qvit_fq_params *p);
qvit_status qvit_fq_backward_cuda(const qvit_fq_params *p);
/* Text of the last CUDA error seen by this thread (static storage). */
const char *qvit_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* QVIT_H */
