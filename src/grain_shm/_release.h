/* Ownership and release of segments, in plain C.
 *
 * A segment marked "unlink on release" is linked into `gs_owners`, so that
 * whatever is still owned at interpreter exit can be unlinked in one walk
 * (for a pool block, unlinking clears its linked bit: see _pool.h).
 * The list is touched under gs_core_lock (_lock.h: the GIL, on the default
 * build); the idempotence check of gs_owner_add is inside it, so two threads
 * marking one segment link it once.  `gs_generation` changes in a
 * forked child: segments owned by the parent become stale there, so the
 * child unmaps them but never unlinks the parent's names.
 *
 * The deleter (enable_async_del) defers releases to a few pthreads that
 * never touch Python, so the last `del` of an array costs a queue push
 * instead of munmap + shm_unlink.  See the comment above `gs_del`.
 *
 * The at-fork handlers are plain C because a forked child may run without
 * the GIL, or exec at once.  The prepare handler also gives the child its
 * references to the pool blocks it inherits (gs_helds_atfork_prepare).
 */
#ifndef GRAIN_SHM_RELEASE_H
#define GRAIN_SHM_RELEASE_H

#include <errno.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "_lock.h"
#include "_pool.h"

typedef struct gs_owner {
    struct gs_owner *prev;
    struct gs_owner *next;
    const char *path;         /* "/name", owned by the segment object */
    gs_block *block;          /* a pool block: unlinking clears its linked bit */
    unsigned long generation; /* 0: not owned */
} gs_owner;

static gs_owner gs_owners = {&gs_owners, &gs_owners, NULL, NULL, 0};
static unsigned long gs_generation = 1;

static void gs_owners_reset(void) {
    gs_owners.prev = gs_owners.next = &gs_owners;
}

/* Mark `o` owned by this process; idempotent.  `block`: NULL for a
 * segment of its own, else the pool block whose "name" `o` owns. */
static void gs_owner_add(gs_owner *o, const char *path, gs_block *block) {
    if (o->generation == gs_generation) return;
    o->generation = gs_generation;
    o->path = path;
    o->block = block;
    o->next = gs_owners.next;
    o->prev = &gs_owners;
    gs_owners.next->prev = o;
    gs_owners.next = o;
}

static int gs_owner_is_mine(const gs_owner *o) {
    return o->generation == gs_generation;
}

/* Forget `o`; returns whether this process owned it (and so must unlink). */
static int gs_owner_take(gs_owner *o) {
    if (o->generation != gs_generation) return 0;
    o->prev->next = o->next;
    o->next->prev = o->prev;
    o->prev = o->next = o;
    o->generation = 0;
    return 1;
}

/* Unlink every name this process still owns.  Their mappings stay valid;
 * their later release only unmaps. */
static void gs_unlink_owned(void) {
    gs_owner *o = gs_owners.next;
    while (o != &gs_owners) {
        gs_owner *next = o->next;
        if (o->block != NULL)
            gs_block_unlink_held(o->block);
        else
            shm_unlink(o->path);
        o->prev = o->next = o;
        o->generation = 0;
        o = next;
    }
    gs_owners_reset();
}

/* Threads of this process inside mmap().  munmap and mmap both take the
 * kernel's mmap_lock for writing (and MAP_POPULATE holds it while it faults
 * pages in), so a worker's munmap that lands in a creator's mmap puts the
 * creator to sleep: 5-15% of a 64 KiB create+release loop here.  A worker
 * waits until no thread maps before it unmaps; the creator never waits. */
static int gs_mapping;

static void *gs_mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset) {
    void *mapped;
    __atomic_add_fetch(&gs_mapping, 1, __ATOMIC_ACQ_REL);
    mapped = mmap(addr, length, prot, flags, fd, offset);
    __atomic_sub_fetch(&gs_mapping, 1, __ATOMIC_RELEASE);
    return mapped;
}

/* Let mmap() calls in flight finish first, for a bounded time (a stream of
 * them from many threads must not stall releases). */
static void gs_yield_to_mmap(void) {
    int i;
    for (i = 0; i < 10000 && __atomic_load_n(&gs_mapping, __ATOMIC_ACQUIRE) > 0; i++)
        sched_yield();
}

/* The one place a segment is released.  Returns 0, or the errno of a failed
 * shm_unlink (ENOENT: someone else removed the name first). */
static int gs_release(void *addr, size_t length, const char *unlink_path) {
    if (addr != NULL) munmap(addr, length);
    if (unlink_path != NULL && shm_unlink(unlink_path) == -1) return errno;
    return 0;
}

/* The deleter: a bounded FIFO of release requests in a preallocated ring,
 * served by `num_threads` pthreads that never touch Python.
 *
 * `queued + in_flight` never exceeds `max_outstanding`: a push that would
 * is refused and the caller releases inline, so the mappings and names
 * waiting here stay bounded (Grain's semantics).  A push copies the request
 * into the ring under `mu`: no allocation and, on the fast path, no system
 * call.  Waking a worker (a futex wake) costs 4-7 us on a small VM, more
 * than the push itself by far, so an idle worker first dozes: it wakes by
 * itself every GS_DOZE_NS to look for work, and a push wakes it only when
 * the queue is half full.  After GS_DOZES idle naps it sleeps until a push
 * wakes it, so an idle process costs nothing.
 *
 * fork(): the prepare handler takes the locks and waits until no release is
 * in flight, so the child knows exactly what is done (every popped request)
 * and what is not (the queued ones).  The child unmaps the queued mappings
 * it inherited but leaves their names to the parent, and starts with an
 * empty ring and no threads; its first push starts them. */
#define GS_PATH_CAP 257   /* "/" + NAME_MAX (255) + NUL */
#define GS_MAX_THREADS 64
#define GS_DOZE_NS 1000000L /* 1 ms: the most a release waits for a dozing worker */
#define GS_DOZES 50         /* naps before sleeping until woken */

typedef struct {
    void *addr;
    size_t length;
    char path[GS_PATH_CAP]; /* "" when this process must not unlink */
} gs_request;

typedef struct {
    size_t queued, in_flight, max_outstanding;
    int num_threads, running;
    unsigned long long deferred;      /* releases the deleter has done */
    unsigned long long refused;       /* pushes refused at the bound: done inline */
    unsigned long long unlink_errors; /* deferred unlinks that failed */
} gs_deleter_stats;

static struct {
    pthread_mutex_t ctl;  /* serialises enable and stop; taken before mu */
    pthread_mutex_t mu;   /* guards the rest */
    pthread_cond_t work;  /* idle workers sleep here */
    pthread_cond_t quiet; /* fork and stop wait here for in_flight == 0 */
    gs_request *ring;
    size_t capacity, head, queued, in_flight, max_outstanding;
    int num_threads;      /* 0: disabled, releases are inline */
    int running;          /* threads started in this process */
    int dozing, sleeping; /* idle workers: waking by themselves, or not */
    int stopping, forking, held;
    int flushing;         /* threads in gs_deleter_flush */
    unsigned long long deferred, refused, unlink_errors;
    pthread_t threads[GS_MAX_THREADS];
} gs_del = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
            PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* `work` is timed on the monotonic clock where there is one to choose, so a
 * step of the wall clock cannot stretch a nap. */
static void gs_work_cond_init(void) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
#if defined(__linux__)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
#endif
    pthread_cond_init(&gs_del.work, &attr);
    pthread_condattr_destroy(&attr);
}

/* Wait on `work` for at most GS_DOZE_NS.  mu held. */
static void gs_doze(void) {
    struct timespec until;
#if defined(__linux__)
    clock_gettime(CLOCK_MONOTONIC, &until);
#else
    clock_gettime(CLOCK_REALTIME, &until);
#endif
    until.tv_nsec += GS_DOZE_NS;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    gs_del.dozing++;
    pthread_cond_timedwait(&gs_del.work, &gs_del.mu, &until);
    gs_del.dozing--;
}

/* Move the oldest request into *r.  mu held, queued > 0. */
static void gs_pop(gs_request *r) {
    gs_request *slot = &gs_del.ring[gs_del.head];
    r->addr = slot->addr;
    r->length = slot->length;
    strcpy(r->path, slot->path);
    if (++gs_del.head == gs_del.capacity) gs_del.head = 0;
    gs_del.queued--;
    gs_del.in_flight++;
}

/* Release a popped request outside mu, then account for it.  mu held. */
static void gs_serve(gs_request *r) {
    int err;
    pthread_mutex_unlock(&gs_del.mu);
    if (r->addr != NULL) gs_yield_to_mmap();
    err = gs_release(r->addr, r->length, r->path[0] ? r->path : NULL);
    pthread_mutex_lock(&gs_del.mu);
    gs_del.in_flight--;
    gs_del.deferred++;
    if (err) gs_del.unlink_errors++;
    if (gs_del.in_flight == 0 && (gs_del.forking || gs_del.stopping || gs_del.flushing))
        pthread_cond_broadcast(&gs_del.quiet);
}

static void *gs_worker(void *unused) {
    gs_request r;
    int naps = 0;
    (void)unused;
    pthread_mutex_lock(&gs_del.mu);
    for (;;) {
        if (gs_del.queued > 0 && !gs_del.held && !gs_del.forking) {
            gs_pop(&r);
            gs_serve(&r);
            naps = 0;
        } else if (gs_del.stopping) {
            break;
        } else if (naps < GS_DOZES) {
            gs_doze();
            naps++;
        } else {
            gs_del.sleeping++;
            pthread_cond_wait(&gs_del.work, &gs_del.mu);
            gs_del.sleeping--;
        }
    }
    pthread_mutex_unlock(&gs_del.mu);
    return NULL;
}

/* Start the missing workers, with every signal blocked (Python expects
 * signals on its own threads).  mu held.  0 if any runs, else an errno. */
static int gs_start_threads(void) {
    sigset_t all, old;
    int rc = 0;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (gs_del.running < gs_del.num_threads) {
        rc = pthread_create(&gs_del.threads[gs_del.running], NULL, gs_worker, NULL);
        if (rc != 0) break;
        gs_del.running++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return gs_del.running > 0 ? 0 : rc;
}

/* Hand a release to the deleter.  Returns 0 when the caller must release
 * inline: the deleter is off, or max_outstanding releases are pending. */
static int gs_deleter_push(void *addr, size_t length, const char *unlink_path) {
    size_t n = unlink_path != NULL ? strlen(unlink_path) : 0;
    size_t tail;
    int accepted = 0, wake;
    if (__atomic_load_n(&gs_del.num_threads, __ATOMIC_RELAXED) == 0 || n >= GS_PATH_CAP)
        return 0;
    pthread_mutex_lock(&gs_del.mu);
    if (gs_del.num_threads > 0 && (gs_del.running > 0 || gs_start_threads() == 0)) {
        if (gs_del.queued + gs_del.in_flight < gs_del.max_outstanding) {
            tail = gs_del.head + gs_del.queued;
            if (tail >= gs_del.capacity) tail -= gs_del.capacity;
            gs_del.ring[tail].addr = addr;
            gs_del.ring[tail].length = length;
            if (n > 0) memcpy(gs_del.ring[tail].path, unlink_path, n);
            gs_del.ring[tail].path[n] = '\0';
            gs_del.queued++;
            accepted = 1;
        } else {
            gs_del.refused++;
        }
    }
    wake = accepted && (gs_del.sleeping > 0 ||
                        (gs_del.dozing > 0 && 2 * gs_del.queued >= gs_del.max_outstanding));
    pthread_mutex_unlock(&gs_del.mu);
    if (wake) pthread_cond_signal(&gs_del.work);
    return accepted;
}

/* Make room for `capacity` requests, keeping the queued ones in order. */
static int gs_grow_ring(size_t capacity) {
    gs_request *ring = malloc(capacity * sizeof(gs_request));
    size_t i, at = gs_del.head;
    if (ring == NULL) return ENOMEM;
    for (i = 0; i < gs_del.queued; i++) {
        ring[i] = gs_del.ring[at];
        if (++at == gs_del.capacity) at = 0;
    }
    free(gs_del.ring);
    gs_del.ring = ring;
    gs_del.capacity = capacity;
    gs_del.head = 0;
    return 0;
}

/* Defer releases to `num_threads` threads from now on, at most
 * `max_outstanding` pending.  When already on, only the bound changes.
 * Returns 0 or an errno value. */
static int gs_deleter_enable(int num_threads, size_t max_outstanding) {
    int rc = 0;
    pthread_mutex_lock(&gs_del.ctl);
    pthread_mutex_lock(&gs_del.mu);
    if (max_outstanding > gs_del.capacity) rc = gs_grow_ring(max_outstanding);
    if (rc == 0) gs_del.max_outstanding = max_outstanding;
    if (rc == 0 && gs_del.num_threads == 0) {
        __atomic_store_n(&gs_del.num_threads, num_threads, __ATOMIC_RELAXED);
        rc = gs_start_threads();
        if (rc != 0) __atomic_store_n(&gs_del.num_threads, 0, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&gs_del.mu);
    pthread_mutex_unlock(&gs_del.ctl);
    return rc;
}

/* Serve the queued requests on this thread, then wait until none is in
 * flight.  mu held; the caller has set `stopping` or `flushing`, so the
 * last worker to finish signals `quiet`. */
static void gs_drain(void) {
    gs_request r;
    while (gs_del.queued > 0) {
        gs_pop(&r);
        gs_serve(&r);
    }
    while (gs_del.in_flight > 0) pthread_cond_wait(&gs_del.quiet, &gs_del.mu);
}

/* Stop deferring: finish every pending release (this thread helps the
 * workers, so the only wait is for releases already in flight), then join
 * the workers.  Releases requested from now on are inline. */
static void gs_deleter_stop(void) {
    int i, n;
    pthread_mutex_lock(&gs_del.ctl);
    pthread_mutex_lock(&gs_del.mu);
    __atomic_store_n(&gs_del.num_threads, 0, __ATOMIC_RELAXED);
    gs_del.stopping = 1;
    gs_del.held = 0;
    pthread_cond_broadcast(&gs_del.work);
    gs_drain();
    n = gs_del.running;
    gs_del.running = 0;
    pthread_mutex_unlock(&gs_del.mu);
    for (i = 0; i < n; i++) pthread_join(gs_del.threads[i], NULL);
    pthread_mutex_lock(&gs_del.mu);
    gs_del.stopping = 0;
    pthread_mutex_unlock(&gs_del.mu);
    pthread_mutex_unlock(&gs_del.ctl);
}

/* Finish every release pending now, without stopping the deleter: this
 * thread serves the queued ones (held or not) and waits for those in
 * flight.  Returns how many were pending.  A creation that finds /dev/shm
 * full calls it: pending releases may hold the room that inline ones would
 * already have given back, and async release must not fail where inline
 * release succeeds. */
static size_t gs_deleter_flush(void) {
    size_t pending;
    pthread_mutex_lock(&gs_del.mu);
    pending = gs_del.queued + gs_del.in_flight;
    gs_del.flushing++;
    gs_drain();
    gs_del.flushing--;
    pthread_mutex_unlock(&gs_del.mu);
    return pending;
}

/* For tests only: while `on`, workers take no new request. */
static void gs_deleter_hold(int on) {
    pthread_mutex_lock(&gs_del.mu);
    gs_del.held = on;
    if (!on) pthread_cond_broadcast(&gs_del.work);
    pthread_mutex_unlock(&gs_del.mu);
}

static void gs_deleter_stats_get(gs_deleter_stats *out) {
    pthread_mutex_lock(&gs_del.mu);
    out->queued = gs_del.queued;
    out->in_flight = gs_del.in_flight;
    out->max_outstanding = gs_del.max_outstanding;
    out->num_threads = gs_del.num_threads;
    out->running = gs_del.running;
    out->deferred = gs_del.deferred;
    out->refused = gs_del.refused;
    out->unlink_errors = gs_del.unlink_errors;
    pthread_mutex_unlock(&gs_del.mu);
}

/* fork(): hold both locks across it, with nothing in flight.  The helds are
 * read without gs_core_lock: os.fork() has stopped the world, and a thread
 * parked in a region it guards is parked at a system call, with the lists
 * whole (taking the lock here could wait for ever on such a thread). */
static void gs_atfork_prepare(void) {
    gs_helds_atfork_prepare();
    pthread_mutex_lock(&gs_del.ctl);
    pthread_mutex_lock(&gs_del.mu);
    gs_del.forking = 1;
    while (gs_del.in_flight > 0) pthread_cond_wait(&gs_del.quiet, &gs_del.mu);
}

static void gs_atfork_parent(void) {
    gs_del.forking = 0;
    if (gs_del.queued > 0) pthread_cond_broadcast(&gs_del.work);
    pthread_mutex_unlock(&gs_del.mu);
    pthread_mutex_unlock(&gs_del.ctl);
}

/* The child owns nothing yet, and its deleter is fresh: it unmaps what was
 * queued (the parent unlinks those names) and keeps only the settings. */
static void gs_atfork_child(void) {
    size_t i, at = gs_del.head;
    gs_generation++;
    gs_locks_reset(); /* a holder detached in a system call is not in this process */
    gs_owners_reset();
    gs_mapping = 0; /* whoever was mapping is not in this process */
    for (i = 0; i < gs_del.queued; i++) {
        if (gs_del.ring[at].addr != NULL) munmap(gs_del.ring[at].addr, gs_del.ring[at].length);
        if (++at == gs_del.capacity) at = 0;
    }
    gs_del.head = gs_del.queued = gs_del.in_flight = 0;
    gs_del.running = gs_del.dozing = gs_del.sleeping = gs_del.stopping = gs_del.forking = gs_del.held = 0;
    gs_del.deferred = gs_del.refused = gs_del.unlink_errors = 0;
    pthread_mutex_init(&gs_del.ctl, NULL);
    pthread_mutex_init(&gs_del.mu, NULL);
    gs_work_cond_init();
    pthread_cond_init(&gs_del.quiet, NULL);
}

static int gs_release_init(void) {
    gs_work_cond_init();
    return pthread_atfork(gs_atfork_prepare, gs_atfork_parent, gs_atfork_child);
}

#endif
