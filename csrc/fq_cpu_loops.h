/* fq_cpu_loops.h - the hot loops of fq_cpu.c, one instance per (x dtype, ISA).
 *
 * Included several times by fq_cpu.c with these macros defined:
 *   QV_NAME(f)   the instance's name for loop f
 *   QV_TARGET    a function attribute choosing the ISA (or nothing)
 *   QV_XT        element type of x / y / grad_y / grad_x in memory
 *   QV_AT, QV_GT math type (float / double) and its fq_math.h group struct
 *   QV_LOAD, QV_STORE   memory type <-> math type
 *   QV_FWD, QV_BWD      the fq_math.h element functions
 * The accumulators are copied to locals around the fq_math.h call: with the
 * pointer arguments bound straight to the arrays, GCC 12 turns the
 * conditional adds into conditional stores and gives up if-conversion
 * ("control flow in loop"), i.e. no vectorisation.
 */

QV_TARGET static void QV_NAME(fwd_seg)(const void *xv, void *yv, int64_t n, const void *gv)
{
    const QV_XT *x = (const QV_XT *)xv;
    QV_XT *y = (QV_XT *)yv;
    const QV_GT g = *(const QV_GT *)gv;
    for (int64_t i = 0; i < n; i++) {
        y[i] = QV_STORE(QV_FWD(QV_LOAD(x[i]), g));
    }
}

/* One row of the "rows" layout: parameters are vectors along the row. */
QV_TARGET static inline void QV_NAME(fwd_row)(const QV_XT *x, QV_XT *y, int64_t w,
                                              const QV_AT *restrict s,
                                              const QV_AT *restrict beta,
                                              const QV_AT *restrict qn,
                                              const QV_AT *restrict qp)
{
    for (int64_t j = 0; j < w; j++) {
        QV_GT g = {s[j], beta[j], qn[j], qp[j]};
        y[j] = QV_STORE(QV_FWD(QV_LOAD(x[j]), g));
    }
}

QV_TARGET static void QV_NAME(fwd_rows)(const void *xv, void *yv, int64_t rows, int64_t stride,
                                        int64_t w, const void *const prm[4])
{
    for (int64_t r = 0; r < rows; r++) {
        QV_NAME(fwd_row)((const QV_XT *)xv + r * stride, (QV_XT *)yv + r * stride, w,
                         (const QV_AT *)prm[0], (const QV_AT *)prm[1], (const QV_AT *)prm[2],
                         (const QV_AT *)prm[3]);
    }
}

/* Adds the segment's sums (r, hi, lo) to out[0..2]. The segment is cut into
 * blocks of QVIT_LANES elements; lane l of every block adds into lane
 * accumulator l (math type), the lanes are added in order in double. */
QV_TARGET static void QV_NAME(bwd_seg)(const void *xv, const void *uv, void *gxv, int64_t n,
                                       const void *gv, double out[3])
{
    const QV_XT *x = (const QV_XT *)xv;
    const QV_XT *u = (const QV_XT *)uv;
    QV_XT *gx = (QV_XT *)gxv;
    const QV_GT g = *(const QV_GT *)gv;
    QV_AT ar[QVIT_LANES] = {0}, ah[QVIT_LANES] = {0}, al[QVIT_LANES] = {0};
    const int64_t nb = n / QVIT_LANES;
    for (int64_t b = 0; b < nb; b++) {
        const QV_XT *xb = x + b * QVIT_LANES;
        const QV_XT *ub = u + b * QVIT_LANES;
        QV_XT *gb = gx + b * QVIT_LANES;
        for (int l = 0; l < QVIT_LANES; l++) {
            QV_AT r = ar[l], hi = ah[l], lo = al[l];
            gb[l] = QV_STORE(QV_BWD(QV_LOAD(xb[l]), QV_LOAD(ub[l]), g, &r, &hi, &lo));
            ar[l] = r;
            ah[l] = hi;
            al[l] = lo;
        }
    }
    for (int64_t i = nb * QVIT_LANES; i < n; i++) {
        gx[i] = QV_STORE(QV_BWD(QV_LOAD(x[i]), QV_LOAD(u[i]), g, &ar[0], &ah[0], &al[0]));
    }
    for (int l = 0; l < QVIT_LANES; l++) {
        out[0] += (double)ar[l];
        out[1] += (double)ah[l];
        out[2] += (double)al[l];
    }
}

/* One row of the "rows" backward: per-column sums into ar / ah / al. The
 * row loop lives in its own function so that GCC 12 sees restrict-qualified
 * parameters; inlined into the row loop it reports "complicated access
 * pattern" and does not vectorise. */
QV_TARGET static inline void QV_NAME(bwd_row)(const QV_XT *x, const QV_XT *u, QV_XT *gx,
                                              int64_t w, const QV_AT *restrict s,
                                              const QV_AT *restrict beta,
                                              const QV_AT *restrict qn,
                                              const QV_AT *restrict qp, QV_AT *restrict ar,
                                              QV_AT *restrict ah, QV_AT *restrict al)
{
    for (int64_t j = 0; j < w; j++) {
        QV_GT g = {s[j], beta[j], qn[j], qp[j]};
        QV_AT a0 = ar[j], a1 = ah[j], a2 = al[j];
        gx[j] = QV_STORE(QV_BWD(QV_LOAD(x[j]), QV_LOAD(u[j]), g, &a0, &a1, &a2));
        ar[j] = a0;
        ah[j] = a1;
        al[j] = a2;
    }
}

/* Per-column sums over the rows into acc[0..2][0..w) (not cleared here). */
QV_TARGET static void QV_NAME(bwd_rows)(const void *xv, const void *uv, void *gxv, int64_t rows,
                                        int64_t stride, int64_t w, const void *const prm[4],
                                        void *const acc[3])
{
    for (int64_t r = 0; r < rows; r++) {
        QV_NAME(bwd_row)((const QV_XT *)xv + r * stride, (const QV_XT *)uv + r * stride,
                         (QV_XT *)gxv + r * stride, w, (const QV_AT *)prm[0],
                         (const QV_AT *)prm[1], (const QV_AT *)prm[2], (const QV_AT *)prm[3],
                         (QV_AT *)acc[0], (QV_AT *)acc[1], (QV_AT *)acc[2]);
    }
}
