# The one place that turns a failed system call into the matching exception.
from cpython.exc cimport PyErr_SetFromErrnoWithFilenameObject
from libc.errno cimport errno


cdef inline int raise_errno(int err, bytes path) except -1:
    """Raise the OSError subclass Python itself would use for `err`
    (FileNotFoundError for ENOENT, PermissionError for EACCES, ...), naming
    the segment whose "/name" is `path`, as multiprocessing.shared_memory
    spells it (no "/")."""
    global errno
    name = None if path is None else path[1:].decode("utf-8", "surrogateescape")
    errno = err
    PyErr_SetFromErrnoWithFilenameObject(OSError, name)
    return -1


cdef inline int check_rc(int rc, bytes path) except -1:
    """Pass a non-negative return code through; raise on -1 (errno set)."""
    if rc == -1:
        return raise_errno(errno, path)
    return rc
