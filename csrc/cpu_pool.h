/* cpu_pool.h - a small caching allocator for the op's large CPU outputs.
 *
 * Why: a fresh 10-80 MB output (y, grad_x) is, with glibc's defaults, often a
 * fresh mmap whose every 4 KiB page faults and is zeroed by the kernel on the
 * kernel's first write; on the 2-vCPU VM of benchmarks/RESULTS.md that cost
 * as much as the kernel itself. The pool keeps freed blocks (2 MiB aligned,
 * transparent huge pages requested) and hands the most recently freed block
 * of the same size class back, so a training step's outputs land on memory
 * that is mapped and, often, still in cache.
 *
 * Plain C, no Python: blocks may be returned from any thread (torch frees a
 * tensor's storage wherever its last reference dies), so the free lists sit
 * behind a mutex. The cache holds at most `limit` bytes of free blocks; above
 * it the oldest are unmapped.
 */
#ifndef QVIT_CPU_POOL_H
#define QVIT_CPU_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct qvit_pool_stats {
    uint64_t cached_bytes;   /* held in the free lists */
    uint64_t live_bytes;     /* handed out and not yet returned */
    uint64_t limit_bytes;    /* cap on cached_bytes */
    uint64_t hits;           /* allocations served from the free lists */
    uint64_t misses;         /* allocations that mapped a new block */
    uint64_t cached_blocks;
} qvit_pool_stats;

/* Size class of a request: nbytes rounded up to the 2 MiB block granule. */
size_t qvit_pool_round(size_t nbytes);

/* A block of at least nbytes (qvit_pool_round(nbytes) in fact), 2 MiB aligned,
 * contents unspecified; NULL when the system is out of memory. */
void *qvit_pool_alloc(size_t nbytes);

/* Returns a block from qvit_pool_alloc(nbytes), from any thread. */
void qvit_pool_free(void *block, size_t nbytes);

/* Unmaps every cached block; returns the bytes released. */
uint64_t qvit_pool_release(void);

/* Sets the cap on cached bytes (trimming to it); returns the previous cap. */
uint64_t qvit_pool_set_limit(uint64_t limit);

void qvit_pool_get_stats(qvit_pool_stats *out);

#endif /* QVIT_CPU_POOL_H */
