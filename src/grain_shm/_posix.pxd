# C declarations that Cython's own posix/*.pxd lack or get wrong across platforms.
from posix.types cimport mode_t, off_t

cdef extern from "_compat.h" nogil:
    enum: MAP_POPULATE
    int gs_reserve(int fd, off_t size)
    int gs_random_bytes(unsigned char *buf, size_t n)
    bint gs_is_segment(mode_t mode)
    bint gs_mul_overflow(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *out)

cdef extern from "_release.h" nogil:
    ctypedef struct gs_owner:
        pass
    int gs_release_init()
    void gs_owner_add(gs_owner *owner, const char *path)
    int gs_owner_is_mine(const gs_owner *owner)
    int gs_owner_take(gs_owner *owner)
    void gs_unlink_owned()
    int gs_release(void *addr, size_t length, const char *unlink_path)
    void *gs_mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)

    # The deleter behind enable_async_del: a bounded queue served by pthreads.
    enum: GS_MAX_THREADS
    ctypedef struct gs_deleter_stats:
        size_t queued
        size_t in_flight
        size_t max_outstanding
        int num_threads
        int running
        unsigned long long deferred
        unsigned long long refused
        unsigned long long unlink_errors
    int gs_deleter_push(void *addr, size_t length, const char *unlink_path)
    int gs_deleter_enable(int num_threads, size_t max_outstanding)
    void gs_deleter_stop()
    void gs_deleter_hold(int on)
    void gs_deleter_stats_get(gs_deleter_stats *out)
