// Host emulation of the CUDA subset that csrc/fq_cuda.cu uses, so that the
// kernels' index arithmetic, vector packing, block / warp reductions and the
// finish kernels run (and are tested) on a machine without a GPU.
//
// Blocks run one after another; every thread of a block is a ucontext
// coroutine, and __syncthreads and the warp shuffles are barriers at which a
// thread yields until the threads it waits for have arrived. __shared__
// becomes a function-local static (one block at a time, so that is the
// block's shared memory), registered so that it is poisoned (all bytes 0xFF:
// NaN as float and double) before its first use and after every block.
// fp16 / bf16 use the host paths of cuda_fp16.h / cuda_bf16.h.
//
// What a GPU would reject or leave undefined is reported as a fault (the
// launch stops, qvit_sim_fault() says why): a 16-byte vector access that is
// not 16-byte aligned, a shuffle whose mask leaves out the calling lane or
// names a lane that does not exist (partial warps), a shuffle that reads a
// lane outside the mask, lanes of one mask disagreeing, a block larger than
// the kernel's __launch_bounds__ (or 1024), a deadlock at a barrier.
// It checks logic, not the memory model, streams or performance: those need
// a GPU (benchmarks/gpu_check.sh). Built by emu.py; test-only.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <functional>
#include <ucontext.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#undef __global__
#define __global__
#define __launch_bounds__(...)
#undef __shared__  // emu.py rewrites every __shared__ declaration; one left over does not compile
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
using std::isfinite;
struct alignas(16) sim_uint4 { unsigned x, y, z, w; };
#define uint4 sim_uint4
struct sim_dim3 { unsigned x, y, z; sim_dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
#define dim3 sim_dim3
struct sim_idx { unsigned x, y, z; };
extern sim_idx threadIdx, blockIdx;
extern sim_dim3 blockDim, gridDim;
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline double __longlong_as_double(long long u) { double f; memcpy(&f, &u, 8); return f; }

// Records a fault and ends the launch (the current thread does not come back).
[[noreturn]] void sim_fault(const char *fmt, ...);
void sim_shared(void *p, size_t bytes);

// 16-byte vector access (emu.py rewrites reinterpret_cast<[const] uint4 *>(p)
// into sim_vec<[const] uint4>(p)): faults unless p is 16-byte aligned.
template <typename V> V *sim_vec(const void *p)
{
    if ((uintptr_t)p & 15u) sim_fault("misaligned 16-byte vector access at %p (address %% 16 = %u)", p, (unsigned)((uintptr_t)p & 15u));
    return (V *)p;
}

void __syncthreads();
double sim_shfl(unsigned mask, double v, int src_lane_or_delta, bool down);
template <typename T> T __shfl_down_sync(unsigned m, T v, int o) { return (T)sim_shfl(m, (double)v, o, true); }
template <typename T> T __shfl_sync(unsigned m, T v, int l) { return (T)sim_shfl(m, (double)v, l, false); }
const char *cudaGetErrorString(cudaError_t);
const char *cudaGetErrorName(cudaError_t);
cudaError_t cudaGetDevice(int *);
cudaError_t cudaSetDevice(int);
cudaError_t cudaGetDeviceCount(int *);
cudaError_t cudaDeviceGetAttribute(int *, cudaDeviceAttr, int);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *, const void *, int, size_t);
cudaError_t cudaGetLastError();
// name: the kernel instance (sim_kname); bound: its __launch_bounds__ (1024 if none)
void sim_launch(sim_dim3 grid, sim_dim3 block, int bound, const char *name, std::function<void()> body);
// "... [with auto K = fq_rows_kernel<float, 4, true>]": the instance launched
template <auto K> const char *sim_kname() { return __PRETTY_FUNCTION__; }
