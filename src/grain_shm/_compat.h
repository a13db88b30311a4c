/* Portability shims for the few calls that differ between Linux and macOS. */
#ifndef GRAIN_SHM_COMPAT_H
#define GRAIN_SHM_COMPAT_H

#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/types.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/random.h>
#else
#include <stdlib.h>
#endif

#ifndef MAP_POPULATE
#define MAP_POPULATE 0
#endif

/* Size a new segment and reserve its pages now, so a full /dev/shm is an
 * errno here instead of a SIGBUS on first touch.  Returns 0 or an errno. */
static inline int gs_reserve(int fd, off_t size) {
    int rc;
#if defined(__linux__)
    /* fallocate also sets the size: no ftruncate needed. */
    do {
        rc = posix_fallocate(fd, 0, size);
    } while (rc == EINTR);
    return rc;
#else
    /* macOS backs a POSIX segment with memory at ftruncate time and fails
     * ftruncate itself when it cannot; it has no posix_fallocate. */
    do {
        rc = ftruncate(fd, size);
    } while (rc == -1 && errno == EINTR);
    return rc == -1 ? errno : 0;
#endif
}

/* Whether fstat's mode is that of a shared-memory segment: a regular file
 * on Linux (tmpfs); macOS reports no file type at all for POSIX shm. */
static inline int gs_is_segment(mode_t mode) {
#if defined(__APPLE__)
    if ((mode & S_IFMT) == 0) return 1;
#endif
    return S_ISREG(mode);
}

/* a * b into *out; nonzero when it overflows. */
static inline int gs_mul_overflow(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *out) {
    return __builtin_mul_overflow(a, b, out);
}

/* obj[index] as the type `base` does it (its mapping slot, which ndarray
 * has): a subclass's __getitem__ calling its base's without a method call. */
static inline PyObject *gs_subscript(PyTypeObject *base, PyObject *obj, PyObject *index) {
    return base->tp_as_mapping->mp_subscript(obj, index);
}

/* Fill buf with n unpredictable bytes.  Returns 0 or an errno value. */
static inline int gs_random_bytes(unsigned char *buf, size_t n) {
#if defined(__linux__)
    while (n > 0) {
        ssize_t got = getrandom(buf, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        buf += got;
        n -= (size_t)got;
    }
    return 0;
#else
    arc4random_buf(buf, n);
    return 0;
#endif
}

/* The session's sockets, without Python's _socket module (whose import
 * costs ~0.7 ms, a third of a process's first array). */

/* A new AF_UNIX stream socket, close-on-exec; -1 with errno on failure. */
static inline int gs_unix_socket(void) {
#if defined(SOCK_CLOEXEC)
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
#else
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd >= 0 && fcntl(fd, F_SETFD, FD_CLOEXEC) == -1) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
#endif
}

/* bind (connect_ = 0) or connect (1) `fd` to the socket address `path` of
 * `len` bytes (an abstract one starts with a NUL).  0, or -1 with errno
 * (ENAMETOOLONG if it does not fit). */
static inline int gs_unix_address(int fd, const char *path, size_t len, int connect_) {
    struct sockaddr_un addr;
    socklen_t size;
    int rc;
    if (len > sizeof(addr.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, len);
    size = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    if (!connect_) return bind(fd, (struct sockaddr *)&addr, size);
    do {
        rc = connect(fd, (struct sockaddr *)&addr, size);
    } while (rc == -1 && errno == EINTR);
    return rc;
}

/* Wait up to `timeout_ms` for `fd` to be readable: 1 if it is, 0 on
 * timeout, -1 with errno (EINTR too: the caller checks for signals). */
static inline int gs_wait_readable(int fd, int timeout_ms) {
    struct pollfd p;
    p.fd = fd;
    p.events = POLLIN;
    p.revents = 0;
    return poll(&p, 1, timeout_ms);
}

#endif
