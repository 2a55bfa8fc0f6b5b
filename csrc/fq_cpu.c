/* fq_cpu.c - CPU forward and backward of the learnable fake-quant op.
 *
 * x is viewed as [outer, G, inner] (qvit.h); the element math is the one of
 * fq_math.h. Two loop shapes cover the layouts:
 *   - "runs" (G == 1, or inner > QVIT_SMALL_INNER: per-tensor,
 *     per-head): the flat array is cut into chunks; inside a chunk every run
 *     of one group is a run processed with the group's parameters as
 *     scalars;
 *   - "cols" (G > 1 and inner small: per-channel inner = 1, proj columns
 *     inner = d): x is [outer, R = G*inner]; the parameters are expanded once
 *     to R-vectors and chunks are blocks of rows x blocks of columns, so the
 *     inner loop runs along the contiguous row with vector parameters.
 * Backward reductions are deterministic for any thread count (and ISA): the
 * chunking depends on the shape only; partial sums run in the math type
 * (fp32 for fp32/fp16/bf16 x) over at most QVIT_FLUSH terms in a fixed lane
 * or column order, are then added in order in double, and the chunk partials
 * are added in chunk order in double. Scratch is one allocation per call,
 * proportional to G (and the chunk count), never to the number of elements.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fq_math.h"
#include "half.h"
#include "qvit.h"

enum {
    QVIT_CHUNK = 16384,          /* elements per chunk (shape-only, not thread-count) */
    QVIT_SMALL_INNER = 64,       /* inner <= this: the "cols" loops */
    QVIT_COL_BLOCK = 4096,       /* max columns of a "cols" chunk */
    QVIT_PAR_MIN = 32768,        /* fewer elements: one thread */
    QVIT_LANES = 16,             /* accumulator lanes of the runs backward */
    QVIT_MIN_ROWS = 16,          /* min rows of a "cols" chunk */
    QVIT_FLUSH = 64,             /* terms a math-type (fp32) partial sum adds before it is
                                  * added to a double: bounds the rounding error of the
                                  * fp32 sums to ~64 eps of the sum of |terms| */
    QVIT_PREFETCH_BYTES = 2048   /* software prefetch distance of the input streams */
};
/* Why software prefetch: the loops do enough arithmetic per element (a true
 * division, rounding, three sums) that the hardware prefetcher alone leaves
 * the cold input streams stalling. On the 2-vCPU Xeon VM of
 * benchmarks/RESULTS.md, prefetching 2 KiB ahead (prefetcht0) took the
 * backward at 64x197x192 fp32, cold inputs, from 1.21-1.25 ms to 0.95-0.98 ms;
 * 1-4 KiB all helped, 8 KiB less, and prefetchnta made it slower. */
/* Bound on (number of chunks) x G of the backward partials (doubles x 3). */
#define QVIT_PARTIAL_BUDGET ((int64_t)1 << 18)

/* ------------------------------------------------------------------------ */
/* Hot loops: fq_cpu_loops.h instantiated per x dtype and, on x86-64 with
 * GCC, per ISA level (x86-64-v4 = AVX-512, v3 = AVX2/FMA/F16C, v2 = SSE4.2,
 * baseline). The level is chosen per call from the CPU's features, capped by
 * the environment variable QVIT_ISA ("v4", "v3", "v2", "base") to test the
 * other paths. Hand-made rather than target_clones: GCC 12 does not
 * if-convert (so does not vectorise) the backward loops inside
 * target_clones functions, while the same code under a target attribute
 * vectorises. */

static inline float load_f32(float v) { return v; }
static inline float store_f32(float v) { return v; }
static inline double load_f64(double v) { return v; }
static inline double store_f64(double v) { return v; }

/* The loops of one x dtype at one ISA level, and the sizes the drivers need. */
typedef struct loops {
    void (*fwd_run)(const void *, void *, int64_t, const void *);
    void (*fwd_cols)(const void *, void *, int64_t, int64_t, int64_t, const void *const[4]);
    void (*bwd_run)(const void *, const void *, void *, int64_t, const void *, double[3]);
    void (*bwd_cols)(const void *, const void *, void *, int64_t, int64_t, int64_t,
                     const void *const[4], void *const[3]);
    size_t xsize;  /* bytes per x element */
    size_t asize;  /* bytes of the math type: 4 (float) or 8 (double) */
    size_t gsize;  /* bytes of the group struct */
} loops;

#define QV_CAT3(a, b, c) a##_##b##_##c
#define QV_NAME3(f, d, i) QV_CAT3(f, d, i)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && \
    !defined(QVIT_NO_ISA_DISPATCH)
#define QVIT_ISA_DISPATCH 1

#define QV_ISA v4
#define QV_TARGET __attribute__((target("arch=x86-64-v4")))
#include "fq_cpu_isa.h"
#undef QV_ISA
#undef QV_TARGET

#define QV_ISA v3
#define QV_TARGET __attribute__((target("arch=x86-64-v3")))
#include "fq_cpu_isa.h"
#undef QV_ISA
#undef QV_TARGET

#define QV_ISA v2
#define QV_TARGET __attribute__((target("arch=x86-64-v2")))
#include "fq_cpu_isa.h"
#undef QV_ISA
#undef QV_TARGET
#else
#define QVIT_ISA_DISPATCH 0
#endif

#define QV_ISA base
#define QV_TARGET
#include "fq_cpu_isa.h"
#undef QV_ISA
#undef QV_TARGET

/* ISA level to run: what the CPU supports, capped by QVIT_ISA. */
static int isa_level(void)
{
#if QVIT_ISA_DISPATCH
    int level = 0;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
        level = 4;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
        level = 3;
    } else if (__builtin_cpu_supports("x86-64-v2")) {
        level = 2;
    }
    const char *cap = getenv("QVIT_ISA");
    if (cap && cap[0]) {
        int want = (cap[0] == 'v' && cap[1] >= '2' && cap[1] <= '4') ? cap[1] - '0' : 0;
        if (want < level) {
            level = want;
        }
    }
    return level;
#else
    return 0;
#endif
}

const char *qvit_cpu_isa(void)
{
    static const char *const names[5] = {"base", "base", "v2", "v3", "v4"};
    return names[isa_level()];
}

static const loops *loops_for(qvit_dtype d)
{
    if ((int)d < 0 || (int)d > 3) {
        return NULL;
    }
    switch (isa_level()) {
#if QVIT_ISA_DISPATCH
    case 4: return &loops_table_v4[d];
    case 3: return &loops_table_v3[d];
    case 2: return &loops_table_v2[d];
#endif
    default: return &loops_table_base[d];
    }
}

/* ------------------------------------------------------------------------ */
/* Parameters */

static int64_t numel_of(const qvit_fq_params *p)
{
    return p->outer * p->groups * p->inner;
}

static double param_at(const qvit_fq_params *p, const void *base, int64_t i)
{
    return p->param_dtype == QVIT_F64 ? ((const double *)base)[i]
                                      : (double)((const float *)base)[i];
}

static int finite(double v)
{
    return v - v == 0.0;  /* false for Inf and NaN */
}

/* Bits finite; every scale entry finite and > 0; every offset entry finite. */
static qvit_status check_values(const qvit_fq_params *p)
{
    int64_t k = (int64_t)(p->bits_max - p->bits_min + 1);
    int64_t n_table = p->scale_groups * k;
    for (int64_t g = 0; g < p->groups; g++) {
        if (!finite(param_at(p, p->bits, g))) {
            return QVIT_ERR_BAD_BITS;
        }
    }
    for (int64_t i = 0; i < n_table; i++) {
        double s = param_at(p, p->scale, i);
        if (!finite(s) || !(s > 0.0)) {
            return QVIT_ERR_BAD_SCALE;
        }
    }
    if (p->has_offset) {
        for (int64_t i = 0; i < n_table; i++) {
            if (!finite(param_at(p, p->offset, i))) {
                return QVIT_ERR_BAD_OFFSET;
            }
        }
    }
    return QVIT_OK;
}

/* Decoded group g: rounded bit-width, table slot, and the math-type struct. */
typedef struct group_info {
    int bhat;
    int64_t slot;   /* row * K + (bhat - bits_min) */
    double s, beta, qn, qp;
} group_info;

static group_info decode_group(const qvit_fq_params *p, int64_t g)
{
    group_info d;
    int64_t k = (int64_t)(p->bits_max - p->bits_min + 1);
    int64_t row = p->scale_groups == 1 ? 0 : g;
    d.bhat = qvit_round_bits(param_at(p, p->bits, g), p->bits_min, p->bits_max);
    d.slot = row * k + (d.bhat - p->bits_min);
    d.s = param_at(p, p->scale, d.slot);
    d.beta = p->has_offset ? param_at(p, p->offset, d.slot) : 0.0;
    d.qn = qvit_qn(d.bhat, p->is_signed);
    d.qp = qvit_qp(d.bhat, p->is_signed);
    return d;
}

/* Fills G group structs of the math type (float or double) into out. */
static void decode_groups(const qvit_fq_params *p, void *out)
{
    for (int64_t g = 0; g < p->groups; g++) {
        group_info d = decode_group(p, g);
        if (p->param_dtype == QVIT_F64) {
            qvit_group_f64 v = {d.s, d.beta, d.qn, d.qp};
            ((qvit_group_f64 *)out)[g] = v;
        } else {
            qvit_group_f32 v = {(float)d.s, (float)d.beta, (float)d.qn, (float)d.qp};
            ((qvit_group_f32 *)out)[g] = v;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Chunking (shape only) */

static int team_size(const qvit_fq_params *p, int64_t nchunks)
{
#ifdef _OPENMP
    int nt = p->num_threads > 0 ? p->num_threads : omp_get_max_threads();
#else
    int nt = 1;
#endif
    if (numel_of(p) < QVIT_PAR_MIN) {
        nt = 1;
    }
    if ((int64_t)nt > nchunks) {
        nt = (int)nchunks;
    }
    return nt < 1 ? 1 : nt;
}

static int64_t ceil_div(int64_t a, int64_t b)
{
    return a / b + (a % b != 0);
}

/* "runs" mapping: flat chunks of `len` elements. For the backward the
 * number of chunks is bounded so that nchunks * G stays within the budget. */
static int64_t run_chunk_len(const qvit_fq_params *p, int bounded)
{
    int64_t n = numel_of(p);
    int64_t len = QVIT_CHUNK;
    if (bounded) {
        int64_t max_chunks = QVIT_PARTIAL_BUDGET / p->groups;
        if (max_chunks < 1) {
            max_chunks = 1;
        }
        if (ceil_div(n, len) > max_chunks) {
            len = ceil_div(n, max_chunks);
        }
    }
    return len;
}

/* "cols" mapping: column blocks of whole groups (cols, a multiple of inner)
 * and row blocks of `rows` rows. */
typedef struct cols_plan {
    int64_t width;      /* R = G * inner */
    int64_t cols;       /* columns per block */
    int64_t nb_cols;
    int64_t rows;       /* rows per block */
    int64_t nb_rows;
} cols_plan;

static cols_plan plan_cols(const qvit_fq_params *p, int bounded)
{
    cols_plan rp;
    int64_t per = QVIT_COL_BLOCK / p->inner;
    rp.width = p->groups * p->inner;
    rp.cols = (per < 1 ? 1 : per) * p->inner;
    if (rp.cols > rp.width) {
        rp.cols = rp.width;
    }
    rp.nb_cols = ceil_div(rp.width, rp.cols);
    /* at least QVIT_MIN_ROWS rows: the per-chunk clear and column sums then
     * cost little next to the chunk's elements */
    rp.rows = QVIT_CHUNK / rp.cols;
    if (rp.rows < QVIT_MIN_ROWS) {
        rp.rows = QVIT_MIN_ROWS;
    }
    if (bounded) {
        int64_t max_blocks = QVIT_PARTIAL_BUDGET / p->groups;
        if (max_blocks < 1) {
            max_blocks = 1;
        }
        if (ceil_div(p->outer, rp.rows) > max_blocks) {
            rp.rows = ceil_div(p->outer, max_blocks);
        }
    }
    rp.nb_rows = ceil_div(p->outer, rp.rows);
    return rp;
}

/* Small inner with several groups: the "cols" loops. One group (per-tensor)
 * is always one long run. */
static int use_cols(const qvit_fq_params *p)
{
    return p->groups > 1 && p->inner <= QVIT_SMALL_INNER;
}


/* Expands the group structs to four R-vectors (s, beta, qn, qp), R = G*inner:
 * the parameters of the "cols" loops. prm holds 4*R math-type values. */
static void expand_groups(const qvit_fq_params *p, const void *groups, void *prm)
{
    const int64_t r = p->groups * p->inner;
    if (p->param_dtype == QVIT_F64) {
        const qvit_group_f64 *gs = (const qvit_group_f64 *)groups;
        double *v = (double *)prm;
        for (int64_t g = 0; g < p->groups; g++) {
            for (int64_t i = g * p->inner; i < (g + 1) * p->inner; i++) {
                v[i] = gs[g].s;
                v[r + i] = gs[g].beta;
                v[2 * r + i] = gs[g].qn;
                v[3 * r + i] = gs[g].qp;
            }
        }
    } else {
        const qvit_group_f32 *gs = (const qvit_group_f32 *)groups;
        float *v = (float *)prm;
        for (int64_t g = 0; g < p->groups; g++) {
            for (int64_t i = g * p->inner; i < (g + 1) * p->inner; i++) {
                v[i] = gs[g].s;
                v[r + i] = gs[g].beta;
                v[2 * r + i] = gs[g].qn;
                v[3 * r + i] = gs[g].qp;
            }
        }
    }
}

/* One allocation per call, carved into 64-byte aligned pieces. */
typedef struct arena {
    size_t used;
    char *base;
} arena;

static size_t arena_take(arena *a, size_t bytes)
{
    size_t at = a->used;
    a->used += (bytes + 63) & ~(size_t)63;
    return at;
}

/* ------------------------------------------------------------------------ */
/* Forward */

static void forward_run_chunk(const qvit_fq_params *p, const loops *lp, const void *groups,
                                  int64_t len, int64_t c)
{
    const int64_t n = numel_of(p);
    int64_t f = c * len;
    const int64_t end = f + len < n ? f + len : n;
    while (f < end) {
        const int64_t row = f / p->inner;
        const int64_t g = row % p->groups;
        const int64_t run_end = (row + 1) * p->inner;
        const int64_t m = (run_end < end ? run_end : end) - f;
        const size_t off = (size_t)f * lp->xsize;
        lp->fwd_run((const char *)p->x + off, (char *)p->y + off, m,
                    (const char *)groups + (size_t)g * lp->gsize);
        f += m;
    }
}

static void forward_cols_chunk(const qvit_fq_params *p, const loops *lp, const void *prm,
                               const cols_plan *rp, int64_t c)
{
    const int64_t rb = c / rp->nb_cols, cb = c % rp->nb_cols;
    const int64_t r0 = rb * rp->rows, j0 = cb * rp->cols;
    const int64_t nr = (r0 + rp->rows < p->outer ? r0 + rp->rows : p->outer) - r0;
    const int64_t w = (j0 + rp->cols < rp->width ? j0 + rp->cols : rp->width) - j0;
    const void *pv[4];
    for (int f = 0; f < 4; f++) {
        pv[f] = (const char *)prm + ((size_t)f * (size_t)rp->width + (size_t)j0) * lp->asize;
    }
    const size_t off = ((size_t)r0 * (size_t)rp->width + (size_t)j0) * lp->xsize;
    lp->fwd_cols((const char *)p->x + off, (char *)p->y + off, nr, rp->width, w, pv);
}

/* The chunk loops run without an OpenMP region when one thread does the
 * work: entering even a one-thread region costs about a microsecond. */
static void forward_run(const qvit_fq_params *p, const loops *lp, const void *groups,
                        const void *prm)
{
    if (use_cols(p)) {
        const cols_plan rp = plan_cols(p, 0);
        const int64_t nchunks = rp.nb_rows * rp.nb_cols;
        const int nt = team_size(p, nchunks);
        if (nt == 1) {
            for (int64_t c = 0; c < nchunks; c++) {
                forward_cols_chunk(p, lp, prm, &rp, c);
            }
        } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
            for (int64_t c = 0; c < nchunks; c++) {
                forward_cols_chunk(p, lp, prm, &rp, c);
            }
        }
    } else {
        const int64_t len = run_chunk_len(p, 0);
        const int64_t nchunks = ceil_div(numel_of(p), len);
        const int nt = team_size(p, nchunks);
        if (nt == 1) {
            for (int64_t c = 0; c < nchunks; c++) {
                forward_run_chunk(p, lp, groups, len, c);
            }
        } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
            for (int64_t c = 0; c < nchunks; c++) {
                forward_run_chunk(p, lp, groups, len, c);
            }
        }
    }
}

qvit_status qvit_fq_forward_cpu(const qvit_fq_params *p)
{
    qvit_status st = qvit_fq_check_params(p, 0);
    if (st != QVIT_OK) {
        return st;
    }
    st = check_values(p);
    if (st != QVIT_OK || numel_of(p) == 0) {
        return st;
    }
    const loops *lp = loops_for(p->x_dtype);
    arena a = {0, NULL};
    const size_t at_groups = arena_take(&a, (size_t)p->groups * lp->gsize);
    const size_t at_prm = use_cols(p) ? arena_take(&a, (size_t)4 * (size_t)(p->groups * p->inner)
                                                        * lp->asize)
                                      : 0;
    a.base = malloc(a.used);
    if (!a.base) {
        return QVIT_ERR_NO_MEMORY;
    }
    void *groups = a.base + at_groups;
    void *prm = use_cols(p) ? a.base + at_prm : NULL;
    decode_groups(p, groups);
    if (prm) {
        expand_groups(p, groups, prm);
    }
    forward_run(p, lp, groups, prm);
    free(a.base);
    return QVIT_OK;
}

/* ------------------------------------------------------------------------ */
/* Backward */

/* Per-thread scratch of the "cols" backward: double column sums [3][cols]
 * and math-type column sums [3][cols] of the current slice of rows. */
static size_t cols_scratch_bytes(const cols_plan *rp, const loops *lp)
{
    return (size_t)3 * (size_t)rp->cols * (sizeof(double) + lp->asize);
}

/* Chunk c of the "runs" mapping adds its runs' sums into its own
 * partial row part[c][G][3] (zeroed by the caller). */
static void backward_run_chunk(const qvit_fq_params *p, const loops *lp, const void *groups,
                                   double *part, int64_t len, int64_t c)
{
    const int64_t n = numel_of(p);
    int64_t f = c * len;
    const int64_t end = f + len < n ? f + len : n;
    double *pc = part + (size_t)c * (size_t)p->groups * 3;
    while (f < end) {
        const int64_t row = f / p->inner;
        const int64_t g = row % p->groups;
        const int64_t run_end = (row + 1) * p->inner;
        const int64_t m = (run_end < end ? run_end : end) - f;
        const size_t off = (size_t)f * lp->xsize;
        lp->bwd_run((const char *)p->x + off, (const char *)p->grad_y + off,
                    (char *)p->grad_x + off, m, (const char *)groups + (size_t)g * lp->gsize,
                    pc + g * 3);
        f += m;
    }
}

/* Chunk c = (row block rb, column block cb) of the "cols" mapping. Column
 * blocks hold whole groups, so each entry part[rb][g] is written by exactly
 * one chunk. `mine` is the calling thread's scratch (cols_scratch_bytes). */
static void backward_cols_chunk(const qvit_fq_params *p, const loops *lp, const void *prm,
                                const cols_plan *rp, double *part, char *mine, int64_t c)
{
    const int64_t rb = c / rp->nb_cols, cb = c % rp->nb_cols;
    const int64_t r0 = rb * rp->rows, j0 = cb * rp->cols;
    const int64_t nr = (r0 + rp->rows < p->outer ? r0 + rp->rows : p->outer) - r0;
    const int64_t w = (j0 + rp->cols < rp->width ? j0 + rp->cols : rp->width) - j0;
    double *dacc = (double *)mine;  /* [3][w] */
    char *facc = mine + (size_t)3 * (size_t)rp->cols * sizeof(double);
    const void *pv[4];
    void *av[3];
    for (int f = 0; f < 4; f++) {
        pv[f] = (const char *)prm + ((size_t)f * (size_t)rp->width + (size_t)j0) * lp->asize;
    }
    for (int f = 0; f < 3; f++) {
        av[f] = facc + (size_t)f * (size_t)w * lp->asize;
    }
    memset(dacc, 0, (size_t)3 * (size_t)w * sizeof(double));
    /* slices of QVIT_FLUSH rows sum in the math type, then fold into double:
     * the rounding of a column sum stays that of QVIT_FLUSH terms */
    for (int64_t s0 = 0; s0 < nr; s0 += QVIT_FLUSH) {
        const int64_t ns = nr - s0 < QVIT_FLUSH ? nr - s0 : QVIT_FLUSH;
        const size_t off = ((size_t)(r0 + s0) * (size_t)rp->width + (size_t)j0) * lp->xsize;
        memset(facc, 0, (size_t)3 * (size_t)w * lp->asize);
        lp->bwd_cols((const char *)p->x + off, (const char *)p->grad_y + off,
                     (char *)p->grad_x + off, ns, rp->width, w, pv, av);
        for (int f = 0; f < 3; f++) {
            double *d = dacc + (size_t)f * (size_t)w;
            if (lp->asize == sizeof(double)) {
                const double *s = (const double *)av[f];
                for (int64_t j = 0; j < w; j++) {
                    d[j] += s[j];
                }
            } else {
                const float *s = (const float *)av[f];
                for (int64_t j = 0; j < w; j++) {
                    d[j] += (double)s[j];
                }
            }
        }
    }
    /* columns -> groups, in column order */
    double *pr = part + (size_t)rb * (size_t)p->groups * 3;
    const int64_t g0 = j0 / p->inner, ng = w / p->inner;
    for (int f = 0; f < 3; f++) {
        const double *d = dacc + (size_t)f * (size_t)w;
        for (int64_t gi = 0; gi < ng; gi++) {
            double sum = 0.0;
            for (int64_t i = gi * p->inner; i < (gi + 1) * p->inner; i++) {
                sum += d[i];
            }
            pr[(g0 + gi) * 3 + f] += sum;
        }
    }
}

static void store_param(const qvit_fq_params *p, void *base, int64_t i, double v)
{
    if (p->param_dtype == QVIT_F64) {
        ((double *)base)[i] = v;
    } else {
        ((float *)base)[i] = (float)v;
    }
}

/* Per-group sums -> LSQ-scaled scale gradient, bit-width gradient, offset
 * gradient, scattered into the tables in group order (groups may share a
 * table row). sums: [G][3] = (acc_r, acc_hi, acc_lo); table: 2 * Gs * K
 * doubles of scratch. */
static void finish_backward(const qvit_fq_params *p, const double *sums, double *table)
{
    const int64_t k = (int64_t)(p->bits_max - p->bits_min + 1);
    const int64_t n_table = p->scale_groups * k;
    const int64_t n_group = p->outer * p->inner;
    double *gs = table, *go = table + n_table;
    memset(table, 0, (size_t)(2 * n_table) * sizeof(double));
    for (int64_t g = 0; g < p->groups; g++) {
        const group_info d = decode_group(p, g);
        const double acc_r = sums[g * 3], acc_hi = sums[g * 3 + 1], acc_lo = sums[g * 3 + 2];
        /* an empty group has no gradient (the LSQ factor would be 1/0) */
        const double factor =
            n_group > 0 ? qvit_lsq_grad_scale(p->grad_scale, n_group, d.qp) : 0.0;
        const double coef = qvit_bits_coef(d.bhat, p->is_signed, d.s);
        gs[d.slot] += factor * acc_r;
        go[d.slot] += acc_hi + acc_lo;
        store_param(p, p->grad_bits, g, p->is_signed ? coef * (acc_hi - acc_lo) : coef * acc_hi);
    }
    for (int64_t i = 0; i < n_table; i++) {
        store_param(p, p->grad_scale_out, i, gs[i]);
        if (p->has_offset) {
            store_param(p, p->grad_offset, i, go[i]);
        }
    }
}

qvit_status qvit_fq_backward_cpu(const qvit_fq_params *p)
{
    qvit_status st = qvit_fq_check_params(p, 1);
    if (st != QVIT_OK) {
        return st;
    }
    const int64_t n = numel_of(p);
    st = check_values(p);
    if (st != QVIT_OK) {
        return st;
    }
    const loops *lp = loops_for(p->x_dtype);
    const size_t G = (size_t)p->groups;
    const int cols = use_cols(p);
    const int64_t k = (int64_t)(p->bits_max - p->bits_min + 1);

    /* plan: chunking depends on the shape only (determinism) */
    cols_plan rp = {0, 0, 0, 0, 0};
    int64_t len = 0, nchunks = 0, nparts = 0;
    if (n > 0 && cols) {
        rp = plan_cols(p, 1);
        nchunks = rp.nb_rows * rp.nb_cols;
        nparts = rp.nb_rows;
    } else if (n > 0) {
        len = run_chunk_len(p, 1);
        nchunks = ceil_div(n, len);
        nparts = nchunks;
    }
    const int nt = nchunks > 0 ? team_size(p, nchunks) : 1;

    arena a = {0, NULL};
    const size_t at_groups = arena_take(&a, G * lp->gsize);
    const size_t at_part = arena_take(&a, (size_t)nparts * G * 3 * sizeof(double));
    const size_t at_sums = arena_take(&a, G * 3 * sizeof(double));
    const size_t at_table = arena_take(&a, (size_t)(2 * p->scale_groups * k) * sizeof(double));
    const size_t at_prm = cols ? arena_take(&a, (size_t)4 * (size_t)rp.width * lp->asize) : 0;
    const size_t scratch = cols ? cols_scratch_bytes(&rp, lp) : 0;
    const size_t at_acc = cols ? arena_take(&a, (size_t)nt * ((scratch + 63) & ~(size_t)63)) : 0;
    a.base = malloc(a.used);
    if (!a.base) {
        return QVIT_ERR_NO_MEMORY;
    }
    void *groups = a.base + at_groups;
    double *part = (double *)(a.base + at_part);
    double *sums = (double *)(a.base + at_sums);
    memset(part, 0, (size_t)nparts * G * 3 * sizeof(double));
    memset(sums, 0, G * 3 * sizeof(double));
    decode_groups(p, groups);

    if (nchunks > 0 && cols) {
        void *prm = a.base + at_prm;
        char *acc = a.base + at_acc;
        const size_t stride = (scratch + 63) & ~(size_t)63;
        expand_groups(p, groups, prm);
        if (nt == 1) {
            for (int64_t c = 0; c < nchunks; c++) {
                backward_cols_chunk(p, lp, prm, &rp, part, acc, c);
            }
        } else {
#pragma omp parallel num_threads(nt)
            {
#ifdef _OPENMP
                char *mine = acc + (size_t)omp_get_thread_num() * stride;
#else
                char *mine = acc;
#endif
#pragma omp for schedule(dynamic, 1)
                for (int64_t c = 0; c < nchunks; c++) {
                    backward_cols_chunk(p, lp, prm, &rp, part, mine, c);
                }
            }
        }
    } else if (nchunks > 0) {
        if (nt == 1) {
            for (int64_t c = 0; c < nchunks; c++) {
                backward_run_chunk(p, lp, groups, part, len, c);
            }
        } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
            for (int64_t c = 0; c < nchunks; c++) {
                backward_run_chunk(p, lp, groups, part, len, c);
            }
        }
    }
    /* chunk partials in chunk order */
    for (int64_t c = 0; c < nparts; c++) {
        const double *pc = part + (size_t)c * G * 3;
        for (size_t i = 0; i < G * 3; i++) {
            sums[i] += pc[i];
        }
    }
    finish_backward(p, sums, (double *)(a.base + at_table));
    free(a.base);
    return QVIT_OK;
}
