/* fq_cpu.c - CPU forward / backward of the learnable fake-quant op. */
#include "qvit.h"
#include "fq_math.h"

qvit_status qvit_fq_check_params(const qvit_fq_params *p)
{
    if (!p || p->outer < 0 || p->groups < 1 || p->inner < 0) {
        return QVIT_ERR_BAD_ARG;
    }
    return QVIT_OK;
}

qvit_status qvit_fq_forward_cpu(const qvit_fq_params *p)
{
    (void)p;
    return QVIT_ERR_DTYPE;
}

qvit_status qvit_fq_backward_cpu(const qvit_fq_params *p)
{
    (void)p;
    return QVIT_ERR_DTYPE;
}
