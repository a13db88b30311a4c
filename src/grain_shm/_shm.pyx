# cython: language_level=3, freethreading_compatible=True
"""The core: POSIX shared-memory segments, straight on the system calls.

A `Segment` is one mapping of one named segment, or one reference to a block
of a pool arena (the pool's layout is in _pool.h).  An ndarray built over it
(`wrap`) keeps it alive through `arr.base`, and every view keeps it alive in
turn.  When the last of them dies, `__dealloc__` releases the mapping (and
unlinks the name if this process owns it) in the one place that does so, or
hands that release to the deleter (`enable_async_release`).  No file
descriptor stays open per segment.

One extension, one file per concern, joined by `include` (as uvloop's
loop.pyx includes its handles): this file holds the imports and what every
part shares; then, each readable top to bottom,

    segment.pyx      names; create, open, map, unlink; Segment; release
    pool.pyx         the pool: arenas, take, release, trim, exit
    pool_cache.pyx   the others' arenas: map, cache, let go; open and unlink blocks
    array_hooks.pyx  wrap, and SharedMemoryArray's __array_wrap__ and __getitem__
    sockets.pyx      the session's AF_UNIX sockets, as file descriptors
"""
import operator
import os
import sys

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.exc cimport PyErr_CheckSignals
from cpython.pylifecycle cimport Py_AtExit
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.errno cimport EACCES, EEXIST, EFBIG, EINTR, ENOENT, ENOMEM, ENOSPC, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.mman cimport munmap
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.fcntl cimport O_CREAT, O_EXCL, O_RDONLY, O_RDWR
from posix.mman cimport (MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE,
                         shm_open, shm_unlink)
from posix.stat cimport fstat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport close

from grain_shm._checkrc cimport check_rc, raise_errno
from grain_shm._posix cimport (GS_CLASSES, GS_MAX_THREADS, MAP_POPULATE,
                               gs_arena, gs_arena_abandon,
                               gs_arena_none_linked,
                               gs_arena_data_start, gs_arena_freed_remotely,
                               gs_arena_init, gs_arena_retire, gs_arena_valid,
                               gs_block, gs_block_acquire, gs_block_release,
                               gs_block_take, gs_block_unlink, gs_held,
                               gs_held_add, gs_held_free, gs_held_new, gs_held_sub,
                               gs_helds_drop, gs_generation, gs_remote_frees,
                               gs_class_bytes, gs_core_acquire, gs_core_release,
                               gs_names_acquire, gs_names_release, gs_size_class, gs_word, GS_GEN, GS_IS_FREE, GS_LINKED, GS_REFS,
                               gs_deleter_enable, gs_deleter_flush, PyArray_NewFromDescr,
                               gs_deleter_hold, gs_deleter_push, gs_deleter_stats,
                               gs_deleter_stats_get, gs_deleter_stop, gs_is_segment,
                               gs_mmap,
                               gs_mul_overflow, gs_owner, gs_owner_add,
                               gs_owner_is_mine, gs_owner_take, gs_random_bytes,
                               gs_release, gs_release_init, gs_reserve,
                               gs_subscript, gs_unlink_owned, gs_unix_address, gs_unix_socket,
                               gs_wait_readable, listen, recv)

cnp.import_array()
if gs_release_init() != 0:
    raise OSError("pthread_atfork failed")

# Longest name shm_open takes, without the leading "/": NAME_MAX on Linux,
# PSHMNAMLEN (31 with the "/") on macOS.
NAME_MAX = 30 if os.uname().sysname == "Darwin" else 255
from grain_shm.names import SHM_DIR, shm_space
from numpy import __version__ as _numpy_version


# What every part shares.

cdef char _empty_buffer[1]   # the address of an empty segment's buffer


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


include "segment.pyx"
include "pool.pyx"
include "pool_cache.pyx"
include "array_hooks.pyx"
include "sockets.pyx"
include "ring.pyx"
