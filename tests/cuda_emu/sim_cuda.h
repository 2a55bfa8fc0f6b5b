// Host emulation of the CUDA subset that csrc/fq_cuda.cu uses, so that the
// kernels' index arithmetic, vector packing, block / warp reductions and the
// finish kernels run (and are tested) on a machine without a GPU.
//
// Blocks run one after another; every thread of a block is a ucontext
// coroutine, and __syncthreads and the warp shuffles are barriers at which a
// thread yields until its block / warp has arrived. __shared__ becomes a
// function-local static (one block at a time, so that is the block's shared
// memory). fp16 / bf16 use the host paths of cuda_fp16.h / cuda_bf16.h.
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
#undef __shared__
#define __shared__ static
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
void __syncthreads();
double sim_shfl(double v, int src_lane_or_delta, bool down);
template <typename T> T __shfl_down_sync(unsigned, T v, int o) { return (T)sim_shfl((double)v, o, true); }
template <typename T> T __shfl_sync(unsigned, T v, int l) { return (T)sim_shfl((double)v, l, false); }
const char *cudaGetErrorString(cudaError_t);
const char *cudaGetErrorName(cudaError_t);
cudaError_t cudaGetDevice(int *);
cudaError_t cudaSetDevice(int);
cudaError_t cudaGetDeviceCount(int *);
cudaError_t cudaDeviceGetAttribute(int *, cudaDeviceAttr, int);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *, const void *, int, size_t);
cudaError_t cudaGetLastError();
void sim_launch(sim_dim3 grid, sim_dim3 block, std::function<void()> body);
