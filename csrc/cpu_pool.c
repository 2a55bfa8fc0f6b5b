/* cpu_pool.c - the caching allocator of cpu_pool.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* MAP_ANONYMOUS, MADV_HUGEPAGE */
#endif
#include "cpu_pool.h"

#include <pthread.h>
#include <string.h>
#include <sys/mman.h>

#define POOL_GRANULE ((size_t)2 << 20)   /* one huge page on x86-64 */
#define POOL_MAX_CACHED 512              /* free blocks kept at most */
#define POOL_DEFAULT_LIMIT ((uint64_t)1 << 30)

typedef struct pool_block {
    void *p;
    size_t n;   /* rounded size */
} pool_block;

/* Free blocks, oldest first: allocation takes the newest block of its size
 * class (the likeliest to be in cache), eviction unmaps the oldest. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pool_block g_free[POOL_MAX_CACHED];
static int g_nfree;
static uint64_t g_cached, g_live, g_hits, g_misses;
static uint64_t g_limit = POOL_DEFAULT_LIMIT;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

/* A child forked while another thread held the lock would deadlock on it. */
static void pool_atfork_child(void)
{
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_lock, &fresh, sizeof fresh);
}

static void pool_init(void)
{
    pthread_atfork(NULL, NULL, pool_atfork_child);
}

size_t qvit_pool_round(size_t nbytes)
{
    if (nbytes == 0) {
        nbytes = 1;
    }
    if (nbytes > SIZE_MAX - POOL_GRANULE) {
        return 0;
    }
    return (nbytes + POOL_GRANULE - 1) & ~(POOL_GRANULE - 1);
}

static void *map_block(size_t n)
{
    /* over-map by one granule and cut to a 2 MiB aligned range, so the block
     * can be backed by huge pages */
    size_t span = n + POOL_GRANULE;
    char *raw = (char *)mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
    if (raw == (char *)MAP_FAILED) {
        return NULL;
    }
    uintptr_t a = ((uintptr_t)raw + POOL_GRANULE - 1) & ~(uintptr_t)(POOL_GRANULE - 1);
    char *p = (char *)a;
    size_t head = (size_t)(p - raw), tail = span - head - n;
    if (head) {
        munmap(raw, head);
    }
    if (tail) {
        munmap(p + n, tail);
    }
#ifdef MADV_HUGEPAGE
    (void)madvise(p, n, MADV_HUGEPAGE); /* advisory: fine if THP is off */
#endif
    return p;
}

/* Takes free block i out of the list (lock held). */
static pool_block take_locked(int i)
{
    pool_block b = g_free[i];
    memmove(&g_free[i], &g_free[i + 1], (size_t)(g_nfree - 1 - i) * sizeof g_free[0]);
    g_nfree--;
    g_cached -= b.n;
    return b;
}

/* Drops the oldest free blocks until the cache fits `limit` (lock held);
 * returns them in out[] for unmapping outside the lock. */
static int evict_locked(uint64_t limit, pool_block *out)
{
    int k = 0;
    while (g_nfree > 0 && g_cached > limit) {
        out[k++] = take_locked(0);
    }
    return k;
}

static void unmap_all(const pool_block *b, int k)
{
    for (int i = 0; i < k; i++) {
        munmap(b[i].p, b[i].n);
    }
}

void *qvit_pool_alloc(size_t nbytes)
{
    size_t n = qvit_pool_round(nbytes);
    if (n == 0) {
        return NULL;
    }
    pthread_once(&g_once, pool_init);
    pthread_mutex_lock(&g_lock);
    for (int i = g_nfree - 1; i >= 0; i--) {
        if (g_free[i].n == n) {
            void *p = take_locked(i).p;
            g_live += n;
            g_hits++;
            pthread_mutex_unlock(&g_lock);
            return p;
        }
    }
    g_misses++;
    pthread_mutex_unlock(&g_lock);

    void *p = map_block(n);
    if (!p) {
        /* out of address space or memory: give the cache back and retry once */
        qvit_pool_release();
        p = map_block(n);
        if (!p) {
            return NULL;
        }
    }
    pthread_mutex_lock(&g_lock);
    g_live += n;
    pthread_mutex_unlock(&g_lock);
    return p;
}

void qvit_pool_free(void *block, size_t nbytes)
{
    if (!block) {
        return;
    }
    size_t n = qvit_pool_round(nbytes);
    pool_block local[POOL_MAX_CACHED + 1];
    int k = 0;
    pthread_mutex_lock(&g_lock);
    g_live -= n;
    if ((uint64_t)n > g_limit) {
        pthread_mutex_unlock(&g_lock);
        munmap(block, n);
        return;
    }
    if (g_nfree == POOL_MAX_CACHED) {
        local[k++] = take_locked(0); /* full: the oldest goes */
    }
    g_free[g_nfree].p = block;
    g_free[g_nfree].n = n;
    g_nfree++;
    g_cached += n;
    k += evict_locked(g_limit, local + k);
    pthread_mutex_unlock(&g_lock);
    unmap_all(local, k);
}

uint64_t qvit_pool_release(void)
{
    pool_block local[POOL_MAX_CACHED];
    pthread_mutex_lock(&g_lock);
    int k = evict_locked(0, local);
    pthread_mutex_unlock(&g_lock);
    uint64_t freed = 0;
    for (int i = 0; i < k; i++) {
        freed += local[i].n;
    }
    unmap_all(local, k);
    return freed;
}

uint64_t qvit_pool_set_limit(uint64_t limit)
{
    pool_block local[POOL_MAX_CACHED];
    pthread_mutex_lock(&g_lock);
    uint64_t old = g_limit;
    g_limit = limit;
    int k = evict_locked(limit, local);
    pthread_mutex_unlock(&g_lock);
    unmap_all(local, k);
    return old;
}

void qvit_pool_get_stats(qvit_pool_stats *out)
{
    pthread_mutex_lock(&g_lock);
    out->cached_bytes = g_cached;
    out->live_bytes = g_live;
    out->limit_bytes = g_limit;
    out->hits = g_hits;
    out->misses = g_misses;
    out->cached_blocks = (uint64_t)g_nfree;
    pthread_mutex_unlock(&g_lock);
}
