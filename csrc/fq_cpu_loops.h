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

/* Software prefetch of the input streams, QVIT_PREFETCH_BYTES ahead, one
 * prefetch per cache line of a QVIT_LANES block (see fq_cpu.c for why). */
#ifndef QV_PREFETCH_BLOCK_DEFINED
#define QV_PREFETCH_BLOCK_DEFINED
#define QV_PREFETCH_BLOCK(p) QV_PREFETCH_AT(p, QVIT_PREFETCH_BYTES / (int64_t)sizeof(*(p)))
/* Prefetch of one QVIT_LANES block at p + ahead elements (the cols loops). */
#define QV_PREFETCH_AT(p, ahead)                                                         \
    do {                                                                                 \
        for (size_t pf_ = 0; pf_ < QVIT_LANES * sizeof(*(p)); pf_ += 64) {               \
            __builtin_prefetch((const char *)((p) + (ahead)) + pf_, 0, 3);               \
        }                                                                                \
    } while (0)
/* The same columns j0.. of the next four rows (ahead = 4 rows) of streams p0..p3. */
#define QV_PREFETCH_ROWS4(p0, p1, p2, p3, j0, ahead)                                     \
    do {                                                                                 \
        QV_PREFETCH_AT((p0) + (j0), ahead);                                              \
        QV_PREFETCH_AT((p1) + (j0), ahead);                                              \
        QV_PREFETCH_AT((p2) + (j0), ahead);                                              \
        QV_PREFETCH_AT((p3) + (j0), ahead);                                              \
    } while (0)
#endif

QV_TARGET static void QV_NAME(fwd_run)(const void *xv, void *yv, int64_t n, const void *gv)
{
    const QV_XT *x = (const QV_XT *)xv;
    QV_XT *y = (QV_XT *)yv;
    const QV_GT g = *(const QV_GT *)gv;
    const int64_t nb = n / QVIT_LANES;
    for (int64_t b = 0; b < nb; b++) {
        const QV_XT *xb = x + b * QVIT_LANES;
        QV_XT *yb = y + b * QVIT_LANES;
        QV_PREFETCH_BLOCK(xb);
        for (int l = 0; l < QVIT_LANES; l++) {
            yb[l] = QV_STORE(QV_FWD(QV_LOAD(xb[l]), g));
        }
    }
    for (int64_t i = nb * QVIT_LANES; i < n; i++) {
        y[i] = QV_STORE(QV_FWD(QV_LOAD(x[i]), g));
    }
}

/* "cols" mapping: parameters are vectors along the row; four rows at a time
 * share each parameter load. Inputs and outputs never overlap (the binding
 * checks), hence restrict, which GCC needs here to vectorise. */
QV_TARGET static inline void QV_NAME(fwd_row4)(
    const QV_XT *restrict x0, const QV_XT *restrict x1, const QV_XT *restrict x2,
    const QV_XT *restrict x3, QV_XT *restrict y0, QV_XT *restrict y1, QV_XT *restrict y2,
    QV_XT *restrict y3, int64_t w, int64_t ahead, const QV_AT *restrict s,
    const QV_AT *restrict beta, const QV_AT *restrict qn, const QV_AT *restrict qp)
{
#define QV_FWD_COL4(j)                                                                   \
    do {                                                                                 \
        QV_GT g = {s[j], beta[j], qn[j], qp[j]};                                         \
        y0[j] = QV_STORE(QV_FWD(QV_LOAD(x0[j]), g));                                     \
        y1[j] = QV_STORE(QV_FWD(QV_LOAD(x1[j]), g));                                     \
        y2[j] = QV_STORE(QV_FWD(QV_LOAD(x2[j]), g));                                     \
        y3[j] = QV_STORE(QV_FWD(QV_LOAD(x3[j]), g));                                     \
    } while (0)
    int64_t j0 = 0;
    for (; j0 + QVIT_LANES <= w; j0 += QVIT_LANES) {
        QV_PREFETCH_ROWS4(x0, x1, x2, x3, j0, ahead);
        for (int64_t j = j0; j < j0 + QVIT_LANES; j++) {
            QV_FWD_COL4(j);
        }
    }
    for (int64_t j = j0; j < w; j++) {
        QV_FWD_COL4(j);
    }
#undef QV_FWD_COL4
}

QV_TARGET static inline void QV_NAME(fwd_row)(const QV_XT *restrict x, QV_XT *restrict y,
                                              int64_t w, const QV_AT *restrict s,
                                              const QV_AT *restrict beta,
                                              const QV_AT *restrict qn,
                                              const QV_AT *restrict qp)
{
    for (int64_t j = 0; j < w; j++) {
        QV_GT g = {s[j], beta[j], qn[j], qp[j]};
        y[j] = QV_STORE(QV_FWD(QV_LOAD(x[j]), g));
    }
}

QV_TARGET static void QV_NAME(fwd_cols)(const void *xv, void *yv, int64_t rows, int64_t stride,
                                        int64_t w, const void *const prm[4])
{
    const QV_XT *x = (const QV_XT *)xv;
    QV_XT *y = (QV_XT *)yv;
    const QV_AT *s = (const QV_AT *)prm[0], *beta = (const QV_AT *)prm[1];
    const QV_AT *qn = (const QV_AT *)prm[2], *qp = (const QV_AT *)prm[3];
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const QV_XT *xr = x + r * stride;
        QV_XT *yr = y + r * stride;
        QV_NAME(fwd_row4)(xr, xr + stride, xr + 2 * stride, xr + 3 * stride, yr, yr + stride,
                          yr + 2 * stride, yr + 3 * stride, w, 4 * stride, s, beta, qn, qp);
    }
    for (; r < rows; r++) {
        QV_NAME(fwd_row)(x + r * stride, y + r * stride, w, s, beta, qn, qp);
    }
}

/* Adds the run's sums (r, hi, lo) to out[0..2]. The run is cut into
 * blocks of QVIT_LANES elements; lane l of every block adds into lane
 * accumulator l (math type); every QVIT_FLUSH blocks the lanes are added in
 * order into the double sums. */
QV_TARGET static void QV_NAME(bwd_run)(const void *xv, const void *uv, void *gxv, int64_t n,
                                       const void *gv, double out[3])
{
    const QV_XT *x = (const QV_XT *)xv;
    const QV_XT *u = (const QV_XT *)uv;
    QV_XT *gx = (QV_XT *)gxv;
    const QV_GT g = *(const QV_GT *)gv;
    const int64_t nb = n / QVIT_LANES;
    for (int64_t b0 = 0; b0 < nb; b0 += QVIT_FLUSH) {
        const int64_t b1 = nb - b0 < QVIT_FLUSH ? nb : b0 + QVIT_FLUSH;
        QV_AT ar[QVIT_LANES] = {0}, ah[QVIT_LANES] = {0}, al[QVIT_LANES] = {0};
        for (int64_t b = b0; b < b1; b++) {
            const QV_XT *xb = x + b * QVIT_LANES;
            const QV_XT *ub = u + b * QVIT_LANES;
            QV_XT *gb = gx + b * QVIT_LANES;
            QV_PREFETCH_BLOCK(xb);
            QV_PREFETCH_BLOCK(ub);
            for (int l = 0; l < QVIT_LANES; l++) {
                QV_AT r = ar[l], hi = ah[l], lo = al[l];
                gb[l] = QV_STORE(QV_BWD(QV_LOAD(xb[l]), QV_LOAD(ub[l]), g, &r, &hi, &lo));
                ar[l] = r;
                ah[l] = hi;
                al[l] = lo;
            }
        }
        for (int l = 0; l < QVIT_LANES; l++) {
            out[0] += (double)ar[l];
            out[1] += (double)ah[l];
            out[2] += (double)al[l];
        }
    }
    QV_AT tr = 0, th = 0, tl = 0;
    for (int64_t i = nb * QVIT_LANES; i < n; i++) {
        gx[i] = QV_STORE(QV_BWD(QV_LOAD(x[i]), QV_LOAD(u[i]), g, &tr, &th, &tl));
    }
    out[0] += (double)tr;
    out[1] += (double)th;
    out[2] += (double)tl;
}

/* "cols" backward, four rows at a time: column j adds the rows in row order,
 * so the sums equal those of one row at a time, bit for bit. */
QV_TARGET static inline void QV_NAME(bwd_row4)(
    const QV_XT *restrict x0, const QV_XT *restrict x1, const QV_XT *restrict x2,
    const QV_XT *restrict x3, const QV_XT *restrict u0, const QV_XT *restrict u1,
    const QV_XT *restrict u2, const QV_XT *restrict u3, QV_XT *restrict g0,
    QV_XT *restrict g1, QV_XT *restrict g2, QV_XT *restrict g3, int64_t w, int64_t ahead,
    const QV_AT *restrict s, const QV_AT *restrict beta, const QV_AT *restrict qn,
    const QV_AT *restrict qp, QV_AT *restrict ar, QV_AT *restrict ah, QV_AT *restrict al)
{
#define QV_BWD_COL4(j)                                                                   \
    do {                                                                                 \
        QV_GT g = {s[j], beta[j], qn[j], qp[j]};                                         \
        QV_AT a0 = ar[j], a1 = ah[j], a2 = al[j];                                        \
        g0[j] = QV_STORE(QV_BWD(QV_LOAD(x0[j]), QV_LOAD(u0[j]), g, &a0, &a1, &a2));      \
        g1[j] = QV_STORE(QV_BWD(QV_LOAD(x1[j]), QV_LOAD(u1[j]), g, &a0, &a1, &a2));      \
        g2[j] = QV_STORE(QV_BWD(QV_LOAD(x2[j]), QV_LOAD(u2[j]), g, &a0, &a1, &a2));      \
        g3[j] = QV_STORE(QV_BWD(QV_LOAD(x3[j]), QV_LOAD(u3[j]), g, &a0, &a1, &a2));      \
        ar[j] = a0;                                                                      \
        ah[j] = a1;                                                                      \
        al[j] = a2;                                                                      \
    } while (0)
    int64_t j0 = 0;
    for (; j0 + QVIT_LANES <= w; j0 += QVIT_LANES) {
        QV_PREFETCH_ROWS4(x0, x1, x2, x3, j0, ahead);
        QV_PREFETCH_ROWS4(u0, u1, u2, u3, j0, ahead);
        for (int64_t j = j0; j < j0 + QVIT_LANES; j++) {
            QV_BWD_COL4(j);
        }
    }
    for (int64_t j = j0; j < w; j++) {
        QV_BWD_COL4(j);
    }
#undef QV_BWD_COL4
}

/* The row loops live in their own functions with restrict parameters:
 * inlined into the loop over rows, GCC 12 reports "complicated access
 * pattern" and does not vectorise. */
QV_TARGET static inline void QV_NAME(bwd_row)(const QV_XT *restrict x, const QV_XT *restrict u,
                                              QV_XT *restrict gx, int64_t w,
                                              const QV_AT *restrict s,
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
QV_TARGET static void QV_NAME(bwd_cols)(const void *xv, const void *uv, void *gxv, int64_t rows,
                                        int64_t stride, int64_t w, const void *const prm[4],
                                        void *const acc[3])
{
    const QV_XT *x = (const QV_XT *)xv, *u = (const QV_XT *)uv;
    QV_XT *gx = (QV_XT *)gxv;
    const QV_AT *s = (const QV_AT *)prm[0], *beta = (const QV_AT *)prm[1];
    const QV_AT *qn = (const QV_AT *)prm[2], *qp = (const QV_AT *)prm[3];
    QV_AT *ar = (QV_AT *)acc[0], *ah = (QV_AT *)acc[1], *al = (QV_AT *)acc[2];
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const QV_XT *xr = x + r * stride, *ur = u + r * stride;
        QV_XT *gr = gx + r * stride;
        QV_NAME(bwd_row4)(xr, xr + stride, xr + 2 * stride, xr + 3 * stride, ur, ur + stride,
                          ur + 2 * stride, ur + 3 * stride, gr, gr + stride, gr + 2 * stride,
                          gr + 3 * stride, w, 4 * stride, s, beta, qn, qp, ar, ah, al);
    }
    for (; r < rows; r++) {
        QV_NAME(bwd_row)(x + r * stride, u + r * stride, gx + r * stride, w, s, beta, qn, qp,
                         ar, ah, al);
    }
}
