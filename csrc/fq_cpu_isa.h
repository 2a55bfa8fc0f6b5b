/* fq_cpu_isa.h - instantiates fq_cpu_loops.h for every x dtype at one ISA
 * level and defines that level's loop table, indexed by qvit_dtype.
 * fq_cpu.c includes it once per level with QV_ISA (a name suffix) and
 * QV_TARGET (the function attribute) defined. */

#define QV_AT float
#define QV_GT qvit_group_f32
#define QV_FWD qvit_fq_fwd_f32
#define QV_BWD qvit_fq_bwd_f32

#define QV_NAME(f) QV_NAME3(f, f32, QV_ISA)
#define QV_XT float
#define QV_LOAD load_f32
#define QV_STORE store_f32
#include "fq_cpu_loops.h"
#undef QV_NAME
#undef QV_XT
#undef QV_LOAD
#undef QV_STORE

#define QV_NAME(f) QV_NAME3(f, f16, QV_ISA)
#define QV_XT uint16_t
#define QV_LOAD qvit_f16_to_f32
#define QV_STORE qvit_f32_to_f16
#include "fq_cpu_loops.h"
#undef QV_NAME
#undef QV_XT
#undef QV_LOAD
#undef QV_STORE

#define QV_NAME(f) QV_NAME3(f, bf16, QV_ISA)
#define QV_XT uint16_t
#define QV_LOAD qvit_bf16_to_f32
#define QV_STORE qvit_f32_to_bf16
#include "fq_cpu_loops.h"
#undef QV_NAME
#undef QV_XT
#undef QV_LOAD
#undef QV_STORE

#undef QV_AT
#undef QV_GT
#undef QV_FWD
#undef QV_BWD

#define QV_AT double
#define QV_GT qvit_group_f64
#define QV_FWD qvit_fq_fwd_f64
#define QV_BWD qvit_fq_bwd_f64
#define QV_NAME(f) QV_NAME3(f, f64, QV_ISA)
#define QV_XT double
#define QV_LOAD load_f64
#define QV_STORE store_f64
#include "fq_cpu_loops.h"
#undef QV_NAME
#undef QV_XT
#undef QV_LOAD
#undef QV_STORE
#undef QV_AT
#undef QV_GT
#undef QV_FWD
#undef QV_BWD

#define QV_TABLE_ENTRY(d, xt, at, gt)                                                    \
    {QV_NAME3(fwd_run, d, QV_ISA), QV_NAME3(fwd_cols, d, QV_ISA),                       \
     QV_NAME3(bwd_run, d, QV_ISA), QV_NAME3(bwd_cols, d, QV_ISA), sizeof(xt), sizeof(at), \
     sizeof(gt)}

/* [QVIT_F32, QVIT_F16, QVIT_BF16, QVIT_F64] */
static const loops QV_NAME3(loops, table, QV_ISA)[4] = {
    QV_TABLE_ENTRY(f32, float, float, qvit_group_f32),
    QV_TABLE_ENTRY(f16, uint16_t, float, qvit_group_f32),
    QV_TABLE_ENTRY(bf16, uint16_t, float, qvit_group_f32),
    QV_TABLE_ENTRY(f64, double, double, qvit_group_f64),
};

#undef QV_TABLE_ENTRY
