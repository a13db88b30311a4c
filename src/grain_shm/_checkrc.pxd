# The one place that turns a failed system call into the matching exception.
from cpython.exc cimport PyErr_SetFromErrnoWithFilenameObject
from libc.errno cimport errno


cdef inline int raise_errno(int err, object filename) except -1:
    """Raise the OSError subclass Python itself would use for `err`
    (FileNotFoundError for ENOENT, PermissionError for EACCES, ...)."""
    global errno
    errno = err
    PyErr_SetFromErrnoWithFilenameObject(OSError, filename)
    return -1


cdef inline int check_rc(int rc, object filename) except -1:
    """Pass a non-negative return code through; raise on -1 (errno set)."""
    if rc == -1:
        return raise_errno(errno, filename)
    return rc
