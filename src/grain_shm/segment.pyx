# Included by _shm.pyx: a segment's life. Names, create, open, map, unmap and
# unlink, the Segment object and its release, the deleter's controls, and
# the references pickling sends.

cdef enum:
    RANDOM_CHARS = 12            # 72 bits
    PREFIX_CAP = 17              # "/" + prefix + 12 random chars <= 30
    CREATE_ATTEMPTS = 16

cdef const char *ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef enum:
    RANDOM_POOL = 4096
# Random bytes for names, fetched a page at a time (one getrandom per ~340
# names). Touched under gs_names_lock (_lock.h; the GIL on the default
# build): two threads past the bound check at once would read beyond the
# buffer, or draw the same name. Emptied in a forked child so parent and
# child never draw the same names.
cdef unsigned char _random_pool[RANDOM_POOL]
cdef size_t _random_used = RANDOM_POOL


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
    prefix_len counts the "/"."""
    global _random_used
    cdef unsigned char drawn[RANDOM_CHARS]
    cdef int i, rc = 0
    gs_names_acquire()  # held for the draw; the refill (getrandom, which
    if _random_used + RANDOM_CHARS > RANDOM_POOL:  # never blocks once the
        rc = gs_random_bytes(_random_pool, RANDOM_POOL)  # system is up) is one
        if rc == 0:                                      # call per ~340 names
            _random_used = 0
    if rc == 0:
        memcpy(drawn, &_random_pool[_random_used], RANDOM_CHARS)
        _random_used += RANDOM_CHARS
    gs_names_release()
    if rc != 0:
        return rc
    out[0] = b"/"
    memcpy(&out[1], prefix, prefix_len - 1)
    for i in range(RANDOM_CHARS):
        out[prefix_len + i] = ALPHABET[drawn[i] & 63]
    out[prefix_len + RANDOM_CHARS] = 0
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


cdef enum:
    ARENA_MARK = 46  # "." : names.ARENA_MARK
    QUEUE_MARK = 126  # "~" : names.QUEUE_MARK


cdef int _mark_of(bytes path) noexcept:
    """The kind mark of "/name" if it is a session's arena or queue ring:
    "/gs", the 13 characters of a session, "_", the mark, 12 random
    characters (names.ARENA_RE, QUEUE_RE, in C: every open and unlink asks);
    else 0. The random characters never hold a mark."""
    cdef const unsigned char *p = path
    cdef Py_ssize_t i
    if len(path) != 30 or p[1] != b"g"[0] or p[2] != b"s"[0] or p[16] != b"_"[0]:
        return 0
    if p[17] != ARENA_MARK and p[17] != QUEUE_MARK:
        return 0
    for i in range(3, 16):
        if not (b"0"[0] <= p[i] <= b"9"[0] or b"a"[0] <= p[i] <= b"z"[0]):
            return 0
    for i in range(18, 30):
        if not (b"a"[0] <= p[i] <= b"z"[0] or b"A"[0] <= p[i] <= b"Z"[0]
                or b"0"[0] <= p[i] <= b"9"[0] or p[i] == b"-"[0] or p[i] == b"_"[0]):
            return 0
    return p[17]


cdef inline bint _is_arena_path(bytes path) noexcept:
    return _mark_of(path) == ARENA_MARK


cdef int _refuse_arena(bytes path, str what) except -1:
    """ValueError if `path` names a pool arena or a queue's ring: metadata
    without a block must not map an arena (its header hands the blocks out,
    its other bytes are other arrays) nor unlink it (every array in it would
    go), and no array's metadata may map or unlink a ring (its cells and
    claim words belong to the queue's protocol)."""
    cdef int mark = _mark_of(path)
    if mark == ARENA_MARK:
        raise ValueError(
            f"shared memory {os.fsdecode(path[1:])!r} is a pool arena, which holds "
            f"many arrays: {what} it needs a reference to one of its blocks "
            "(metadata with `block`), not the arena's name alone"
        )
    if mark == QUEUE_MARK:
        raise ValueError(
            f"shared memory {os.fsdecode(path[1:])!r} is a grain_shm.Queue's ring, "
            "not an array's segment: no array's metadata can map or unlink it"
        )
    return 0


def is_arena_name(name):
    """Whether `name` is a pool arena's (tests: names.is_arena agrees)."""
    return _is_arena_path(_path_of(name))


def is_queue_name(name):
    """Whether `name` is a queue's ring (tests: names.is_queue agrees)."""
    return _mark_of(_path_of(name)) == QUEUE_MARK


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


@cython.no_gc_clear  # __dealloc__ needs `arena`; a Segment is in no cycle
cdef class Segment:
    """One mapping of one POSIX shared-memory segment, or one reference to a
    block of a pool arena; the base of its arrays."""

    cdef void *addr
    cdef size_t map_size       # bytes mapped (0: nothing mapped, or the arena's)
    cdef Py_ssize_t size       # bytes exported through the buffer protocol
    cdef bint readonly
    cdef bytes path            # b"/name"
    cdef str name_text         # the name as str, once asked for (under the object's critical section)
    cdef gs_owner owner        # under gs_core_lock (_lock.h), as is the block reference
    # A pool block: the arena's mapping (kept alive by this segment), where
    # the block starts in it, and the reference this segment holds.
    cdef Arena arena
    cdef size_t origin
    cdef uint32_t index
    cdef uint32_t generation
    cdef uint32_t held_epoch   # the arena's epoch when counted (see gs_held)

    def __cinit__(self):
        self.addr = NULL

    @property
    def name(self) -> str:
        """The name without its leading "/", as multiprocessing.shared_memory spells it."""
        # Decoded once: every pickle asks for it. Two threads pickling one
        # array must not swap it under each other (a use after free without
        # the GIL): the object's critical section, nothing on the default build.
        cdef str text
        with cython.critical_section(self):
            text = self.name_text
        if text is None:
            text = os.fsdecode(self.path[1:])
            with cython.critical_section(self):
                if self.name_text is None:
                    self.name_text = text
                text = self.name_text
        return text

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
        gs_core_acquire()
        cdef bint mine = gs_owner_is_mine(&self.owner)
        gs_core_release()
        return mine

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
        gs_core_acquire()
        gs_owner_add(&self.owner, <char *>self.path,
                     NULL if self.arena is None else &self.arena.hdr.blocks[self.index])
        gs_core_release()

    def __getbuffer__(self, Py_buffer *view, int flags):
        cdef void *buf = self.addr if self.addr != NULL else <void *>_empty_buffer
        PyBuffer_FillInfo(view, self, buf, self.size, self.readonly, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        cdef const char *unlink_path = NULL
        cdef bint owned
        if self.arena is not None:  # a block: a few atomics, never deferred
            gs_core_acquire()
            owned = gs_owner_take(&self.owner)
            if self.held_epoch == self.arena.held.epoch:  # not dropped at exit yet
                _release_block(self.arena, self.index, owned)
            gs_core_release()
            return
        if self.path is not None:
            gs_core_acquire()  # only the owner list: the release is outside
            owned = gs_owner_take(&self.owner)
            gs_core_release()
            if owned:
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
    """_create under a fresh name, retried while the name is taken. Called
    attached to the interpreter; the system calls run detached (nogil)."""
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
    cdef Segment block = None
    if _pool_limit > 0 and nbytes > 0:  # a plain load: off is off, whatever a racing enable does
        gs_core_acquire()  # the pool's settings, arenas and counters
        try:
            if _pool_limit > 0 and prefix == _pool_prefix:
                block = _pool_take(nbytes)
        finally:
            gs_core_release()
        if block is not None:
            return block
    cdef size_t prefix_len = _check_prefix(prefix)
    cdef char path[PREFIX_CAP + RANDOM_CHARS + 1]
    cdef size_t length = nbytes if nbytes > 0 else 1
    cdef void *addr = NULL
    cdef int stage = 0
    cdef int rc = _create_named(path, prefix, prefix_len, length, &addr, &stage)
    cdef size_t pending
    cdef bint pooled
    if rc in (ENOSPC, ENOMEM, EFBIG) and stage == 1:  # /dev/shm is full: make room, once
        gs_core_acquire()
        pooled = _pool_give_back()  # idle arenas, own or cached, hold room
        gs_core_release()
        with nogil:  # releases waiting for the deleter may hold room too
            pending = gs_deleter_flush()
        if pooled or pending > 0:
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


cdef void *_map_structure(bytes path, size_t header_bytes, str what,
                          size_t *length) except NULL:
    """Map the whole of an existing arena or ring, read and write: `what`
    ("a grain_shm pool arena", "a grain_shm queue") names it in the error if
    it is no file or is shorter than its header. Populated: its creator
    faulted every page in, so no later access faults. The caller validates
    the header."""
    cdef const char *cpath = path
    cdef int fd
    cdef struct_stat st
    cdef void *addr = NULL
    with nogil:
        fd = shm_open(cpath, O_RDWR, 0)
    check_rc(fd, path)  # no read-only fallback: claims and block words are written
    if fstat(fd, &st) == -1:
        err = errno
        close(fd)
        raise_errno(err, path)
    if not gs_is_segment(st.st_mode) or <size_t>st.st_size < header_bytes:
        close(fd)
        raise ValueError(f"shared memory {os.fsdecode(path[1:])!r} is not {what}")
    length[0] = <size_t>st.st_size
    with nogil:
        addr = gs_mmap(NULL, length[0], PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       fd, 0)
    err = errno
    close(fd)
    if addr == MAP_FAILED:
        if err == ENOMEM:
            raise _no_address_space(length[0])
        raise_errno(err, path)
    return addr


def open(name, Py_ssize_t required):
    """Map the existing segment `name`, which must hold at least `required`
    bytes; never a pool arena (open_block maps those)."""
    cdef bytes path = _path_of(name)
    _refuse_arena(path, "to map an array in it,")
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
    """Remove the name now; mappings of it stay valid until they are released.
    Never a pool arena's (unlink_block unlinks a block's "name")."""
    cdef bytes path = _path_of(name)
    _refuse_arena(path, "to unlink an array in it,")
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
    gs_core_acquire()
    gs_unlink_owned()
    gs_core_release()


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
