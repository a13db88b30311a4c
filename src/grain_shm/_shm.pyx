# cython: language_level=3
"""The core: POSIX shared-memory segments, straight on the system calls.

A `Segment` is one mapping of one named segment, or one reference to a block
of a pool arena (the pool's section below; its layout is in _pool.h).  An
ndarray built over it (`wrap`) keeps it alive through `arr.base`, and every
view keeps it alive in turn.  When the last of them dies, `__dealloc__`
releases the mapping (and unlinks the name if this process owns it) in the one
place that does so, or hands that release to the deleter (`enable_async_release`).
No file descriptor stays open per segment.
"""

import operator
import os

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.exc cimport PyErr_CheckSignals
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
from grain_shm._posix cimport (GS_MAX_THREADS, GS_MIN_BLOCK_SHIFT, MAP_POPULATE,
                               gs_arena, gs_arena_abandon,
                               gs_arena_none_linked,
                               gs_arena_data_start, gs_arena_freed_remotely,
                               gs_arena_init, gs_arena_retire, gs_arena_valid,
                               gs_block, gs_block_acquire, gs_block_release,
                               gs_block_take, gs_block_unlink, gs_blockref,
                               gs_blockref_add, gs_blockref_take,
                               gs_blockrefs_first, gs_generation, gs_remote_frees,
                               gs_size_class, gs_word, GS_GEN, GS_IS_FREE, GS_LINKED, GS_REFS,
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

cdef enum:
    RANDOM_CHARS = 12            # 72 bits
    PREFIX_CAP = 17              # "/" + prefix + 12 random chars <= 30
    CREATE_ATTEMPTS = 16

cdef const char *ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef enum:
    RANDOM_POOL = 4096
# Random bytes for names, fetched a page at a time (one getrandom per ~340
# names). Only touched with the GIL held; emptied in a forked child so parent
# and child never draw the same names.
cdef unsigned char _random_pool[RANDOM_POOL]
cdef size_t _random_used = RANDOM_POOL
cdef char _empty_buffer[1]


cdef size_t _check_prefix(bytes prefix) except 0:
    """The length of "/" + `prefix`; ValueError unless it fits and is a plain name."""
    cdef const unsigned char *p = prefix
    cdef Py_ssize_t i, n = len(prefix)
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if not (b"a"[0] <= c <= b"z"[0] or b"A"[0] <= c <= b"Z"[0]
                or b"0"[0] <= c <= b"9"[0] or c == b"."[0] or c == b"_"[0] or c == b"-"[0]):
            n = PREFIX_CAP
    if n + 1 > PREFIX_CAP:
        raise ValueError(f"invalid segment name prefix {prefix!r}")
    return n + 1


cdef int _new_path(char *out, const char *prefix, size_t prefix_len) noexcept:
    """Write "/<prefix><12 random chars>\\0" into out; 0 or an errno value.
    prefix_len counts the "/". Called with the GIL held, which guards the
    random pool."""
    global _random_used
    cdef int i, rc
    if _random_used + RANDOM_CHARS > RANDOM_POOL:
        rc = gs_random_bytes(_random_pool, RANDOM_POOL)
        if rc != 0:
            return rc
        _random_used = 0
    out[0] = b"/"
    memcpy(&out[1], prefix, prefix_len - 1)
    for i in range(RANDOM_CHARS):
        out[prefix_len + i] = ALPHABET[_random_pool[_random_used + i] & 63]
    out[prefix_len + RANDOM_CHARS] = 0
    _random_used += RANDOM_CHARS
    return 0


def _forget_random_pool():
    global _random_used
    _random_used = RANDOM_POOL


os.register_at_fork(after_in_child=_forget_random_pool)


cdef bytes _path_of(name):
    """The "/name" bytes for shm_*(); ValueError for a name it cannot be."""
    if not isinstance(name, (str, bytes)):
        raise TypeError(f"segment name must be str, not {type(name).__name__}")
    cdef bytes raw = os.fsencode(name)
    if raw.startswith(b"/"):
        raw = raw[1:]
    if (not raw or b"/" in raw or b"\0" in raw or raw in (b".", b"..")
            or len(raw) > NAME_MAX):
        raise ValueError(
            f"invalid shared-memory name {name!r}: it must be 1 to {NAME_MAX} "
            "characters, without '/' (except one leading) or NUL"
        )
    return b"/" + raw


class ArraySizeError(OverflowError, ValueError):
    """An array whose byte count does not fit in memory addresses.

    An OverflowError, as Python's own size checks raise, that is also a
    ValueError, as numpy's "array is too big" is."""


def layout(shape, Py_ssize_t itemsize):
    """(dims, nbytes) for an array of `shape`: ints >= 0, with a byte count
    (and an element count) that fits in a Py_ssize_t."""
    if isinstance(shape, int) or isinstance(shape, cnp.integer):
        shape = (shape,)
    try:
        dims = tuple([operator.index(d) for d in shape])
    except TypeError:
        raise TypeError(f"shape must be an iterable of ints, not {shape!r}") from None
    cdef Py_ssize_t count = 1, nbytes = itemsize, dim
    cdef bint overflow = False
    for d in dims:
        if d < 0:
            raise ValueError(f"negative dimensions are not allowed: {dims}")
        if d > PY_SSIZE_T_MAX:
            overflow = True
            continue
        dim = d
        overflow |= gs_mul_overflow(count, dim, &count)
        overflow |= gs_mul_overflow(nbytes, dim, &nbytes)
    if overflow and 0 not in dims:
        raise ArraySizeError(
            f"an array of shape {dims} with {itemsize}-byte items is larger "
            "than this machine can address"
        )
    return dims, (nbytes if not overflow else 0)


def _no_space(Py_ssize_t nbytes, int err):
    """MemoryError that says where the memory was to come from and how to get more."""
    space = shm_space()
    where = (f"{SHM_DIR} is not available" if space is None
             else f"{SHM_DIR} has {space[1]} bytes free of {space[0]}")
    return MemoryError(
        f"cannot allocate {nbytes} bytes of shared memory ({os.strerror(err)}): "
        f"{where}. Free some (`python -m grain_shm gc` removes orphaned "
        "segments) or enlarge it: `docker run --shm-size=8g`, a Kubernetes "
        "emptyDir volume with `medium: Memory` mounted at /dev/shm, or "
        "`mount -o remount,size=8G /dev/shm`."
    )


def _no_address_space(Py_ssize_t nbytes):
    """MemoryError for an mmap that failed for want of address space or map slots."""
    return MemoryError(
        f"cannot map {nbytes} bytes of shared memory: this process is out of "
        "address space (RLIMIT_AS, `ulimit -v`) or of mappings "
        "(`sysctl vm.max_map_count`); /dev/shm itself had room"
    )


# ---------------------------------------------------------------------------
# The pool (SharedMemoryArray.enable_recycling): arenas of pre-faulted blocks
# that are reused at memcpy speed.  Layout and atomics: _pool.h.

cdef enum:
    N_CLASSES = 21               # blocks of 256 B ... 256 MiB
    ARENA_TARGET = 4 << 20       # bytes of blocks per arena, for small classes
    MAX_BLOCKS = 1024            # blocks per arena at most
    CACHE_ARENAS = 64            # other processes' arenas kept mapped, at most
    TRIM_EVERY = 256             # pool operations between looks at the clock

cdef double TRIM_INTERVAL = 1.0  # seconds between trims
cdef double IDLE_SECONDS = 2.0   # an own arena all free and untouched this long goes
cdef Py_ssize_t CACHE_BYTES = 2 << 30
cdef size_t PAGE = os.sysconf("SC_PAGESIZE")


cdef uint64_t _pid_namespace():
    """This process's pid namespace (the inode of /proc/self/ns/pid), or 0."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


cdef uint64_t PIDNS = _pid_namespace()


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


@cython.final
cdef class Arena:
    """One mapping of one arena: this process's own (it takes blocks from it)
    or another's (kept in the cache, so its blocks open without a system call).

    The geometry is copied from the header once, when it is validated, and
    never read from shared memory again: another process may scribble on the
    header, but not make a reference reach outside its block."""

    cdef gs_arena *hdr
    cdef size_t size
    cdef bytes path
    cdef str name
    cdef uint32_t nblocks
    cdef uint64_t block_bytes
    cdef uint64_t data_start
    cdef unsigned long owner_gen  # gs_generation of its making here; 0: another's
    cdef uint32_t *free           # own: the blocks known to be free
    cdef uint32_t nfree
    cdef uint64_t seen_remote     # remote_frees when the free list was rebuilt
    cdef Py_ssize_t live          # this process's segments over its blocks
    cdef unsigned long long used  # cache clock at its last open
    cdef unsigned long long takes # blocks taken, at the last trim and now
    cdef unsigned long long trim_takes
    cdef double idle_since

    def __dealloc__(self):
        if self.hdr != NULL:
            munmap(self.hdr, self.size)
        free(self.free)

    cdef inline bint own(self) noexcept:
        return self.owner_gen == gs_generation

    cdef void rebuild_free(self) noexcept:
        """Own arena: list every free block again, after other processes
        returned some (each block in the list is free, so none is listed twice)."""
        cdef uint32_t i = self.nblocks
        self.seen_remote = gs_remote_frees(self.hdr)
        self.nfree = 0
        while i > 0:  # from the top, so that block 0 is taken first
            i -= 1
            if GS_IS_FREE(gs_word(&self.hdr.blocks[i])):
                self.free[self.nfree] = i
                self.nfree += 1

    cdef void block_freed(self, gs_block *block) noexcept:
        """The block just became free in this process: back on the free list
        if the arena is ours, else its owner is told (and the arena unlinked
        if the owner is gone and this was its last block)."""
        if self.owner_gen == gs_generation:
            if self.nfree < self.nblocks:
                self.free[self.nfree] = <uint32_t>(block - &self.hdr.blocks[0])
                self.nfree += 1
        elif gs_arena_freed_remotely(self.hdr, self.nblocks):
            shm_unlink(self.path)

    def __repr__(self):
        return (f"<grain_shm Arena {self.name!r} {self.nblocks} x {self.block_bytes} B"
                f"{' own' if self.own() else ''}>")


cdef void _release_block(Arena arena, gs_block *block, bint unlink) noexcept:
    """The release of one block reference: the segment's __dealloc__, and exit."""
    if block == NULL:  # dropped already (exit)
        return
    arena.live -= 1
    if gs_block_release(block, unlink):
        arena.block_freed(block)
    _pool_tick()


@cython.no_gc_clear  # __dealloc__ needs `arena`; a Segment is in no cycle
cdef class Segment:
    """One mapping of one POSIX shared-memory segment, or one reference to a
    block of a pool arena; the base of its arrays."""

    cdef void *addr
    cdef size_t map_size       # bytes mapped (0: nothing mapped, or the arena's)
    cdef Py_ssize_t size       # bytes exported through the buffer protocol
    cdef bint readonly
    cdef bytes path            # b"/name"
    cdef str name_text         # the name as str, once asked for
    cdef gs_owner owner
    # A pool block: the arena's mapping (kept alive by this segment), where
    # the block starts in it, and the reference this segment holds.
    cdef Arena arena
    cdef size_t origin
    cdef uint32_t index
    cdef uint32_t generation
    cdef gs_blockref ref

    def __cinit__(self):
        self.addr = NULL

    @property
    def name(self) -> str:
        """The name without its leading "/", as multiprocessing.shared_memory spells it."""
        if self.name_text is None:  # decoded once: every pickle asks for it
            self.name_text = os.fsdecode(self.path[1:])
        return self.name_text

    @property
    def size(self) -> int:
        return self.size

    @property
    def address(self) -> int:
        return <size_t>self.addr

    @property
    def readonly(self) -> bool:
        return self.readonly

    @property
    def unlink_on_release(self) -> bool:
        return gs_owner_is_mine(&self.owner)

    @property
    def origin(self) -> int:
        """Where the buffer starts in the named segment (a block: in its arena)."""
        return self.origin

    @property
    def block(self):
        """(index, generation) of the pool block, or None for a segment of its own."""
        return None if self.arena is None else (self.index, self.generation)

    def mark_unlink_on_release(self):
        """Make this process the one that unlinks the name when this mapping goes."""
        gs_owner_add(&self.owner, <char *>self.path,
                     NULL if self.arena is None else &self.arena.hdr.blocks[self.index])

    def __getbuffer__(self, Py_buffer *view, int flags):
        cdef void *buf = self.addr if self.addr != NULL else <void *>_empty_buffer
        PyBuffer_FillInfo(view, self, buf, self.size, self.readonly, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        cdef const char *unlink_path = NULL
        if self.arena is not None:  # a block: a few atomics, never deferred
            _release_block(self.arena, gs_blockref_take(&self.ref),
                           gs_owner_take(&self.owner))
            return
        if self.path is not None and gs_owner_take(&self.owner):
            unlink_path = <char *>self.path
        if (self.addr == NULL and unlink_path == NULL) or gs_deleter_push(
                self.addr, self.map_size, unlink_path):
            self.addr = NULL
            return
        if self.map_size >= 65536:
            with nogil:
                gs_release(self.addr, self.map_size, unlink_path)
        else:
            gs_release(self.addr, self.map_size, unlink_path)
        self.addr = NULL

    def __repr__(self):
        if self.arena is not None:
            return f"<grain_shm Segment {self.name!r} block={self.index} size={self.size}>"
        return f"<grain_shm Segment {self.name!r} size={self.size}>"


cdef int _create(char *path, size_t length, void **addr, int *stage) noexcept nogil:
    """shm_open(O_EXCL) the name in `path`, size and reserve it, map it, close
    the fd. On failure nothing is left behind; returns the errno (EEXIST: pick
    another name), and `stage` says how far it got."""
    cdef int rc = 0
    stage[0] = 0
    cdef int fd = shm_open(path, O_CREAT | O_EXCL | O_RDWR, 0o600)
    if fd < 0:
        return errno
    stage[0] = 1
    rc = gs_reserve(fd, <off_t>length)
    if rc == 0:
        stage[0] = 2
        # The creator writes every page next: map them all in one go.
        addr[0] = gs_mmap(NULL, length, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_POPULATE, fd, 0)
        if addr[0] == MAP_FAILED:
            rc = errno
            addr[0] = NULL
    close(fd)
    if rc != 0:
        shm_unlink(path)
    return rc


cdef int _create_named(char *path, const char *prefix, size_t prefix_len,
                       size_t length, void **addr, int *stage) noexcept:
    """_create under a fresh name, retried while the name is taken. GIL held."""
    cdef int rc = EEXIST, attempt
    for attempt in range(CREATE_ATTEMPTS):
        rc = _new_path(path, prefix, prefix_len)
        if rc != 0:
            return rc
        with nogil:
            rc = _create(path, length, addr, stage)
        if rc != EEXIST:
            break
    return rc


def create(Py_ssize_t nbytes, bytes prefix not None):
    """A new segment of `nbytes` bytes named "/<prefix><12 random chars>"
    (unguessable), or a block of the pool if it is on and has room and the
    prefix is the pool's (a persistent prefix never takes a block). The
    prefix comes with each call, so no setting is shared between threads
    (see session.persistent())."""
    if nbytes < 0:
        raise ValueError(f"negative size: {nbytes}")
    cdef Segment block
    if _pool_limit > 0 and nbytes > 0 and prefix == _pool_prefix:
        block = _pool_take(nbytes)
        if block is not None:
            return block
    cdef size_t prefix_len = _check_prefix(prefix)
    cdef char path[PREFIX_CAP + RANDOM_CHARS + 1]
    cdef size_t length = nbytes if nbytes > 0 else 1
    cdef void *addr = NULL
    cdef int stage = 0
    cdef int rc = _create_named(path, prefix, prefix_len, length, &addr, &stage)
    cdef size_t pending
    cdef Py_ssize_t pooled = _pool_bytes
    if rc in (ENOSPC, ENOMEM, EFBIG) and stage == 1:  # /dev/shm is full: make room, once
        if pooled > 0:
            _pool_trim(0.0)  # the pool's idle arenas hold room: give it back
        with nogil:  # releases waiting for the deleter may hold room too
            pending = gs_deleter_flush()
        if pooled > 0 or pending > 0:
            rc = _create_named(path, prefix, prefix_len, length, &addr, &stage)
    if rc != 0:
        if stage == 1 and rc in (ENOSPC, ENOMEM, EFBIG):  # posix_fallocate
            raise _no_space(nbytes, rc)
        if stage == 2 and rc == ENOMEM:  # mmap: address space, not /dev/shm
            raise _no_address_space(nbytes)
        raise_errno(rc, path if stage > 0 else None)
    cdef Segment seg = Segment.__new__(Segment)
    seg.addr = addr
    seg.map_size = length
    seg.size = nbytes
    seg.path = path
    return seg


def open(name, Py_ssize_t required):
    """Map the existing segment `name`, which must hold at least `required` bytes."""
    cdef bytes path = _path_of(name)
    cdef const char *cpath = path
    cdef int fd
    cdef int prot = PROT_READ | PROT_WRITE
    cdef struct_stat st
    cdef void *addr = NULL
    with nogil:
        fd = shm_open(cpath, O_RDWR, 0)
        if fd < 0 and errno == EACCES:  # someone else's 0644 segment: read it
            prot = PROT_READ
            fd = shm_open(cpath, O_RDONLY, 0)
    check_rc(fd, path)
    if fstat(fd, &st) == -1:
        err = errno
        close(fd)
        raise_errno(err, path)
    cdef bint is_segment = gs_is_segment(st.st_mode)
    if not is_segment or st.st_size < required:
        close(fd)
        what = f"{st.st_size} bytes" if is_segment else "not a regular file"
        raise ValueError(
            f"shared memory {os.fsdecode(path[1:])!r} is {what}, but the "
            f"array needs {required} bytes: the metadata does not match the segment"
        )
    cdef size_t length = <size_t>st.st_size
    if length > 0:
        with nogil:
            # No MAP_POPULATE: read faults already map 16 pages at a time
            # (fault-around), and populating made open+read slower here.
            addr = gs_mmap(NULL, length, prot, MAP_SHARED, fd, 0)
        if addr == MAP_FAILED:
            err = errno
            close(fd)
            if err == ENOMEM:
                raise _no_address_space(length)
            raise_errno(err, path)
    close(fd)
    cdef Segment seg = Segment.__new__(Segment)
    seg.addr = addr
    seg.map_size = length
    seg.size = length
    seg.readonly = prot == PROT_READ
    seg.path = path
    return seg


def unlink(name):
    """Remove the name now; mappings of it stay valid until they are released."""
    cdef bytes path = _path_of(name)
    check_rc(shm_unlink(path), path)


# Bounds of enable_async_release: threads are a fixed array in C; each pending
# release holds a mapping (vm.max_map_count is 65530 by default) and a
# 280-byte slot of the ring.
MAX_THREADS = GS_MAX_THREADS
MAX_OUTSTANDING = 1 << 20


def enable_async_release(int num_threads, Py_ssize_t max_outstanding):
    """Hand every later release to `num_threads` pthreads, at most
    `max_outstanding` pending (queued or in flight); beyond that, inline.
    Already on: only the bound changes, no thread is added."""
    if not 1 <= num_threads <= MAX_THREADS:
        raise ValueError(f"num_threads must be 1 to {MAX_THREADS}, not {num_threads}")
    if not 1 <= max_outstanding <= MAX_OUTSTANDING:
        raise ValueError(
            f"max_outstanding_requests must be 1 to {MAX_OUTSTANDING}, not {max_outstanding}"
        )
    cdef int rc
    with nogil:
        rc = gs_deleter_enable(num_threads, <size_t>max_outstanding)
    if rc != 0:
        raise_errno(rc, None)


def stop_async_release():
    """Finish every pending release, stop the threads; later releases are inline.

    For interpreter exit (before `unlink_owned`) and `_disable_async_del`.
    It waits only for releases already in flight: the calling thread does the
    queued ones itself."""
    with nogil:
        gs_deleter_stop()


def async_release_stats():
    """The deleter's counters, for tests and diagnostics."""
    cdef gs_deleter_stats st
    gs_deleter_stats_get(&st)
    return {
        "num_threads": st.num_threads,
        "running": st.running,
        "max_outstanding": st.max_outstanding,
        "queued": st.queued,
        "in_flight": st.in_flight,
        "deferred": st.deferred,
        "refused": st.refused,
        "unlink_errors": st.unlink_errors,
    }


def _hold_async_release(bint on):
    """Tests only: while on, the workers take no new request (so a test can
    fill the queue and watch the bound at work)."""
    gs_deleter_hold(on)


def unlink_owned():
    """Unlink every name this process owns (for interpreter exit)."""
    gs_unlink_owned()


def segment_of(obj):
    """The Segment under an ndarray (through its chain of bases), or None."""
    return _segment_of(obj)


cdef object _segment_of(obj):
    while isinstance(obj, cnp.ndarray):
        base = cnp.PyArray_BASE(obj)
        if base is NULL:
            return None
        obj = <object>base
    return obj if type(obj) is Segment else None


def reference(arr not None):
    """(name, shape, dtype, strides, offset, block) of arr's elements if they
    are in a segment, else None: what pickling sends. strides is None for C
    order; offset is from the start of the named segment (for a block: of
    its arena); block is None or (index, generation)."""
    seg = _segment_of(arr)
    if seg is None:
        return None
    cdef Segment segment = seg
    cdef cnp.ndarray array = arr
    return (segment.name, arr.shape, arr.dtype,
            None if cnp.PyArray_IS_C_CONTIGUOUS(array) else arr.strides,
            _data_offset(array, segment),
            None if segment.arena is None else (segment.index, segment.generation))


def data_offset(cnp.ndarray arr not None, Segment seg not None):
    """Byte offset of arr's first element from the start of seg's named
    segment (for a block: of its arena)."""
    return _data_offset(arr, seg)


cdef inline Py_ssize_t _data_offset(cnp.ndarray arr, Segment seg) noexcept:
    cdef char *data = <char *>cnp.PyArray_DATA(arr)
    cdef char *start = <char *>seg.addr if seg.addr != NULL else _empty_buffer
    return <Py_ssize_t>(data - start) + <Py_ssize_t>seg.origin


# ---------------------------------------------------------------------------
# The pool's state in this process.  Touched with the GIL held.

cdef Py_ssize_t _pool_limit = 0      # bytes of own arenas at most; 0: off
cdef bytes _pool_prefix = b""        # what arena names start with (the session's)
cdef Py_ssize_t _pool_bytes = 0      # bytes of own arenas now
cdef unsigned long _pool_gen = 0     # gs_generation the own lists belong to
cdef list _pool_classes = [[] for _ in range(N_CLASSES)]  # own arenas by class
cdef dict _arenas = {}               # name -> Arena: own ones and the cache
cdef unsigned long long _cache_clock = 0
cdef unsigned long long _pool_ops = 0
cdef double _last_trim = 0.0
cdef unsigned long long _taken = 0, _fallbacks = 0, _arenas_made = 0, _arenas_retired = 0


cdef inline uint32_t _blocks_per_arena(int klass) noexcept:
    cdef uint64_t block_bytes = (<uint64_t>1) << (klass + GS_MIN_BLOCK_SHIFT)
    cdef uint64_t n = ARENA_TARGET // block_bytes
    return <uint32_t>(1 if n < 1 else (MAX_BLOCKS if n > MAX_BLOCKS else n))


cdef inline Py_ssize_t _arena_bytes(int klass) noexcept:
    cdef uint32_t n = _blocks_per_arena(klass)
    return <Py_ssize_t>(gs_arena_data_start(n, PAGE)
                        + n * ((<uint64_t>1) << (klass + GS_MIN_BLOCK_SHIFT)))


cdef Segment _block_segment(Arena arena, uint32_t index, uint32_t gen, Py_ssize_t nbytes):
    """The segment object of one reference (already counted) to a block."""
    cdef Segment seg = Segment.__new__(Segment)
    seg.arena = arena
    seg.index = index
    seg.generation = gen
    seg.origin = arena.data_start + index * arena.block_bytes
    seg.addr = <char *>arena.hdr + seg.origin
    seg.size = nbytes
    seg.path = arena.path
    gs_blockref_add(&seg.ref, &arena.hdr.blocks[index], <void *>arena)
    arena.live += 1
    return seg


cdef list _own_classes():
    """This process's own arenas by class. In a forked child the parent's
    are another process's: the child's pool starts empty (they stay in the
    cache, as foreign)."""
    global _pool_bytes, _pool_gen, _pool_classes
    if _pool_gen != gs_generation:
        _pool_classes = [[] for _ in range(N_CLASSES)]
        _pool_bytes = 0
        _pool_gen = gs_generation
    return _pool_classes


cdef Arena _new_arena(int klass):
    """A new own arena for blocks of `klass`, or None if the pool's bound or
    /dev/shm has no room for it (the caller falls back to a fresh segment)."""
    global _pool_bytes
    cdef Py_ssize_t size = _arena_bytes(klass)
    if _pool_bytes + size > _pool_limit:
        return None
    cdef char path[PREFIX_CAP + RANDOM_CHARS + 1]
    cdef void *addr = NULL
    cdef int stage = 0
    if _create_named(path, _pool_prefix, len(_pool_prefix) + 1, size, &addr, &stage) != 0:
        return None
    cdef uint32_t nblocks = _blocks_per_arena(klass)
    cdef Arena arena = Arena.__new__(Arena)
    arena.hdr = <gs_arena *>addr
    arena.size = size
    arena.path = path
    arena.name = arena.path[1:].decode("ascii")
    arena.nblocks = nblocks
    arena.block_bytes = (<uint64_t>1) << (klass + GS_MIN_BLOCK_SHIFT)
    arena.data_start = gs_arena_data_start(nblocks, PAGE)
    arena.owner_gen = gs_generation
    arena.free = <uint32_t *>malloc(nblocks * sizeof(uint32_t))
    if arena.free == NULL:
        shm_unlink(path)
        return None  # the Arena unmaps itself
    gs_arena_init(arena.hdr, nblocks, arena.block_bytes, arena.data_start, size,
                  os.getpid(), PIDNS)
    arena.rebuild_free()
    _pool_classes[klass].append(arena)
    _arenas[arena.name] = arena
    _pool_bytes += size
    global _arenas_made
    _arenas_made += 1
    return arena


cdef Segment _take_from(Arena arena, Py_ssize_t nbytes):
    """A block of an own arena for `nbytes`, or None if none is free."""
    global _taken
    cdef uint32_t gen, index
    if arena.nfree == 0 and gs_remote_frees(arena.hdr) != arena.seen_remote:
        arena.rebuild_free()  # other processes gave some back
    while arena.nfree > 0:
        arena.nfree -= 1
        index = arena.free[arena.nfree]
        gen = gs_block_take(&arena.hdr.blocks[index], nbytes)
        if gen != 0:  # 0: not free after all (a scribbled word): skip it
            arena.takes += 1
            _taken += 1
            return _block_segment(arena, index, gen, nbytes)
    return None


cdef Segment _pool_take(Py_ssize_t nbytes):
    """A block for `nbytes` from an own arena, or None: too large, or no
    room within the bound (the caller takes a fresh segment)."""
    global _fallbacks
    cdef int klass = gs_size_class(nbytes)
    cdef Arena arena
    cdef Segment seg
    if klass < N_CLASSES and _arena_bytes(klass) <= _pool_limit // 2:
        _pool_tick()
        for arena in _own_classes()[klass]:
            seg = _take_from(arena, nbytes)
            if seg is not None:
                return seg
        arena = _new_arena(klass)
        if arena is not None:
            return _take_from(arena, nbytes)
        _pool_maybe_trim()  # perhaps idle arenas of other classes hold the room
    _fallbacks += 1
    return None


cdef void _retire_own(Arena arena, int klass) noexcept:
    """Return an own arena, all free, to the system."""
    global _pool_bytes
    if gs_arena_retire(arena.hdr):
        shm_unlink(arena.path)
    _pool_classes[klass].remove(arena)
    _arenas.pop(arena.name, None)
    _pool_bytes -= arena.size
    arena.owner_gen = 0
    global _arenas_retired
    _arenas_retired += 1


cdef void _pool_trim(double idle_seconds) noexcept:
    """Unlink own arenas that have been all free, with no block taken, for
    `idle_seconds` (judged at two trims that far apart; 0: now)."""
    global _last_trim
    cdef double now = _now()
    cdef Arena arena
    cdef int klass
    _last_trim = now
    cdef list classes = _own_classes()
    for klass in range(N_CLASSES):
        for arena in list(classes[klass]):
            if gs_remote_frees(arena.hdr) != arena.seen_remote:
                arena.rebuild_free()
            if arena.nfree < arena.nblocks or (
                    idle_seconds > 0 and arena.takes != arena.trim_takes):
                arena.idle_since = now  # in use, or used since the last trim
                arena.trim_takes = arena.takes
            elif now - arena.idle_since >= idle_seconds:
                _retire_own(arena, klass)
    for arena in list(_arenas.values()):
        if not arena.own() and not arena.hdr.retired and _owner_gone(arena):
            if gs_arena_none_linked(arena.hdr, arena.nblocks) and gs_arena_retire(arena.hdr):
                shm_unlink(arena.path)


cdef bint _owner_gone(Arena arena) noexcept:
    """Whether another process's arena has lost its owner: it said so at
    exit, or it was killed (no such pid in its pid namespace, which is ours)."""
    if arena.hdr.owner_gone:
        return True
    if PIDNS == 0 or arena.hdr.owner_pidns != PIDNS or arena.hdr.owner_pid <= 0:
        return False  # its pid means nothing here
    try:
        os.kill(arena.hdr.owner_pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


cdef void _pool_maybe_trim() noexcept:
    if _now() - _last_trim >= TRIM_INTERVAL:
        _pool_trim(IDLE_SECONDS)


cdef inline void _pool_tick() noexcept:
    """One more pool operation (a take or a release): look at the clock every
    TRIM_EVERY of them, so that idle arenas go without a timer."""
    global _pool_ops
    _pool_ops += 1
    if _pool_ops % TRIM_EVERY == 0:
        _pool_maybe_trim()


cdef Arena _map_arena(str name):
    """Map another process's arena (or an own one no longer cached), check
    its header and put it in the cache."""
    cdef bytes path = _path_of(name)
    cdef const char *cpath = path
    cdef int fd
    cdef struct_stat st
    cdef void *addr = NULL
    with nogil:
        fd = shm_open(cpath, O_RDWR, 0)
    check_rc(fd, path)  # no read-only fallback: opening a block writes its word
    if fstat(fd, &st) == -1:
        err = errno
        close(fd)
        raise_errno(err, path)
    if not gs_is_segment(st.st_mode) or <size_t>st.st_size < sizeof(gs_arena):
        close(fd)
        raise ValueError(f"shared memory {name!r} is not a grain_shm pool arena")
    cdef size_t length = <size_t>st.st_size
    with nogil:
        # Populated: the pages exist already (the owner faulted them in), and
        # every later open of a block in it costs no fault at all.
        addr = gs_mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)
    err = errno
    close(fd)
    if addr == MAP_FAILED:
        if err == ENOMEM:
            raise _no_address_space(length)
        raise_errno(err, path)
    cdef Arena arena = Arena.__new__(Arena)
    arena.hdr = <gs_arena *>addr
    arena.size = length
    if not gs_arena_valid(arena.hdr, length):
        raise ValueError(f"shared memory {name!r} is not a grain_shm pool arena")
    arena.path = path
    arena.name = name
    arena.nblocks = arena.hdr.nblocks
    arena.block_bytes = arena.hdr.block_bytes
    arena.data_start = arena.hdr.data_start
    _cache_insert(arena)
    return arena


cdef void _cache_insert(Arena arena) noexcept:
    """Cache `arena`, then unmap the others' arenas that no array of this
    process uses: retired ones (nothing in them can be opened again), then
    the least recently used, while the cache is over its bounds."""
    _arenas[arena.name] = arena
    cdef list unused = []
    cdef Py_ssize_t count = 0, mapped = 0
    cdef Arena a
    for a in _arenas.values():
        if not a.own():
            count += 1
            mapped += a.size
            if a.live == 0 and a is not arena:
                unused.append((not a.hdr.retired, a.used, a))
    unused.sort(key=lambda entry: entry[:2])  # retired first, then oldest
    for still_linked, _, a in unused:
        if still_linked and count <= CACHE_ARENAS and mapped <= CACHE_BYTES:
            break
        del _arenas[a.name]  # unmapped with its last reference
        count -= 1
        mapped -= a.size


cdef Arena _arena_named(name):
    cdef Arena arena = _arenas.get(name)
    if arena is None:
        if not isinstance(name, str):
            name = os.fsdecode(name)
        arena = _map_arena(name)
    global _cache_clock
    _cache_clock += 1
    arena.used = _cache_clock
    return arena


cdef gs_block *_block_of(Arena arena, Py_ssize_t index, Py_ssize_t generation) except NULL:
    if not 0 <= index < arena.nblocks or not 0 < generation <= 0xFFFFFFFF:
        raise ValueError(
            f"no block ({index}, {generation}) in shared memory {arena.name!r}: it has "
            f"blocks 0 to {arena.nblocks - 1}, generations from 1"
        )
    return &arena.hdr.blocks[index]


def open_block(name, Py_ssize_t index, Py_ssize_t generation, Py_ssize_t low, Py_ssize_t high):
    """A reference to block `index` of arena `name`, still linked under
    `generation`, whose array holds bytes [low, high) of the arena."""
    cdef Arena arena = _arena_named(name)
    cdef gs_block *block = _block_of(arena, index, generation)
    cdef int rc = gs_block_acquire(block, <uint32_t>generation)
    if rc != 0:
        raise_errno(rc, arena.path)
    cdef uint64_t nbytes = block.nbytes
    cdef uint64_t start = arena.data_start + <uint64_t>index * arena.block_bytes
    if nbytes > arena.block_bytes or low < <Py_ssize_t>start or high > <Py_ssize_t>(start + nbytes):
        if gs_block_release(block, False):
            arena.block_freed(block)
        raise ValueError(
            f"shared memory {arena.name!r} block {index} holds {nbytes} bytes at "
            f"offset {start}, but the array needs bytes {low} to {high}: the "
            "metadata does not match the block"
        )
    return _block_segment(arena, <uint32_t>index, <uint32_t>generation, <Py_ssize_t>nbytes)


def unlink_block(name, Py_ssize_t index, Py_ssize_t generation):
    """Remove a block's "name": no new reference opens; it is free once the
    last mapping of it goes."""
    cdef Arena arena = _arena_named(name)
    cdef gs_block *block = _block_of(arena, index, generation)
    cdef int rc = gs_block_unlink(block, <uint32_t>generation)
    if rc < 0:
        raise_errno(ENOENT, arena.path)
    if rc == 1:
        arena.block_freed(block)


def enable_pool(Py_ssize_t max_bytes, bytes prefix not None):
    """Take new arrays created under `prefix` from the pool, whose own arenas
    hold `max_bytes` at most and are named with that prefix."""
    global _pool_limit, _pool_prefix
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    _check_prefix(prefix)
    _pool_prefix = prefix
    _pool_limit = max_bytes


def disable_pool():
    """New arrays get fresh segments again; arenas all free go now, the
    others once their blocks are free and a trim finds them so."""
    global _pool_limit
    _pool_limit = 0
    _pool_trim(0.0)


def pool_trim(double idle_seconds=0.0):
    """Return own arenas idle for `idle_seconds` to the system (tests, diagnostics)."""
    _pool_trim(idle_seconds)


def pool_stats():
    """The pool's figures in this process."""
    cdef Arena arena
    cdef uint32_t i
    cdef Py_ssize_t blocks = 0, in_use = 0, bytes_in_use = 0, cached = 0
    cdef list classes = _own_classes()
    for klass in range(N_CLASSES):
        for arena in classes[klass]:
            blocks += arena.nblocks
            for i in range(arena.nblocks):
                if not GS_IS_FREE(gs_word(&arena.hdr.blocks[i])):
                    in_use += 1
                    bytes_in_use += arena.hdr.blocks[i].nbytes
    for arena in _arenas.values():
        if not arena.own():
            cached += 1
    return {
        "max_bytes": _pool_limit,
        "arena_bytes": _pool_bytes,
        "arenas": sum(len(c) for c in classes),
        "blocks": blocks,
        "blocks_in_use": in_use,
        "bytes_in_use": bytes_in_use,
        "cached_arenas": cached,
        "taken": _taken,
        "fallbacks": _fallbacks,
        "arenas_made": _arenas_made,
        "arenas_retired": _arenas_retired,
    }


def pool_at_exit():
    """Exit: drop every block reference this process holds, and leave the own
    arenas to whoever frees their last block (the ones all free go now).
    After unlink_owned, so owned blocks are unlinked first."""
    global _pool_limit, _pool_bytes
    cdef gs_blockref *ref = gs_blockrefs_first()
    cdef Arena arena
    while ref != NULL:
        arena = <Arena>ref.arena
        _release_block(arena, gs_blockref_take(ref), False)
        ref = gs_blockrefs_first()
    _pool_limit = 0
    cdef list classes = _own_classes()
    for klass in range(N_CLASSES):
        for arena in classes[klass]:
            arena.owner_gen = 0
            if gs_arena_abandon(arena.hdr, arena.nblocks):
                shm_unlink(arena.path)
        classes[klass] = []
    _pool_bytes = 0


def block_state(name, Py_ssize_t index, Py_ssize_t generation):
    """(linked, references) of block `index` of arena `name` if it is still
    under `generation`, else None: what the pool knows of one array's "name"
    (tests, diagnostics)."""
    cdef Arena arena = _arena_named(name)
    cdef uint64_t word = gs_word(_block_of(arena, index, generation))
    if GS_GEN(word) != <uint32_t>generation:
        return None
    return bool(word & GS_LINKED), int(word & GS_REFS)


def wrap(type cls, Segment seg not None, tuple shape, cnp.dtype dtype not None,
         Py_ssize_t offset, strides):
    """An ndarray of `cls` over `seg`'s memory from `offset` on, with `seg`
    as its base. The caller has checked the geometry against the segment
    (layout, and open's or open_block's bounds); what numpy's buffer path
    would add is the cost of a buffer export (~1 us an array)."""
    cdef Py_ssize_t nd = len(shape), i
    cdef cnp.npy_intp dims[64]
    cdef cnp.npy_intp steps[64]
    if nd > 64:
        raise ValueError(f"maximum supported dimension for an ndarray is 64, found {nd}")
    for i in range(nd):
        dims[i] = shape[i]
    if strides is not None:
        if len(strides) != nd:
            raise ValueError(f"strides {strides} do not match shape {shape}")
        for i in range(nd):
            steps[i] = strides[i]
    cdef char *start = <char *>seg.addr if seg.addr != NULL else _empty_buffer
    cnp.Py_INCREF(dtype)  # PyArray_NewFromDescr steals it
    cdef cnp.ndarray arr = PyArray_NewFromDescr(
        cls, dtype, <int>nd, dims, NULL if strides is None else steps,
        start + offset, 0 if seg.readonly else cnp.NPY_ARRAY_WRITEABLE, None)
    cnp.set_array_base(arr, seg)
    return arr


# ---- SharedMemoryArray's __array_wrap__ and __getitem__: hot, so in C ----

cdef type _ndarray = cnp.ndarray
cdef object _ndarray_wrap = cnp.ndarray.__array_wrap__
cdef bint _NUMPY_1 = _numpy_version.startswith("1.")
cdef type _shared_type = None  # SharedMemoryArray (register_array_type)


def register_array_type(type cls not None):
    """The class whose results array_wrap makes plain (not its subclasses)."""
    global _shared_type
    _shared_type = cls


def array_wrap(self, arr, context=None, return_scalar=False):
    """SharedMemoryArray.__array_wrap__, as numpy.memmap's: a ufunc's or a
    reduction's result is new private memory, so a plain ndarray (or the
    scalar numpy gives); written in place (out=self) it stays self, and
    subclasses keep numpy's default. In C because it runs on every ufunc
    call: in Python it cost 0.8 us of a 4 KiB `a + 1`'s 1.4 us."""
    if arr is self or type(self) is not _shared_type:
        if _NUMPY_1:  # no return_scalar there
            return _ndarray_wrap(self, arr, context)
        return _ndarray_wrap(self, arr, context, return_scalar)
    if type(arr) is not _ndarray:
        arr = arr.view(_ndarray)
    if return_scalar or (_NUMPY_1 and (<cnp.ndarray>arr).ndim == 0):
        return arr[()]  # numpy 1 passes no return_scalar: a 0-d result stands for one
    return arr


def array_getitem(self, index):
    """SharedMemoryArray.__getitem__, as numpy.memmap's: basic indexing gives
    views of the shared memory, advanced indexing a copy, and a copy is a
    plain ndarray. In C: in Python it made `a[0]` five times slower."""
    result = gs_subscript(_ndarray, self, index)
    if type(result) is _shared_type and _segment_of(result) is None:
        return result.view(_ndarray)
    return result


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


include "ring.pyx"
