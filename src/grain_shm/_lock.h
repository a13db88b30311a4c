/* The core's locks, for a free-threaded CPython; nothing on the default build.
 *
 * With the GIL, the GIL guards every piece of the core's process-wide state
 * (docs/design.md, "Free-threading"): these functions are empty there and
 * compile away, so the default build keeps its speed.  Under Py_GIL_DISABLED
 * they are PyMutex, which parks a waiting thread detached from the
 * interpreter, so a stop-the-world (GC, os.fork) never waits on one of ours.
 *
 * Two locks:
 *
 * - gs_core_lock: the owner list (gs_owners, _release.h), the block
 *   references (gs_helds, _pool.h), and the pool's state in this process
 *   (pool.pyx, pool_cache.pyx: its settings, own arenas, their free lists,
 *   the cache of the others' arenas, the counters and the trim clock).  One
 *   lock, so there is no order to get wrong: a release of a block touches
 *   all three at once.  It is recursive, as the GIL is for one thread: the
 *   last reference to a Segment (whose __dealloc__ takes it) can drop inside
 *   a locked region (a list's element, a collection run by an allocation),
 *   and the code is written for that reentrancy already.  It is held for
 *   bookkeeping: the system calls under it are those of the pool's rare
 *   events (a new arena: once per 4 MiB of blocks; mapping another's arena:
 *   once per arena; a trim: at most once a second), never those of an
 *   array's own create, open or release.
 * - gs_names_lock: the random bytes names are drawn from (segment.pyx).
 *
 * fork(): os.fork() stops the world first on the free-threaded build, and no
 * thread parks inside a region these locks guard but at its system calls,
 * where the state is whole; the child handler (gs_atfork_child) resets them,
 * since a holder that was detached in such a call is not in the child.
 */
#ifndef GRAIN_SHM_LOCK_H
#define GRAIN_SHM_LOCK_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#ifdef Py_GIL_DISABLED

typedef struct {
    PyMutex mutex;
    uintptr_t owner; /* _Py_ThreadId() of the holder, 0: none */
    int depth;       /* the holder's nesting */
} gs_rlock;

static gs_rlock gs_core_lock;
static PyMutex gs_names_lock;

static inline void gs_core_acquire(void) {
    uintptr_t me = _Py_ThreadId();
    /* Only this thread ever stores its own id there, so a relaxed load that
     * sees it is this thread's own store: it holds the lock. */
    if (__atomic_load_n(&gs_core_lock.owner, __ATOMIC_RELAXED) == me) {
        gs_core_lock.depth++;
        return;
    }
    PyMutex_Lock(&gs_core_lock.mutex);
    __atomic_store_n(&gs_core_lock.owner, me, __ATOMIC_RELAXED);
    gs_core_lock.depth = 1;
}

static inline void gs_core_release(void) {
    if (--gs_core_lock.depth == 0) {
        __atomic_store_n(&gs_core_lock.owner, (uintptr_t)0, __ATOMIC_RELAXED);
        PyMutex_Unlock(&gs_core_lock.mutex);
    }
}

static inline void gs_names_acquire(void) { PyMutex_Lock(&gs_names_lock); }
static inline void gs_names_release(void) { PyMutex_Unlock(&gs_names_lock); }

/* The forked child: whoever held them is not in this process. */
static inline void gs_locks_reset(void) {
    memset(&gs_core_lock, 0, sizeof gs_core_lock);
    memset(&gs_names_lock, 0, sizeof gs_names_lock);
}

#else /* the GIL guards it all */

static inline void gs_core_acquire(void) {}
static inline void gs_core_release(void) {}
static inline void gs_names_acquire(void) {}
static inline void gs_names_release(void) {}
static inline void gs_locks_reset(void) {}

#endif

#endif
