// Runtime of the host emulation (see sim_cuda.h): scheduler, barriers, shuffles with
// masks, shared-memory poisoning, launch checks, faults, stub CUDA API.
#include "sim_cuda.h"
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
sim_idx threadIdx, blockIdx;
sim_dim3 blockDim, gridDim;
extern "C" { int sim_sms = 4, sim_bps = 2, sim_launches = 0; }
static const size_t STACK = 256 * 1024;
static ucontext_t sched_ctx;
struct th { ucontext_t ctx; bool done; unsigned tx, ty; std::vector<char> stack; };
static std::vector<th> ths;
static int cur = -1, nthreads = 0;
static std::function<void()> *body_p;
static unsigned long long bar_gen = 0, progress = 0;
static int bar_count = 0;
// per warp: shuffle rounds; values and masks double-buffered by round parity
struct warp_state { unsigned long long gen; unsigned arrived; unsigned mask[2]; double val[2][32]; };
static std::vector<warp_state> warps;
static std::vector<std::pair<void *, size_t>> shared_regions;
static std::string fault_msg, launch_log;
static bool aborted = false;

static void record_fault(const char *fmt, va_list ap)
{
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    if (fault_msg.empty()) fault_msg = buf;
}

void sim_fault(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    record_fault(fmt, ap);
    va_end(ap);
    aborted = true;
    if (cur >= 0) {
        ths[cur].done = true;
        swapcontext(&ths[cur].ctx, &sched_ctx);  // never resumed
    }
    abort();  // not inside a kernel thread: a harness bug
}

static void host_fault(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    record_fault(fmt, ap);
    va_end(ap);
    aborted = true;
}

void sim_shared(void *p, size_t bytes)
{
    for (auto &r : shared_regions)
        if (r.first == p) return;
    shared_regions.emplace_back(p, bytes);
#ifndef SIM_NO_POISON
    memset(p, 0xFF, bytes);  // first use: poisoned
#endif
}

static void yield_() { swapcontext(&ths[cur].ctx, &sched_ctx); }
static void trampoline() { (*body_p)(); ths[cur].done = true; ++progress; swapcontext(&ths[cur].ctx, &sched_ctx); }

void __syncthreads()
{
    unsigned long long g = bar_gen;
    ++progress;
    if (++bar_count == nthreads) { bar_count = 0; ++bar_gen; return; }
    while (bar_gen == g) yield_();
}

static int warp_size(int w) { int n = nthreads - w * 32; return n < 32 ? n : 32; }

double sim_shfl(unsigned mask, double v, int k, bool down)
{
    const int w = cur / 32, lane = cur % 32, wsz = warp_size(w);
    warp_state &ws = warps[w];
    if (!((mask >> lane) & 1u))
        sim_fault("lane %d of warp %d calls a shuffle with mask 0x%08x that leaves it out", lane, w, mask);
    if (wsz < 32 && (mask >> wsz) != 0)
        sim_fault("shuffle mask 0x%08x names lanes that do not exist (warp %d has %d threads)", mask, w, wsz);
    const unsigned long long g = ws.gen;
    const int par = (int)(g & 1);
    if (ws.arrived == 0) ws.mask[par] = mask;
    else if (ws.mask[par] != mask)
        sim_fault("lanes of one shuffle disagree on the mask (0x%08x vs 0x%08x)", ws.mask[par], mask);
    ws.val[par][lane] = v;
    ws.arrived |= 1u << lane;
    ++progress;
    if (ws.arrived == mask) { ws.arrived = 0; ++ws.gen; }
    else while (ws.gen == g) yield_();
    const int src = down ? lane + k : (k & 31);
    if (src >= 32) return v;  // past the end of the warp: the lane's own value
    if (!((mask >> src) & 1u))
        sim_fault("lane %d reads lane %d, which is not in the shuffle mask 0x%08x", lane, src, mask);
    return ws.val[par][src];
}

void sim_launch(sim_dim3 grid, sim_dim3 block, int bound, const char *name, std::function<void()> body)
{
    if (aborted) return;  // a faulted launch poisons the stream, as on a GPU
    ++sim_launches;
    std::string nm(name);
    const size_t a = nm.find("K = "), b = nm.rfind(']');
    if (a != std::string::npos && b != std::string::npos && b > a) nm = nm.substr(a + 4, b - a - 4);
    const size_t ns = nm.rfind("::", nm.find('<'));  // "{anonymous}::fq_rows_kernel<...>"
    if (ns != std::string::npos) nm = nm.substr(ns + 2);
    char rec[160];
    snprintf(rec, sizeof rec, "|%u,%u|%u,%u\n", grid.x, grid.y, block.x, block.y);
    launch_log += nm + rec;
    const unsigned nt = block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nt == 0 || grid.y > 65535 || grid.z > 65535) {
        host_fault("%s: invalid launch configuration (grid %u x %u x %u, block %u)", nm.c_str(), grid.x, grid.y, grid.z, nt);
        return;
    }
    if ((int)nt > bound || nt > 1024) {
        host_fault("%s: block of %u threads exceeds its __launch_bounds__(%d)", nm.c_str(), nt, bound);
        return;
    }
    gridDim = grid; blockDim = block; body_p = &body;
    nthreads = (int)nt;
    ths.resize(nthreads);
    for (unsigned bz = 0; bz < grid.z && !aborted; ++bz)
    for (unsigned by = 0; by < grid.y && !aborted; ++by)
        for (unsigned bx = 0; bx < grid.x && !aborted; ++bx) {
            blockIdx = {bx, by, bz};
            bar_count = 0;
            warps.assign((nthreads + 31) / 32, warp_state{});
            for (int t = 0; t < nthreads; ++t) {
                th &h = ths[t];
                h.stack.resize(STACK);
                getcontext(&h.ctx);
                h.ctx.uc_stack.ss_sp = h.stack.data(); h.ctx.uc_stack.ss_size = STACK; h.ctx.uc_link = nullptr;
                makecontext(&h.ctx, trampoline, 0);
                h.done = false; h.tx = t % block.x; h.ty = t / block.x;
            }
            int left = nthreads;
            while (left > 0 && !aborted) {
                const unsigned long long before = progress;
                for (int t = 0; t < nthreads && !aborted; ++t) {
                    if (ths[t].done) continue;
                    cur = t; threadIdx = {ths[t].tx, ths[t].ty, 0};
                    swapcontext(&sched_ctx, &ths[t].ctx);
                    if (ths[t].done) --left;
                }
                if (!aborted && left > 0 && progress == before)
                    host_fault("%s: deadlock in block (%u, %u): %d threads wait at a barrier or shuffle "
                               "that the others never reach", nm.c_str(), bx, by, left);
            }
            cur = -1;
#ifndef SIM_NO_POISON  // (the tests build without it once, to show what poisoning catches)
            for (auto &r : shared_regions) memset(r.first, 0xFF, r.second);  // poisoned between blocks
#endif
        }
}

extern "C" const char *qvit_sim_fault() { return fault_msg.c_str(); }
extern "C" void qvit_sim_reset() { fault_msg.clear(); aborted = false; }
extern "C" const char *qvit_sim_log() { return launch_log.c_str(); }
extern "C" void qvit_sim_clear_log() { launch_log.clear(); }

const char *cudaGetErrorString(cudaError_t) { return aborted ? "emulated kernel fault (see qvit_sim_fault)" : "sim error"; }
const char *cudaGetErrorName(cudaError_t) { return "simError"; }
static int cur_dev = 0;
cudaError_t cudaGetDevice(int *d) { *d = cur_dev; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { cur_dev = d; return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int *n) { *n = 2; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) { *v = sim_sms; return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *v, const void *, int, size_t) { *v = sim_bps; return cudaSuccess; }
cudaError_t cudaGetLastError() { return aborted ? cudaErrorLaunchFailure : cudaSuccess; }
extern "C" int sim_current_device() { return cur_dev; }
