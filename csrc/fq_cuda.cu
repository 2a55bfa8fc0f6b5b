/* fq_cuda.cu - the extern "C" launchers of the CUDA fake-quant op (host side;
 * the kernels are in fq_cuda_kernels.cuh).
 *
 * x is viewed as [outer, G, inner] (qvit.h); the element math is fq_math.h,
 * shared with the CPU kernels. Everything runs on p->stream of p->device:
 * no synchronisation, no host reads of parameters, no allocation, no memset,
 * so the op is legal inside CUDA-graph capture.
 *
 * Two work mappings, chosen from the shape alone (so the workspace size is a
 * function of (outer, G, inner, device) only):
 *
 *  runs  (G == 1, outer == 1 or inner >= RUNS_MIN_INNER): per-tensor,
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

#include <cuda_runtime.h>

#include "qvit.h"
#include "fq_cuda_kernels.cuh"

namespace {

constexpr int BLOCKS_PER_SM = 8;       /* 8 x 256 = 2048 threads: a full SM on sm_80 / sm_90 */
constexpr int64_t RUNS_MIN_INNER = 1024;
constexpr int64_t COLS_MIN_ROWS = 16;  /* rows per thread at least, in the cols mapping */
constexpr int MAX_DEVICES = 64;

thread_local char g_last_error[256] = "no error";

void set_error(const char *where, cudaError_t err)
{
    snprintf(g_last_error, sizeof g_last_error, "%s: %s (%s, code %d)", where,
             cudaGetErrorString(err), cudaGetErrorName(err), (int)err);
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
    bool runs;
    int64_t S;          /* runs: blocks per group */
    int64_t gy;         /* cols: row chunks */
    int64_t n_part;     /* partial slots per component */
    dim3 grid, block;
};

/* The cols mapping pays off with many rows of a short period; a single row
 * (weights split along dim 0) has nothing to walk down. */
bool use_runs(int64_t outer, int64_t groups, int64_t inner)
{
    return groups == 1 || outer <= 1 || inner >= RUNS_MIN_INNER;
}

plan make_plan(int64_t outer, int64_t groups, int64_t inner, int sms, int bps, int V)
{
    plan pl{};
    const int64_t target = (int64_t)sms * bps;
    pl.runs = use_runs(outer, groups, inner);
    if (pl.runs) {
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

/* The shared rules (qvit_fq_check_params), then what this build of the
 * CUDA path adds: no float64, and a device ordinal. */
qvit_status check_cuda(const qvit_fq_params *p, bool bwd)
{
    const qvit_status st = qvit_fq_check_params(p, bwd ? 1 : 0);
    if (st != QVIT_OK) return st;
    if (p->x_dtype == QVIT_F64) return QVIT_ERR_DTYPE;
    if (p->device < 0) return QVIT_ERR_BAD_ARG;
    return QVIT_OK;
}

/* One group is one run of outer*inner elements: [1, 1, outer*inner]
 * (or [0, 1, 0] when empty), whatever dim split it. */
void one_run(int64_t groups, int64_t *outer, int64_t *inner)
{
    if (groups == 1) {
        *inner = *outer * *inner;
        *outer = *inner > 0 ? 1 : 0;
    }
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
    one_run(a.groups, &a.outer, &a.inner);
    return a;
}

/* Resident blocks per SM of one kernel on the current device (immutable, cached). */
template <typename T, int V, bool BWD, bool RUNS>
qvit_status blocks_per_sm(int device, int *out)
{
    static std::atomic<int> cache[MAX_DEVICES];
    if (device < MAX_DEVICES) {
        const int c = cache[device].load(std::memory_order_relaxed);
        if (c > 0) { *out = c; return QVIT_OK; }
    }
    int nb = 0;
    const void *fn = RUNS ? (const void *)fq_runs_kernel<T, V, BWD> : (const void *)fq_cols_kernel<T, V, BWD>;
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
    const bool runs = use_runs(a.outer, a.groups, a.inner);
    int bps = 0;
    const qvit_status status = runs ? blocks_per_sm<T, V, BWD, true>(device, &bps)
                                    : blocks_per_sm<T, V, BWD, false>(device, &bps);
    if (status != QVIT_OK) return status;
    const plan pl = make_plan(a.outer, a.groups, a.inner, sms, bps, V);
    if (runs) fq_runs_kernel<T, V, BWD><<<pl.grid, pl.block, 0, st>>>(a, pl.S, part);
    else fq_cols_kernel<T, V, BWD><<<pl.grid, pl.block, 0, st>>>(a, part);
    *pl_out = pl;
    return QVIT_OK;
}

/* 16-byte vectors when every pointer is 16-byte aligned and the contiguous
 * run (inner in the runs mapping, P = G*inner in the cols mapping) is a
 * multiple of the vector width; scalars otherwise. */
template <typename T, bool BWD>
qvit_status launch_main(const fq_args &a, int device, int sms, cudaStream_t st, float *part, plan *pl)
{
    constexpr int VV = 16 / (int)sizeof(T);
    const bool al = aligned16(a.x) && aligned16(BWD ? a.gx : a.y) && (!BWD || aligned16(a.gy));
    const int64_t run = use_runs(a.outer, a.groups, a.inner) ? a.inner : a.groups * a.inner;
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
    one_run(p->groups, &outer, &inner);
    return workspace_for(outer, p->groups, inner, sms);
}

qvit_status qvit_fq_forward_cuda(const qvit_fq_params *p)
{
    qvit_status st = check_cuda(p, false);
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
    qvit_status st = check_cuda(p, true);
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
        if (pl.runs) f.S = pl.S;
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
