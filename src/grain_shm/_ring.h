/* grain_shm.Queue's ring in shared memory, in plain C: layout and atomics.
 *
 * A bounded multi-producer multi-consumer ring of fixed-size cells in one
 * POSIX segment of the session (so the reaper and `gc` remove it after a
 * crash), after Dmitry Vyukov's bounded MPMC queue: every cell carries its
 * own state word, and a position p (a 64-bit count that never wraps) uses
 * cell p % capacity on its turn p / capacity.  What Vyukov's queue lacks is
 * crash safety: a producer that dies between taking a position and
 * publishing it there wedges every consumer behind it.  Here a position is
 * taken by claiming its *cell*, with the claimer's pid in the cell's word,
 * so anyone stuck behind a claim can see whose it is and, once that process
 * is dead, take the cell back.  No lock exists that a SIGKILL could leave
 * held.
 *
 *     gs_ring (header, constants) | tail | head | items | spaces | cell 0 | cell 1 | ...
 *
 * The header's groups are GS_RING_PAD (128) bytes apart: twice a 64-byte
 * cache line, because Intel's adjacent-line prefetcher pulls lines in pairs,
 * so fields written by producers (tail), by consumers (head) and the two
 * wake-up words never share a pair (the reasoning of rigtorp's SPSCQueue).
 * Each cell is a state word, the payload's length and kind, and the
 * payload; cells are 64-byte multiples, so one cell's word and payload
 * travel between cores as one line where the payload is short.
 *
 * A cell's word is  progress (32) | pid (32),  progress = 4 * turn + phase:
 *
 *     EMPTY(t) -> WRITING(t, producer) -> FULL(t) -> READING(t, consumer) -> EMPTY(t+1)
 *        4t          4t+1                  4t+2          4t+3                 4t+4
 *
 * so the progress of a cell only grows (modulo 2**32: compared as a signed
 * difference, which holds while no process lags 2**29 turns behind).
 *
 * - put at position p (turn t): CAS the cell from EMPTY(t) to WRITING(t, me),
 *   write the payload, store FULL(t) (release).  A cell past EMPTY(t) means
 *   `tail` is stale: help it on (CAS p -> p+1) and retry; a cell before it
 *   still holds the item of turn t-1: the ring is full.
 * - get at position p: CAS the cell from FULL(t) to READING(t, me), read,
 *   store EMPTY(t+1) (release).  EMPTY(t): the ring is empty; WRITING(t): the
 *   item is being written (wait); past READING(t): `head` is stale, help it.
 * - tail and head are hints that anyone moves on with a CAS; the cells'
 *   words alone decide who owns what.  So a process killed after claiming a
 *   cell but before moving tail or head on stops nobody.
 * - A process that has waited about a second on a cell in WRITING or READING
 *   whose pid is dead (gs_pid_dead: no such process, or a zombie) moves it on
 *   to EMPTY(t+1) with a CAS: the dead producer's item is dropped unfinished
 *   (never delivered half-written), the dead consumer's item is lost with it.
 *   Only processes of the ring's pid namespace judge pids.
 *
 * Waiting: `items` and `spaces` are 32-bit futex words (not FUTEX_PRIVATE:
 * the waiters are other processes, the word is in a shared mapping), each
 * with a count of sleepers.  A waiter reads the word, counts itself in
 * (seq_cst), tries once more, and sleeps only if the word is unchanged.  The
 * other side publishes its cell, issues a seq_cst fence, and bumps the word
 * and wakes only if someone counts as sleeping: with nobody asleep, a put or
 * get makes no system call.  The two fences form Dekker's pattern: of a
 * waiter counting itself in and a publisher reading the count, at least one
 * sees the other's store, so no wake-up is lost.  Every sleeper is woken
 * (not one): one woken sleeper may leave on its timeout or a signal without
 * taking the item, and nobody else would be told.  Elsewhere than Linux,
 * sleeps are short naps.
 */
#ifndef GRAIN_SHM_RING_H
#define GRAIN_SHM_RING_H

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#define GS_RING_MAGIC "grainshq"
#define GS_RING_VERSION 1u
#define GS_RING_PAD 128   /* two cache lines: see above */
#define GS_CELL_ALIGN 64
#define GS_CELL_HEADER 16 /* state word, length, kind */

enum { GS_EMPTY = 0, GS_WRITING = 1, GS_FULL = 2, GS_READING = 3 };

/* What a cell's payload is (read by ring.pyx): an array's reference in
 * binary; a pickle; a large pickle's byte count (8 bytes) and the reference
 * of the uint8 array in shared memory that holds it. */
enum { GS_KIND_ARRAY = 1, GS_KIND_PICKLE = 2, GS_KIND_LARGE = 3 };

/* Tries before a waiter sleeps: a few microseconds of `pause`, about what a
 * put or get takes on the other side, so a busy peer is met without a
 * system call and an idle one costs little CPU. */
#define GS_RING_SPIN 200

/* What a claim found (the caller's next step). */
enum {
    GS_RING_OK = 0,   /* the cell is ours */
    GS_RING_FULL,     /* put: the cell still holds the previous turn's item */
    GS_RING_EMPTY,    /* get: nothing written at the head */
    GS_RING_BUSY,     /* get: the head's item is being written */
};

typedef struct {
    /* Written once by the creator (the magic last), then only read. */
    char magic[8];          /* GS_RING_MAGIC, no NUL */
    uint32_t version;
    uint32_t capacity;      /* cells: the queue's maxsize */
    uint64_t cell_stride;   /* bytes from one cell to the next, a multiple of 64 */
    uint64_t cell_bytes;    /* payload bytes a cell holds: cell_stride - 16 */
    uint64_t data_start;    /* offset of cell 0 */
    uint64_t segment_bytes;
    uint64_t max_bytes;     /* bound on the bytes of large items in flight */
    int64_t creator_pid;
    uint64_t pidns;         /* the creator's pid namespace: where claims' pids mean something */
    /* The handles (Queue objects, in any process) and pickled references in
     * transit; whoever drops it to 0 unlinks the name.  Rarely written. */
    uint32_t handles;
    uint32_t reserved;
    char pad0[GS_RING_PAD - 80];
    uint64_t tail;          /* next position to put at (a hint: see above) */
    char pad1[GS_RING_PAD - 8];
    uint64_t head;          /* next position to get from (a hint) */
    char pad2[GS_RING_PAD - 8];
    uint32_t items;         /* futex: bumped after a put, if consumers sleep */
    uint32_t items_waiting; /* consumers asleep (or about to be) on `items` */
    char pad3[GS_RING_PAD - 8];
    uint32_t spaces;        /* futex: bumped after a get, if producers sleep */
    uint32_t spaces_waiting;
    char pad4[GS_RING_PAD - 8];
} gs_ring;

typedef struct {
    uint64_t state;         /* progress (32) | pid (32) */
    uint32_t length;        /* payload bytes */
    uint32_t kind;          /* how the payload is to be read (ring.pyx) */
    unsigned char data[];
} gs_cell;

_Static_assert(sizeof(gs_ring) == 5 * GS_RING_PAD, "gs_ring's groups are GS_RING_PAD apart");
_Static_assert(sizeof(gs_cell) == GS_CELL_HEADER, "a cell's header is 16 bytes");

/* The geometry a process validated once and keeps in its own memory: a
 * scribbled header never makes a cell pointer reach outside the segment. */
typedef struct {
    gs_ring *ring;
    uint32_t capacity;
    uint64_t cell_stride;
    uint64_t cell_bytes;
    uint64_t data_start;
    uint64_t max_bytes;
} gs_ringview;

static inline uint32_t gs_progress(uint64_t state) { return (uint32_t)(state >> 32); }
static inline uint32_t gs_claimer(uint64_t state) { return (uint32_t)state; }
static inline uint64_t gs_state(uint32_t progress, uint32_t pid) {
    return ((uint64_t)progress << 32) | pid;
}
/* Where `progress` stands against `expected`: < 0 behind, 0 equal, > 0 ahead. */
static inline int32_t gs_compare(uint32_t progress, uint32_t expected) {
    return (int32_t)(progress - expected);
}

static inline uint64_t gs_ring_data_start(void) {
    return (sizeof(gs_ring) + GS_RING_PAD - 1) / GS_RING_PAD * GS_RING_PAD;
}

/* Bytes from one cell to the next for `cell_bytes` of payload (0 on overflow). */
static inline uint64_t gs_cell_stride(uint64_t cell_bytes) {
    uint64_t raw = cell_bytes + GS_CELL_HEADER;
    if (raw < cell_bytes) return 0;
    return (raw + GS_CELL_ALIGN - 1) / GS_CELL_ALIGN * GS_CELL_ALIGN;
}

/* Segment bytes for `capacity` cells of `stride` bytes; 0 on overflow. */
static inline uint64_t gs_ring_bytes(uint32_t capacity, uint64_t stride) {
    uint64_t cells, total;
    if (__builtin_mul_overflow((uint64_t)capacity, stride, &cells)) return 0;
    if (__builtin_add_overflow(cells, gs_ring_data_start(), &total)) return 0;
    return total;
}

/* Write a new ring's header; its cells are EMPTY(0) already (zeroed memory). */
static inline void gs_ring_init(gs_ring *r, uint32_t capacity, uint64_t stride,
                                uint64_t size, uint64_t max_bytes, int64_t pid,
                                uint64_t pidns) {
    r->version = GS_RING_VERSION;
    r->capacity = capacity;
    r->cell_stride = stride;
    r->cell_bytes = stride - GS_CELL_HEADER;
    r->data_start = gs_ring_data_start();
    r->segment_bytes = size;
    r->max_bytes = max_bytes;
    r->creator_pid = pid;
    r->pidns = pidns;
    r->handles = 1;
    /* The magic last: a process that sees it sees the rest. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(r->magic, GS_RING_MAGIC, 8);
}

/* Check the first `size` bytes of a segment as a ring this code lays out
 * and, if they are one, fill `v` with its geometry.  1 or 0. */
static inline int gs_ring_view(gs_ring *r, uint64_t size, gs_ringview *v) {
    uint64_t stride;
    if (size < sizeof(gs_ring) || memcmp(r->magic, GS_RING_MAGIC, 8) != 0) return 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    stride = r->cell_stride;
    if (r->version != GS_RING_VERSION || r->capacity == 0 || stride < GS_CELL_HEADER + 8
        || stride % GS_CELL_ALIGN != 0 || r->data_start != gs_ring_data_start())
        return 0;
    if (gs_ring_bytes(r->capacity, stride) == 0 || gs_ring_bytes(r->capacity, stride) > size)
        return 0;
    v->ring = r;
    v->capacity = r->capacity;
    v->cell_stride = stride;
    v->cell_bytes = stride - GS_CELL_HEADER;
    v->data_start = r->data_start;
    v->max_bytes = r->max_bytes;
    return 1;
}

static inline gs_cell *gs_cell_at(const gs_ringview *v, uint64_t pos) {
    return (gs_cell *)((char *)v->ring + v->data_start + (pos % v->capacity) * v->cell_stride);
}

static inline uint32_t gs_turn(const gs_ringview *v, uint64_t pos) {
    return (uint32_t)(pos / v->capacity);
}

static inline uint64_t gs_load_state(gs_cell *c) {
    /* Acquire: a word that says FULL (or EMPTY) comes with the payload (or
     * the end of the last reader's reads) that its store released. */
    return __atomic_load_n(&c->state, __ATOMIC_ACQUIRE);
}

static inline int gs_cas_state(gs_cell *c, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(&c->state, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Move a hint (tail or head) from `pos` on to pos + 1, if nobody has yet.
 * Relaxed: the hints order nothing; the cells' words do. */
static inline void gs_help(uint64_t *hint, uint64_t pos) {
    __atomic_compare_exchange_n(hint, &pos, pos + 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* Claim the cell at the tail for a put.  GS_RING_OK: *cell is ours in
 * WRITING, at *pos.  GS_RING_FULL: *seen is the word of the cell that still
 * holds the previous turn (a dead reader's READING, perhaps). */
static inline int gs_ring_claim_put(const gs_ringview *v, uint32_t pid, uint64_t *pos,
                                    gs_cell **cell, uint64_t *seen) {
    gs_ring *r = v->ring;
    for (;;) {
        uint64_t p = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
        gs_cell *c = gs_cell_at(v, p);
        uint32_t empty = gs_turn(v, p) * 4 + GS_EMPTY;
        uint64_t state = gs_load_state(c);
        int32_t d = gs_compare(gs_progress(state), empty);
        if (d == 0) {
            if (gs_cas_state(c, &state, gs_state(empty + GS_WRITING, pid))) {
                gs_help(&r->tail, p);
                *pos = p;
                *cell = c;
                return GS_RING_OK;
            }
            continue;  /* another producer took it */
        }
        if (d > 0) {   /* taken (or done) at this turn: the tail is behind */
            gs_help(&r->tail, p);
            continue;
        }
        /* The previous turn's item is still there, unless the tail we read
         * was overtaken meanwhile. */
        if (__atomic_load_n(&r->tail, __ATOMIC_RELAXED) != p) continue;
        *seen = state;
        *cell = c;
        return GS_RING_FULL;
    }
}

/* Claim the cell at the head for a get.  GS_RING_OK: *cell is ours in
 * READING.  GS_RING_BUSY: *seen is the WRITING word of the head's cell.
 * GS_RING_EMPTY: nothing was put there yet. */
static inline int gs_ring_claim_get(const gs_ringview *v, uint32_t pid, uint64_t *pos,
                                    gs_cell **cell, uint64_t *seen) {
    gs_ring *r = v->ring;
    for (;;) {
        uint64_t p = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
        gs_cell *c = gs_cell_at(v, p);
        uint32_t full = gs_turn(v, p) * 4 + GS_FULL;
        uint64_t state = gs_load_state(c);
        int32_t d = gs_compare(gs_progress(state), full);
        if (d == 0) {
            if (gs_cas_state(c, &state, gs_state(full + 1, pid))) {
                gs_help(&r->head, p);
                *pos = p;
                *cell = c;
                return GS_RING_OK;
            }
            continue;  /* another consumer took it */
        }
        if (d > 0) {   /* taken at this turn: the head is behind */
            gs_help(&r->head, p);
            continue;
        }
        if (__atomic_load_n(&r->head, __ATOMIC_RELAXED) != p) continue;
        *seen = state;
        *cell = c;
        return d == -1 ? GS_RING_BUSY : GS_RING_EMPTY;
    }
}

/* Wake everyone asleep on `word`, if anyone counts as asleep.  Called after
 * the store that the sleepers wait for. */
static inline void gs_ring_wake(uint32_t *word, uint32_t *waiting) {
    /* The fence orders our cell store before the read of the count (Dekker's
     * pattern with gs_ring_sleep's count-in). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(waiting, __ATOMIC_RELAXED) == 0) return;
    __atomic_add_fetch(word, 1, __ATOMIC_SEQ_CST);
#if defined(__linux__)
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#endif
}

/* The put's end: the payload is in, the item is out. */
static inline void gs_ring_publish(const gs_ringview *v, gs_cell *c, uint64_t pos,
                                   uint32_t length, uint32_t kind) {
    c->length = length;
    c->kind = kind;
    /* Release: a consumer that acquires FULL reads the payload we wrote. */
    __atomic_store_n(&c->state, gs_state(gs_turn(v, pos) * 4 + GS_FULL, 0), __ATOMIC_RELEASE);
    gs_ring_wake(&v->ring->items, &v->ring->items_waiting);
}

/* The get's end (or the drop of a claimed put): the cell is free for the
 * next turn.  Release: our reads of the payload come before the next
 * producer's writes. */
static inline void gs_ring_free(const gs_ringview *v, gs_cell *c, uint64_t pos) {
    __atomic_store_n(&c->state, gs_state(gs_turn(v, pos) * 4 + 4, 0), __ATOMIC_RELEASE);
    gs_ring_wake(&v->ring->spaces, &v->ring->spaces_waiting);
}

/* Take back a cell a dead process claimed (`seen`: its WRITING or READING
 * word, as the waiter saw it): on to EMPTY of the next turn, if it is still
 * so.  1 if this call did it. */
static inline int gs_ring_reclaim(const gs_ringview *v, gs_cell *c, uint64_t seen) {
    uint32_t turn = gs_progress(seen) / 4;
    if (!gs_cas_state(c, &seen, gs_state((turn + 1) * 4 + GS_EMPTY, 0))) return 0;
    gs_ring_wake(&v->ring->spaces, &v->ring->spaces_waiting);
    gs_ring_wake(&v->ring->items, &v->ring->items_waiting);
    return 1;
}

/* The cell at the head or the tail, for a waiter to watch. */
static inline gs_cell *gs_ring_head_cell(const gs_ringview *v) {
    return gs_cell_at(v, __atomic_load_n(&v->ring->head, __ATOMIC_RELAXED));
}
static inline gs_cell *gs_ring_tail_cell(const gs_ringview *v) {
    return gs_cell_at(v, __atomic_load_n(&v->ring->tail, __ATOMIC_RELAXED));
}

/* Items in the ring now (approximate while others work, as qsize is). */
static inline uint64_t gs_ring_depth(const gs_ringview *v) {
    uint64_t head = __atomic_load_n(&v->ring->head, __ATOMIC_ACQUIRE);
    uint64_t tail = __atomic_load_n(&v->ring->tail, __ATOMIC_ACQUIRE);
    uint64_t depth = tail > head ? tail - head : 0;
    return depth > v->capacity ? v->capacity : depth;
}

static inline void gs_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Which word a waiter sleeps on: `items` for a get, `spaces` for a put. */
static inline uint32_t *gs_ring_word(const gs_ringview *v, int for_get) {
    return for_get ? &v->ring->items : &v->ring->spaces;
}

/* Sleep on `word` while it still holds `seen` (read before the caller's
 * last attempt), `timeout_ns` at most.  The caller counted itself in
 * `waiting` before that attempt (gs_ring_count_in) and counts out after. */
static inline void gs_ring_sleep(uint32_t *word, uint32_t seen, int64_t timeout_ns) {
#if defined(__linux__)
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000);
    ts.tv_nsec = (long)(timeout_ns % 1000000000);
    /* EINTR (a signal), EAGAIN (already bumped), ETIMEDOUT: all return. */
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
#else
    struct timespec ts;
    int64_t nap = timeout_ns < 200000 ? timeout_ns : 200000;  /* 0.2 ms naps */
    if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != seen) return;
    ts.tv_sec = 0;
    ts.tv_nsec = (long)nap;
    nanosleep(&ts, NULL);
#endif
}

static inline uint32_t gs_ring_count_in(uint32_t *word, uint32_t *waiting) {
    uint32_t seen = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    __atomic_add_fetch(waiting, 1, __ATOMIC_SEQ_CST);
    return seen;
}

static inline void gs_ring_count_out(uint32_t *waiting) {
    __atomic_sub_fetch(waiting, 1, __ATOMIC_SEQ_CST);
}

static inline uint32_t *gs_ring_waiting(const gs_ringview *v, int for_get) {
    return for_get ? &v->ring->items_waiting : &v->ring->spaces_waiting;
}

static inline int64_t gs_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Bytes of large items waiting in the ring (FULL cells of GS_KIND_LARGE,
 * between head and tail): what the byte bound counts.  Read without a claim,
 * so approximate, as qsize is; nothing is counted that a crash could leave
 * counted. */
static inline uint64_t gs_ring_large_bytes(const gs_ringview *v) {
    uint64_t head = __atomic_load_n(&v->ring->head, __ATOMIC_ACQUIRE);
    uint64_t n = gs_ring_depth(v), total = 0, size, pos;
    for (pos = head; pos < head + n; pos++) {
        gs_cell *c = gs_cell_at(v, pos);
        if (gs_progress(gs_load_state(c)) % 4 == GS_FULL && c->kind == GS_KIND_LARGE) {
            memcpy(&size, c->data, 8);
            total += size;
        }
    }
    return total;
}

/* One attempt at a claim.  A put of a large item of `large` bytes waits
 * (GS_RING_FULL, no cell) while others' large bytes in flight would take the
 * total past max_bytes; alone, any size goes, so no item is too large. */
static inline int gs_ring_try(const gs_ringview *v, int for_get, uint32_t pid, uint64_t large,
                              uint64_t *pos, gs_cell **cell, uint64_t *seen) {
    uint64_t inflight;
    if (for_get) return gs_ring_claim_get(v, pid, pos, cell, seen);
    if (large) {
        inflight = gs_ring_large_bytes(v);
        if (inflight > 0 && inflight + large > v->max_bytes) {
            *seen = 0;
            *cell = NULL;
            return GS_RING_FULL;
        }
    }
    return gs_ring_claim_put(v, pid, pos, cell, seen);
}

/* Spin a little, then sleep until woken or until `until_ns` (monotonic),
 * then try once more.  Called without the GIL; the caller loops, checking
 * for signals and dead claimers between calls. */
static inline int gs_ring_wait_claim(const gs_ringview *v, int for_get, uint32_t pid,
                                     uint64_t large, int64_t until_ns, uint64_t *pos,
                                     gs_cell **cell, uint64_t *seen) {
    uint32_t *word = gs_ring_word(v, for_get), *waiting = gs_ring_waiting(v, for_get);
    uint32_t ticket;
    int64_t now;
    int i, rc;
    for (i = 0; i < GS_RING_SPIN; i++) {
        gs_cpu_relax();
        rc = gs_ring_try(v, for_get, pid, large, pos, cell, seen);
        if (rc == GS_RING_OK) return rc;
    }
    ticket = gs_ring_count_in(word, waiting);
    rc = gs_ring_try(v, for_get, pid, large, pos, cell, seen);
    if (rc != GS_RING_OK) {
        now = gs_monotonic_ns();
        if (now < until_ns) gs_ring_sleep(word, ticket, until_ns - now);
        rc = gs_ring_try(v, for_get, pid, large, pos, cell, seen);
    }
    gs_ring_count_out(waiting);
    return rc;
}

/* Whether the cell at the tail is free for this turn, so that a put would
 * claim it without waiting: for a queue's only producer (the prefetcher's
 * worker), who waits for room before making an item and then puts it.  A
 * hint, as depth is, when there are several producers. */
static inline int gs_ring_has_room(const gs_ringview *v) {
    uint64_t p = __atomic_load_n(&v->ring->tail, __ATOMIC_RELAXED);
    gs_cell *c = gs_cell_at(v, p);
    return gs_compare(gs_progress(gs_load_state(c)), gs_turn(v, p) * 4 + GS_EMPTY) >= 0;
}

/* Sleep until the ring may have room (a get freed a cell) or `until_ns`
 * (monotonic); the caller looks again.  Without the GIL; the same count-in,
 * look, sleep as gs_ring_wait_claim, so no free is missed. */
static inline void gs_ring_wait_room(const gs_ringview *v, int64_t until_ns) {
    uint32_t *word = gs_ring_word(v, 0), *waiting = gs_ring_waiting(v, 0);
    uint32_t ticket = gs_ring_count_in(word, waiting);
    int64_t now;
    if (!gs_ring_has_room(v)) {
        now = gs_monotonic_ns();
        if (now < until_ns) gs_ring_sleep(word, ticket, until_ns - now);
    }
    gs_ring_count_out(waiting);
}

/* Handles: +1 per Queue object or pickled reference; the last -1 unlinks.
 * Returns the count after the change; a count already at 0 (an unpickled
 * reference used twice) stays 0 and says so with -1. */
static inline int64_t gs_ring_handles_add(gs_ring *r, int delta) {
    uint32_t n = __atomic_load_n(&r->handles, __ATOMIC_ACQUIRE), next;
    do {
        if (delta < 0 && n == 0) return -1;
        next = n + (uint32_t)delta;
    } while (!__atomic_compare_exchange_n(&r->handles, &n, next, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE));
    return next;
}

/* Whether process `pid` is gone: no such process, or a zombie (killed, not
 * yet reaped by its parent, which may be the very process waiting on it). */
static inline int gs_pid_dead(int pid) {
    if (pid <= 0) return 0;
    if (kill(pid, 0) == -1 && errno == ESRCH) return 1;
#if defined(__linux__)
    {
        char path[40], buf[512];
        const char *close_paren;
        ssize_t got;
        int fd;
        snprintf(path, sizeof(path), "/proc/%d/stat", pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return errno == ENOENT;
        got = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (got <= 0) return 0;
        buf[got] = 0;
        close_paren = strrchr(buf, ')');
        if (close_paren && close_paren[1] == ' ' && (close_paren[2] == 'Z' || close_paren[2] == 'X'))
            return 1;
    }
#endif
    return 0;
}

/* This process's pid, cached (getpid is a system call; the hot path makes
 * none) and refreshed in a forked child before any Python code runs. */
static uint32_t gs_ring_pid = 0;
static void gs_ring_atfork_child(void) { gs_ring_pid = (uint32_t)getpid(); }
static inline int gs_ring_init_pid(void) {
    gs_ring_pid = (uint32_t)getpid();
    return pthread_atfork(NULL, NULL, gs_ring_atfork_child);
}

#endif
