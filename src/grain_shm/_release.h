/* Ownership and release of segments, in plain C.
 *
 * A segment marked "unlink on release" is linked into `gs_owners`, so that
 * whatever is still owned at interpreter exit can be unlinked in one walk.
 * The list is touched only with the GIL held.  `gs_generation` changes in a
 * forked child: segments owned by the parent become stale there, so the
 * child unmaps them but never unlinks the parent's names.  The handler is
 * plain C because a forked child may run without the GIL, or exec at once.
 */
#ifndef GRAIN_SHM_RELEASE_H
#define GRAIN_SHM_RELEASE_H

#include <pthread.h>
#include <stddef.h>
#include <sys/mman.h>

typedef struct gs_owner {
    struct gs_owner *prev;
    struct gs_owner *next;
    const char *path;         /* "/name", owned by the segment object */
    unsigned long generation; /* 0: not owned */
} gs_owner;

static gs_owner gs_owners = {&gs_owners, &gs_owners, NULL, 0};
static unsigned long gs_generation = 1;

static void gs_owners_reset(void) {
    gs_owners.prev = gs_owners.next = &gs_owners;
}

static void gs_atfork_child(void) {
    gs_generation++;
    gs_owners_reset();
}

static int gs_release_init(void) {
    return pthread_atfork(NULL, NULL, gs_atfork_child);
}

/* Mark `o` owned by this process; idempotent. */
static void gs_owner_add(gs_owner *o, const char *path) {
    if (o->generation == gs_generation) return;
    o->generation = gs_generation;
    o->path = path;
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
        shm_unlink(o->path);
        o->prev = o->next = o;
        o->generation = 0;
        o = next;
    }
    gs_owners_reset();
}

/* The one place a segment is released. */
static void gs_release(void *addr, size_t length, const char *unlink_path) {
    if (addr != NULL) munmap(addr, length);
    if (unlink_path != NULL) shm_unlink(unlink_path);
}

#endif
