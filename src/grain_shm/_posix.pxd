# C declarations that Cython's own posix/*.pxd lack or get wrong across platforms.
from posix.types cimport off_t

cdef extern from "_compat.h" nogil:
    enum: MAP_POPULATE
    int gs_reserve(int fd, off_t size)
    int gs_random_bytes(unsigned char *buf, size_t n)
    bint gs_mul_overflow(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *out)

cdef extern from "_release.h" nogil:
    ctypedef struct gs_owner:
        pass
    int gs_release_init()
    void gs_owner_add(gs_owner *owner, const char *path)
    int gs_owner_is_mine(const gs_owner *owner)
    int gs_owner_take(gs_owner *owner)
    void gs_unlink_owned()
    void gs_release(void *addr, size_t length, const char *unlink_path)
