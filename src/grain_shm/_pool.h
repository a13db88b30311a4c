/* The pool's layout in shared memory and the atomics that keep it, in plain C.
 *
 * An arena is one POSIX segment, named like any other of the session (so the
 * reaper and `gc` remove it with the rest), carved into `nblocks` blocks of
 * `block_bytes`.  Its header starts the segment:
 *
 *     gs_arena | gs_block[nblocks] | pad to a page | block 0 | block 1 | ...
 *
 * Each block behaves as a POSIX name would, through one 64-bit word:
 *
 *     generation (32) | linked (1) | references (31)
 *
 * - linked: the "name" exists; a reference may be opened.  Cleared by the
 *   unlink_on_del() holder's release, close_and_unlink_shm(), or exit.
 * - references: the mappings (segment objects, in any process) over it.
 * - generation: changes each time the owner takes the block anew, so a stale
 *   reference (pickled, then its block freed and reused) finds another
 *   generation and fails as opening an unlinked name does.
 *
 * A block is free when it is neither linked nor referenced.  Nothing but the
 * owning process ever moves a block out of that state, so the owner can keep
 * a private list of free blocks and needs no lock: every change is a CAS on
 * the word, and no process can die holding anything but its references
 * (which stay counted until the session ends, as a killed process's
 * segments stay until the reaper sweeps them).
 *
 * Releases of the last reference in another process bump `remote_frees`, so
 * the owner rescans the words only when something came back.  When the owner
 * exits it sets `owner_gone`; from then on whoever frees the last block
 * unlinks the arena (`retired` says who does, once).  An owner killed before
 * it could say so is found dead by the processes that cache its arena (their
 * trims look at `owner_pid` in `owner_pidns`); once none of its blocks is
 * linked, nothing in it can be opened again and they unlink it.
 */
#ifndef GRAIN_SHM_POOL_H
#define GRAIN_SHM_POOL_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define GS_ARENA_MAGIC "grainshm"
#define GS_ARENA_VERSION 1u

#define GS_REFS 0x7fffffffull
#define GS_LINKED 0x80000000ull
#define GS_GEN(word) ((uint32_t)((word) >> 32))
#define GS_IS_FREE(word) (((word) & (GS_LINKED | GS_REFS)) == 0)

typedef struct {
    uint64_t word;   /* generation | linked | references */
    uint64_t nbytes; /* the array's byte count, set when the block is taken */
} gs_block;

typedef struct {
    char magic[8];         /* GS_ARENA_MAGIC, no NUL */
    uint32_t version;
    uint32_t nblocks;
    uint64_t block_bytes;
    uint64_t data_start;   /* offset of block 0, a multiple of the page size */
    uint64_t arena_bytes;
    int64_t owner_pid;
    uint32_t owner_gone;
    uint32_t retired;
    uint64_t remote_frees;
    uint64_t owner_pidns;  /* the owner's pid namespace (inode): where owner_pid means it */
    uint64_t reserved[2];
    gs_block blocks[];
} gs_arena;

/* Size classes: 256 bytes (class 0), then four per doubling, each 1.25x,
 * 1.2x, 1.17x and 1.14x the one before (jemalloc's and mimalloc's spacing),
 * so a block is at most 1.25x its array's size: class c >= 1 holds
 * 2^k + j * 2^(k-2) bytes, k = 8 + (c-1)/4, j = 1 + (c-1)%4, that is 320,
 * 384, 448, 512, 640, ... up to 256 MiB (class 80).  Every class is a
 * multiple of 64 bytes, so with block 0 at a page every block starts on a
 * cache line (aligned for every dtype). */
#define GS_MIN_BLOCK_SHIFT 8
#define GS_CLASSES 81

/* The bytes of a block of `klass` (0 to GS_CLASSES - 1). */
static inline uint64_t gs_class_bytes(int klass) {
    int k, j;
    if (klass <= 0) return 1ull << GS_MIN_BLOCK_SHIFT;
    k = GS_MIN_BLOCK_SHIFT + (klass - 1) / 4;
    j = 1 + (klass - 1) % 4;
    return (1ull << k) + ((uint64_t)j << (k - 2));
}

/* The smallest class whose blocks hold `nbytes` (> 0); GS_CLASSES or more
 * if none does. */
static inline int gs_size_class(uint64_t nbytes) {
    int k;
    uint64_t step;
    if (nbytes <= (1ull << GS_MIN_BLOCK_SHIFT)) return 0;
    k = 63 - __builtin_clzll(nbytes - 1);  /* 2^k < nbytes <= 2^(k+1) */
    step = 1ull << (k - 2);
    return (k - GS_MIN_BLOCK_SHIFT) * 4 + (int)((nbytes - (1ull << k) + step - 1) / step);
}

static inline uint64_t gs_remote_frees(gs_arena *a) {
    return __atomic_load_n(&a->remote_frees, __ATOMIC_ACQUIRE);
}

static inline uint64_t gs_word(const gs_block *b) {
    return __atomic_load_n(&b->word, __ATOMIC_ACQUIRE);
}

static inline int gs_cas(gs_block *b, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(&b->word, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE);
}

/* Header bytes before block 0 for `nblocks` blocks, rounded up to `page`. */
static inline uint64_t gs_arena_data_start(uint32_t nblocks, uint64_t page) {
    uint64_t raw = sizeof(gs_arena) + (uint64_t)nblocks * sizeof(gs_block);
    return (raw + page - 1) / page * page;
}

/* Write a new arena's header (its blocks are all free: zeroed memory). */
static inline void gs_arena_init(gs_arena *a, uint32_t nblocks, uint64_t block_bytes,
                                 uint64_t data_start, uint64_t arena_bytes, int64_t pid,
                                 uint64_t pidns) {
    a->owner_pidns = pidns;
    a->version = GS_ARENA_VERSION;
    a->nblocks = nblocks;
    a->block_bytes = block_bytes;
    a->data_start = data_start;
    a->arena_bytes = arena_bytes;
    a->owner_pid = pid;
    /* The magic last: a reader that sees it sees the rest. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(a->magic, GS_ARENA_MAGIC, 8);
}

/* Whether the first `size` bytes of a segment are an arena this code can
 * read: the magic, the version, and a geometry that fits in the segment
 * (overflow-checked: a header is as untrusted as metadata). */
static inline int gs_arena_valid(const gs_arena *a, uint64_t size) {
    uint64_t table, blocks, end;
    if (size < sizeof(gs_arena) || memcmp(a->magic, GS_ARENA_MAGIC, 8) != 0) return 0;
    if (a->version != GS_ARENA_VERSION || a->nblocks == 0 || a->block_bytes == 0) return 0;
    table = sizeof(gs_arena) + (uint64_t)a->nblocks * sizeof(gs_block);
    if (a->data_start < table || a->data_start > size) return 0;
    if (__builtin_mul_overflow((uint64_t)a->nblocks, a->block_bytes, &blocks)) return 0;
    if (__builtin_add_overflow(a->data_start, blocks, &end) || end > size) return 0;
    return 1;
}

/* The owner takes a free block for an array of `nbytes`: one reference,
 * linked, a new generation (never 0: 0 means "no block" in a reference).
 * Returns the generation, or 0 if the block was not free. */
static inline uint32_t gs_block_take(gs_block *b, uint64_t nbytes) {
    uint64_t word = gs_word(b);
    uint32_t gen;
    if (!GS_IS_FREE(word)) return 0;
    gen = GS_GEN(word) + 1;
    if (gen == 0) gen = 1;
    /* Published by the CAS below (seq_cst): an opener that acquires the
     * word reads this nbytes. */
    __atomic_store_n(&b->nbytes, nbytes, __ATOMIC_RELAXED);
    if (!gs_cas(b, &word, ((uint64_t)gen << 32) | GS_LINKED | 1)) return 0;
    return gen;
}

/* Open: one more reference, if the block is still linked under `gen`.
 * 0, ENOENT (no such name: unlinked, or another generation), or EMFILE. */
static inline int gs_block_acquire(gs_block *b, uint32_t gen) {
    uint64_t word = gs_word(b);
    do {
        if (GS_GEN(word) != gen || !(word & GS_LINKED)) return ENOENT;
        if ((word & GS_REFS) == GS_REFS) return EMFILE;
    } while (!gs_cas(b, &word, word + 1));
    return 0;
}

/* Drop one held reference, and the name too if `unlink`.  Returns 1 if the
 * block is free now.  A reference is held, so the generation cannot change
 * under us; a count already at zero (a corrupt word) is left alone. */
static inline int gs_block_release(gs_block *b, int unlink) {
    uint64_t word = gs_word(b), next;
    do {
        if ((word & GS_REFS) == 0) return 0;
        next = word - 1;
        if (unlink) next &= ~GS_LINKED;
    } while (!gs_cas(b, &word, next));
    return GS_IS_FREE(next);
}

/* Unlink the name without holding a reference (close_and_unlink_shm).
 * -1 if there is no such name (ENOENT), else 1 if the block is free now. */
static inline int gs_block_unlink(gs_block *b, uint32_t gen) {
    uint64_t word = gs_word(b), next;
    do {
        if (GS_GEN(word) != gen || !(word & GS_LINKED)) return -1;
        next = word & ~GS_LINKED;
    } while (!gs_cas(b, &word, next));
    return GS_IS_FREE(next);
}

/* Clear the linked bit of a block this process holds (exit: unlink what
 * this process owns).  Its reference keeps it; the later release frees it. */
static inline void gs_block_unlink_held(gs_block *b) {
    __atomic_fetch_and(&b->word, ~GS_LINKED, __ATOMIC_SEQ_CST);
}

static inline int gs_arena_all_free(gs_arena *a, uint32_t nblocks) {
    uint32_t i;
    for (i = 0; i < nblocks; i++)
        if (!GS_IS_FREE(__atomic_load_n(&a->blocks[i].word, __ATOMIC_SEQ_CST))) return 0;
    return 1;
}

/* Whether no block is linked: nothing in the arena can be opened any more
 * (mappings of its blocks may live on; they stay valid once it is unlinked). */
static inline int gs_arena_none_linked(gs_arena *a, uint32_t nblocks) {
    uint32_t i;
    for (i = 0; i < nblocks; i++)
        if (__atomic_load_n(&a->blocks[i].word, __ATOMIC_SEQ_CST) & GS_LINKED) return 0;
    return 1;
}

/* Claim the unlinking of the arena's name: 1 for exactly one caller. */
static inline int gs_arena_retire(gs_arena *a) {
    uint32_t expected = 0;
    return __atomic_compare_exchange_n(&a->retired, &expected, 1, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* After a block of another process's arena became free here: tell its
 * owner, and once the owner is gone and every block is free, claim the
 * arena's unlinking.  1: the caller unlinks the name.  `nblocks` is the
 * caller's validated copy, never re-read from the header. */
static inline int gs_arena_freed_remotely(gs_arena *a, uint32_t nblocks) {
    __atomic_add_fetch(&a->remote_frees, 1, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&a->owner_gone, __ATOMIC_SEQ_CST) &&
           gs_arena_all_free(a, nblocks) && gs_arena_retire(a);
}

/* The owner lets go (exit): whoever frees the last block unlinks the arena
 * from now on.  1: it is all free already, and the caller unlinks it.
 * (With gs_arena_freed_remotely, seq_cst on both sides: of an owner that
 * leaves while another process frees the last block, at least one sees
 * both, and gs_arena_retire lets exactly one unlink.) */
static inline int gs_arena_abandon(gs_arena *a, uint32_t nblocks) {
    __atomic_store_n(&a->owner_gone, 1, __ATOMIC_SEQ_CST);
    return gs_arena_all_free(a, nblocks) && gs_arena_retire(a);
}

/* The references this process holds, counted per block of each arena it
 * maps, for the moments they change hands wholesale: fork (the child
 * inherits every mapping, so each block gains the child's references, taken
 * in the parent before the fork so that the parent cannot free the block in
 * between) and exit (the process drops them all).
 *
 * The counts live in C memory (malloc), not in Python objects, because the
 * drop at exit runs after the interpreter is finalized (Py_AtExit): until
 * then an atexit handler registered before grain_shm's, or a daemon thread,
 * may still read or write an array, and a block given back earlier could be
 * another array's by then.  The record keeps what that drop needs (the
 * mapping, the validated block count, the name), so it uses no Python; the
 * mapping is never unmapped while a count is held, since every counted
 * reference belongs to a segment object that keeps its Arena alive.
 *
 * Counts and the list are touched under gs_core_lock (_lock.h), like the
 * owner list, except by the at-fork prepare handler and the drop after
 * finalization, which run on the only thread left; a wholesale
 * drop bumps `epoch`, so a segment object that outlives it knows that its
 * reference is gone.  A fork that fails after the prepare handler leaves
 * the child's references counted: the blocks stay until the session ends,
 * which is wasteful but never wrong. */
#define GS_HELD_PATH_CAP 32  /* "/gs<13>_.<12>" is 30 with its NUL */

typedef struct gs_held {
    struct gs_held *prev;
    struct gs_held *next;
    gs_arena *hdr;
    uint32_t nblocks;           /* the validated copy, never the header's */
    uint32_t epoch;             /* bumped by each wholesale drop */
    uint64_t total;             /* sum of counts */
    char path[GS_HELD_PATH_CAP];
    uint32_t counts[];          /* this process's references, per block */
} gs_held;

static gs_held gs_helds = {&gs_helds, &gs_helds, NULL, 0, 0, 0, {0}};

/* A record for an arena just mapped (NULL: out of memory, or a name too long). */
static gs_held *gs_held_new(gs_arena *hdr, uint32_t nblocks, const char *path) {
    size_t n = strlen(path);
    gs_held *h;
    if (n >= GS_HELD_PATH_CAP) return NULL;
    h = calloc(1, sizeof(gs_held) + (size_t)nblocks * sizeof(uint32_t));
    if (h == NULL) return NULL;
    h->hdr = hdr;
    h->nblocks = nblocks;
    memcpy(h->path, path, n + 1);
    h->next = gs_helds.next;
    h->prev = &gs_helds;
    gs_helds.next->prev = h;
    gs_helds.next = h;
    return h;
}

/* Forget a record whose counts are all zero (its arena is being unmapped). */
static void gs_held_free(gs_held *h) {
    h->prev->next = h->next;
    h->next->prev = h->prev;
    free(h);
}

static inline void gs_held_add(gs_held *h, uint32_t index) {
    h->counts[index]++;
    h->total++;
}

static inline void gs_held_sub(gs_held *h, uint32_t index) {
    h->counts[index]--;
    h->total--;
}

/* fork() prepare: the child's references, one per reference held here. */
static void gs_helds_atfork_prepare(void) {
    gs_held *h;
    uint32_t i;
    for (h = gs_helds.next; h != &gs_helds; h = h->next)
        for (i = 0; h->total > 0 && i < h->nblocks; i++)
            if (h->counts[i] > 0)
                __atomic_add_fetch(&h->hdr->blocks[i].word, h->counts[i], __ATOMIC_SEQ_CST);
}

/* Drop every reference this process holds, as its last act: a block freed
 * here tells its arena's owner, and if the owner has left (this process
 * too, once its exit hook abandoned its arenas) and the arena is all free,
 * this process unlinks it.  Atomics and shm_unlink only: it runs after the
 * interpreter is finalized (Py_AtExit), or for a process that leaves
 * through os._exit, at its exit hook. */
static void gs_helds_drop(void) {
    gs_held *h;
    uint32_t i;
    for (h = gs_helds.next; h != &gs_helds; h = h->next) {
        h->epoch++;
        for (i = 0; h->total > 0 && i < h->nblocks; i++) {
            for (; h->counts[i] > 0; h->counts[i]--, h->total--)
                if (gs_block_release(&h->hdr->blocks[i], 0) &&
                        gs_arena_freed_remotely(h->hdr, h->nblocks))
                    shm_unlink(h->path);
        }
    }
}

#endif
