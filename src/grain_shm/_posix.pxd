# C declarations that Cython's own posix/*.pxd lack or get wrong across platforms,
# and those of the core's own C: release (_release.h) and the pool (_pool.h).
cimport numpy as cnp
from libc.stdint cimport int64_t, uint32_t, uint64_t
from posix.types cimport mode_t, off_t

# Missing from Cython's numpy.pxd: an array over memory we own, with no
# buffer export in between. Steals a reference to `descr`.
cdef extern from "numpy/arrayobject.h":
    object PyArray_NewFromDescr(type subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims,
                                cnp.npy_intp *strides, void *data, int flags, object obj)

cdef extern from "_compat.h" nogil:
    enum: MAP_POPULATE
    int gs_reserve(int fd, off_t size)
    int gs_random_bytes(unsigned char *buf, size_t n)
    bint gs_is_segment(mode_t mode)
    bint gs_mul_overflow(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *out)
    object gs_subscript(type base, object obj, object index)  # base's own obj[index]
    # The session's AF_UNIX sockets (and what <sys/socket.h> gives for them).
    int gs_unix_socket()
    int gs_unix_address(int fd, const char *path, size_t len, bint connect_)
    int gs_wait_readable(int fd, int timeout_ms)
    int listen(int fd, int backlog)
    ssize_t recv(int fd, void *buf, size_t n, int flags)

# The core's locks (_lock.h): PyMutex on a free-threaded build, nothing with the GIL.
cdef extern from "_lock.h" nogil:
    void gs_core_acquire()   # owners, block references, the pool; recursive
    void gs_core_release()
    void gs_names_acquire()  # the random bytes of names
    void gs_names_release()

cdef extern from "_release.h" nogil:
    ctypedef struct gs_owner:
        pass
    int gs_release_init()
    unsigned long gs_generation  # changes in a forked child
    void gs_owner_add(gs_owner *owner, const char *path, gs_block *block)
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
    size_t gs_deleter_flush()
    void gs_deleter_hold(int on)
    void gs_deleter_stats_get(gs_deleter_stats *out)

# The pool: arenas of blocks in shared memory, each block a word of atomics.
cdef extern from "_pool.h" nogil:
    ctypedef struct gs_block:
        uint64_t word
        uint64_t nbytes
    ctypedef struct gs_arena:
        uint32_t nblocks
        uint64_t block_bytes
        uint64_t data_start
        uint64_t arena_bytes
        int64_t owner_pid
        uint32_t owner_gone
        uint32_t retired
        uint64_t remote_frees
        uint64_t owner_pidns
        gs_block blocks[1]
    ctypedef struct gs_held:  # this process's references in one arena
        uint32_t epoch
        uint64_t total
    enum: GS_CLASSES
    uint64_t gs_class_bytes(int klass)
    uint64_t GS_LINKED
    uint64_t GS_REFS
    int gs_size_class(uint64_t nbytes)
    uint64_t gs_remote_frees(gs_arena *a)
    bint GS_IS_FREE(uint64_t word)
    uint32_t GS_GEN(uint64_t word)
    uint64_t gs_word(const gs_block *b)
    uint64_t gs_arena_data_start(uint32_t nblocks, uint64_t page)
    void gs_arena_init(gs_arena *a, uint32_t nblocks, uint64_t block_bytes,
                       uint64_t data_start, uint64_t arena_bytes, int64_t pid,
                       uint64_t pidns)
    bint gs_arena_none_linked(gs_arena *a, uint32_t nblocks)
    bint gs_arena_valid(const gs_arena *a, uint64_t size)
    uint32_t gs_block_take(gs_block *b, uint64_t nbytes)
    int gs_block_acquire(gs_block *b, uint32_t gen)
    bint gs_block_release(gs_block *b, bint unlink)
    int gs_block_unlink(gs_block *b, uint32_t gen)
    bint gs_arena_retire(gs_arena *a)
    bint gs_arena_freed_remotely(gs_arena *a, uint32_t nblocks)
    bint gs_arena_abandon(gs_arena *a, uint32_t nblocks)
    gs_held *gs_held_new(gs_arena *hdr, uint32_t nblocks, const char *path)
    void gs_held_free(gs_held *h)
    void gs_held_add(gs_held *h, uint32_t index)
    void gs_held_sub(gs_held *h, uint32_t index)
    void gs_helds_drop()
