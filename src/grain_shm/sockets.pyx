# Included by _shm.pyx: the session's sockets.

# ---- The session's sockets (session.py), as plain file descriptors ----
# Python's _socket module would do, but its import costs ~0.7 ms, a third of
# a process's first array.

def unix_socket():
    """A new AF_UNIX stream socket (close-on-exec): its file descriptor."""
    return check_rc(gs_unix_socket(), None)


def unix_bind(int fd, str address not None):
    """Bind `fd` to `address` (abstract if it starts with NUL)."""
    cdef bytes raw = address.encode()
    check_rc(gs_unix_address(fd, raw, len(raw), False), None)


def unix_connect(int fd, str address not None):
    """Connect `fd` to the socket listening at `address`."""
    cdef bytes raw = address.encode()
    check_rc(gs_unix_address(fd, raw, len(raw), True), None)


def unix_listen(int fd, int backlog):
    check_rc(listen(fd, backlog), None)


def recv_byte(int fd, double timeout):
    """One byte from `fd`, b"" at end of file; TimeoutError if none comes
    within `timeout` seconds."""
    cdef char byte
    cdef int rc
    cdef Py_ssize_t got
    cdef double deadline = _now() + timeout
    while True:
        with nogil:
            rc = gs_wait_readable(fd, <int>(max(deadline - _now(), 0.0) * 1000 + 0.999))
        if rc == 1:
            break
        if rc == 0:
            raise TimeoutError("no answer from the session's reaper")
        if errno != EINTR:
            check_rc(rc, None)
        PyErr_CheckSignals()  # a handler's exception goes up; else wait again
    while True:
        with nogil:
            got = recv(fd, &byte, 1, 0)
        if got >= 0:
            return (&byte)[:got]
        if errno != EINTR:
            check_rc(-1, None)
        PyErr_CheckSignals()
