// Runtime of the host emulation (see sim_cuda.h): scheduler, barriers, stub CUDA API.
#include "sim_cuda.h"
#include <cstdio>
#include <cstdlib>
sim_idx threadIdx, blockIdx;
sim_dim3 blockDim, gridDim;
extern "C" { int sim_sms = 4, sim_bps = 2, sim_launches = 0; }
static const size_t STACK = 256 * 1024;
static ucontext_t sched_ctx;
struct th { ucontext_t ctx; bool done; unsigned tx, ty; std::vector<char> stack; };
static std::vector<th> ths;
static int cur = -1, nthreads = 0;
static std::function<void()> *body_p;
static unsigned long long bar_gen = 0; static int bar_count = 0;
static std::vector<unsigned long long> wgen; static std::vector<int> wcount; static std::vector<double> wbuf;
static void yield_() { swapcontext(&ths[cur].ctx, &sched_ctx); }
static void trampoline() { (*body_p)(); ths[cur].done = true; swapcontext(&ths[cur].ctx, &sched_ctx); }
void __syncthreads() {
    unsigned long long g = bar_gen;
    if (++bar_count == nthreads) { bar_count = 0; ++bar_gen; return; }
    while (bar_gen == g) yield_();
}
static int warp_size(int w) { int n = nthreads - w * 32; return n < 32 ? n : 32; }
static void warp_bar(int w) {
    unsigned long long g = wgen[w];
    if (++wcount[w] == warp_size(w)) { wcount[w] = 0; ++wgen[w]; return; }
    while (wgen[w] == g) yield_();
}
double sim_shfl(double v, int k, bool down) {
    int lin = cur, w = lin / 32, lane = lin % 32;
    wbuf[lin] = v;
    warp_bar(w);
    int src = down ? lane + k : k;
    double r = (down && src >= warp_size(w)) ? v : wbuf[w * 32 + src];
    warp_bar(w);
    return r;
}
void sim_launch(sim_dim3 grid, sim_dim3 block, std::function<void()> body) {
    ++sim_launches;
    if (grid.x == 0 || grid.y == 0 || block.x * block.y > 1024 || grid.y > 65535) { fprintf(stderr, "bad launch\n"); abort(); }
    gridDim = grid; blockDim = block; body_p = &body;
    nthreads = block.x * block.y * block.z;
    ths.resize(nthreads);
    wgen.assign((nthreads + 31) / 32, 0); wcount.assign((nthreads + 31) / 32, 0); wbuf.assign(nthreads, 0.0);
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = {bx, by, 0};
            bar_count = 0;
            for (int t = 0; t < nthreads; ++t) {
                th &h = ths[t];
                h.stack.resize(STACK);
                getcontext(&h.ctx);
                h.ctx.uc_stack.ss_sp = h.stack.data(); h.ctx.uc_stack.ss_size = STACK; h.ctx.uc_link = nullptr;
                makecontext(&h.ctx, trampoline, 0);
                h.done = false; h.tx = t % block.x; h.ty = t / block.x;
            }
            int left = nthreads;
            while (left > 0) {
                for (int t = 0; t < nthreads; ++t) {
                    if (ths[t].done) continue;
                    cur = t; threadIdx = {ths[t].tx, ths[t].ty, 0};
                    swapcontext(&sched_ctx, &ths[t].ctx);
                    if (ths[t].done) --left;
                }
            }
        }
}
const char *cudaGetErrorString(cudaError_t) { return "sim error"; }
const char *cudaGetErrorName(cudaError_t) { return "simError"; }
static int cur_dev = 0;
cudaError_t cudaGetDevice(int *d) { *d = cur_dev; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { cur_dev = d; return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int *n) { *n = 2; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) { *v = sim_sms; return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *v, const void *, int, size_t) { *v = sim_bps; return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
extern "C" int sim_current_device() { return cur_dev; }
