/* Portability shims for the few calls that differ between Linux and macOS. */
#ifndef GRAIN_SHM_COMPAT_H
#define GRAIN_SHM_COMPAT_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/mman.h>
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

/* Reserve the segment's pages now, so a full /dev/shm is an errno here
 * instead of a SIGBUS on first touch.  Returns 0 or an errno value. */
static inline int gs_reserve(int fd, off_t size) {
#if defined(__linux__)
    int rc;
    do {
        rc = posix_fallocate(fd, 0, size);
    } while (rc == EINTR);
    return rc;
#else
    /* macOS backs a POSIX segment with wired memory at ftruncate time and
     * fails ftruncate itself when it cannot: nothing is left to reserve. */
    (void)fd;
    (void)size;
    return 0;
#endif
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

#endif
