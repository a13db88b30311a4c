# The ring behind grain_shm.Queue (queue.py): one segment of the session
# holding a bounded MPMC ring of cells (layout, protocol and memory orders:
# _ring.h).  Included from _shm.pyx, whose segments, pool blocks and array
# references it uses; what a cell carries is decided here:
#
# - a SharedMemoryArray itself (a view too): its reference in binary (the
#   elements _shm.reference gives, which pickling sends), rebuilt on the other
#   side by the functions unpickling calls (a pooled C-contiguous array: by
#   their checks and calls without their Python steps, _open_pooled), so what
#   arrives and who owns it is what pickle.loads would give: no pickle call,
#   and with the pool on no system call on either side;
# - anything else: pickle protocol 5, in the cell if it fits, else in a
#   uint8 SharedMemoryArray (a pool block, or a segment of its own) whose
#   reference goes in the cell: the receiver reads it and unlinks it.

from grain_shm._ring cimport (GS_KIND_ARRAY, GS_KIND_LARGE,
                              GS_KIND_PICKLE, GS_READING, GS_RING_OK, GS_WRITING,
                              gs_cell, gs_cell_stride, gs_claimer, gs_monotonic_ns,
                              gs_pid_dead, gs_progress, gs_ring, gs_ring_bytes,
                              gs_ring_depth, gs_ring_free, gs_ring_has_room, gs_ring_handles_add,
                              gs_ring_init, gs_ring_init_pid, gs_ring_large_bytes,
                              gs_ring_pid, gs_ring_publish, gs_ring_reclaim,
                              gs_ring_try, gs_ring_view, gs_ring_wait_claim,
                              gs_ring_wait_room, gs_ringview)
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t

import pickle as _pickle

if gs_ring_init_pid() != 0:
    raise OSError("pthread_atfork failed")

cdef enum:
    RECORD_MAX = 1280            # an array reference in binary: 32 dims, strided, long names
    MAX_RECORD_DIMS = 32

cdef int64_t SLICE_NS = 100000000        # a blocked call looks at signals this often
cdef int64_t DEAD_AFTER_NS = 1000000000  # and at a claimer's pid once stuck this long
cdef object _dumps = _pickle.dumps
cdef object _loads = _pickle.loads
cdef object _uint8 = None
cdef object _np_dtype = None


# ---- An array's reference, in binary ----
#
#   0  u8 ndim, u8 strided, u8 name length, u8 dtype length
#   4  u32 block index, u32 block generation (0: a segment of its own), u32 0
#  16  i64 offset from the start of the named segment
#  24  i64 shape[ndim], then i64 strides[ndim] if strided
#      the name (without "/"), the dtype's string

cdef Py_ssize_t _encode_array(object arr, unsigned char *out, Py_ssize_t room) except -2:
    """Write arr's reference into `out`; its length, or -1 if it has no
    binary form here (a private copy, a dtype without a plain string, too
    many dimensions, no room): then it is pickled, as before."""
    seg = _segment_of(arr)
    if seg is None:
        return -1
    cdef Segment segment = <Segment>seg
    cdef cnp.ndarray array = <cnp.ndarray>arr
    dtype = <object>cnp.PyArray_DESCR(array)
    if dtype.isbuiltin != 1:  # numpy's own, native, no metadata: its str rebuilds it
        return -1
    cdef int nd = cnp.PyArray_NDIM(array), i
    cdef bint strided = not cnp.PyArray_IS_C_CONTIGUOUS(array)
    cdef bytes name = segment.path
    cdef bytes dtype_str = (<str>dtype.str).encode("ascii")
    cdef Py_ssize_t name_len = len(name) - 1, dtype_len = len(dtype_str)
    cdef Py_ssize_t n = 24 + 8 * nd * (2 if strided else 1) + name_len + dtype_len
    if nd > MAX_RECORD_DIMS or name_len > 255 or dtype_len > 255 or n > room:
        return -1
    cdef uint32_t block[3]
    cdef int64_t value
    out[0] = <unsigned char>nd
    out[1] = strided
    out[2] = <unsigned char>name_len
    out[3] = <unsigned char>dtype_len
    block[0] = 0 if segment.arena is None else segment.index
    block[1] = 0 if segment.arena is None else segment.generation
    block[2] = 0
    memcpy(&out[4], block, 12)
    value = _data_offset(array, segment)
    memcpy(&out[16], &value, 8)
    cdef unsigned char *p = &out[24]
    for i in range(nd):
        value = cnp.PyArray_DIMS(array)[i]
        memcpy(p, &value, 8)
        p += 8
    if strided:
        for i in range(nd):
            value = cnp.PyArray_STRIDES(array)[i]
            memcpy(p, &value, 8)
            p += 8
    memcpy(p, <const char *>name + 1, name_len)
    memcpy(p + name_len, <const char *>dtype_str, dtype_len)
    return n


cdef object _decode_array(const unsigned char *p, Py_ssize_t n):
    """The arguments of array._rebuild / _rebuild_block for a reference
    written by _encode_array, checked against its length (a cell's bytes
    are another process's and not trusted)."""
    if n < 24:
        raise ValueError("a grain_shm.Queue cell holds a truncated array reference")
    cdef int nd = p[0], i
    cdef bint strided = p[1] != 0
    cdef Py_ssize_t name_len = p[2], dtype_len = p[3]
    if n != 24 + 8 * nd * (2 if strided else 1) + name_len + dtype_len:
        raise ValueError("a grain_shm.Queue cell holds a malformed array reference")
    cdef uint32_t block[2]
    cdef int64_t value
    memcpy(block, &p[4], 8)
    memcpy(&value, &p[16], 8)
    offset = value
    cdef const unsigned char *q = &p[24]
    shape = []
    for i in range(nd):
        memcpy(&value, q, 8)
        shape.append(value)
        q += 8
    strides = None
    if strided:
        strides = []
        for i in range(nd):
            memcpy(&value, q, 8)
            strides.append(value)
            q += 8
        strides = tuple(strides)
    name = (<const char *>q)[:name_len].decode("utf-8", "surrogateescape")
    dtype = (<const char *>q + name_len)[:dtype_len].decode("ascii")
    if block[1] == 0:
        return _array_module()._rebuild, (name, tuple(shape), dtype, strides, offset)
    return _array_module()._rebuild_block, (name, tuple(shape), dtype, strides, offset,
                                           block[0], block[1])


cdef object _array_mod = None
cdef object _session_mod = None
cdef dict _dtypes = {}  # dtype string -> np.dtype: only plain builtin ones are sent so


cdef object _open_pooled(tuple args):
    """The common case of _rebuild_block without its Python-level steps: a
    C-contiguous array in a pool block, in a process that has joined the
    session. The same checks and calls as array._map (open_block's bounds,
    then wrap); None where they would not all pass, and the caller takes
    the full path (which raises what it raises)."""
    name, shape, dtype_str, strides, offset, index, generation = args
    if strides is not None or not _session_mod.joined:
        return None
    dtype = _dtypes.get(dtype_str)
    if dtype is None:
        dtype = _dtypes[dtype_str] = _np_dtype(dtype_str)
    if dtype.hasobject:
        return None
    cdef Py_ssize_t nbytes = dtype.itemsize, dim, start = offset
    for d in shape:
        dim = d
        if dim < 0 or gs_mul_overflow(nbytes, dim, &nbytes):
            return None
    if start < 0 or start > PY_SSIZE_T_MAX - nbytes:
        return None
    seg = open_block(name, index, generation, start, start + nbytes)
    return wrap(_shared_type, seg, shape, dtype, start - (<Segment>seg).origin, None)


cdef object _array_module():
    """grain_shm.array (it imports this extension: looked up on first use)."""
    global _array_mod, _uint8, _session_mod, _np_dtype
    if _array_mod is None:
        from grain_shm import array, session
        import numpy
        _array_mod = array
        _session_mod = session
        _np_dtype = numpy.dtype
        _uint8 = numpy.dtype(numpy.uint8)
    return _array_mod


# ---- The ring ----

@cython.final
cdef class Ring:
    """One mapping of one queue's segment, and the put and get on it."""

    cdef gs_ringview view
    cdef void *addr
    cdef size_t size
    cdef bytes path
    cdef str name_text
    cdef bint judge_pids      # claimers' pids mean something here (same pid namespace)
    # The claimed cell a put [0] or get [1] last found in its way, since when,
    # and when its claimer's pid was last looked up (see _stuck). Threads
    # sharing a handle share the watch: touched in the object's critical
    # section (nothing on the default build, where the GIL guards it).
    cdef gs_cell *watch_cell[2]
    cdef uint64_t watch_seen[2]
    cdef int64_t watch_since[2]
    cdef int64_t watch_checked[2]

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.size)

    @property
    def name(self) -> str:
        return self.name_text

    @property
    def capacity(self) -> int:
        return self.view.capacity

    @property
    def cell_bytes(self) -> int:
        return self.view.cell_bytes

    @property
    def max_bytes(self) -> int:
        return self.view.max_bytes

    @property
    def size(self) -> int:
        return self.size

    def depth(self):
        """Items in the ring now (approximate while others work)."""
        return gs_ring_depth(&self.view)

    def wait_room(self, double timeout):
        """True once a put would find its cell free, False if `timeout`
        seconds (0: do not wait; < 0: for ever) pass first; claims nothing.
        For a queue's only producer, which then knows its next put will not
        wait (the prefetcher's worker waits so before making an item, as it
        waited for a credit). Ctrl-C and other signals' handlers run between
        slices of the wait."""
        if gs_ring_has_room(&self.view):
            return True
        if timeout == 0:
            return False
        cdef int64_t now = gs_monotonic_ns(), until
        cdef int64_t deadline = -1 if timeout < 0 else now + <int64_t>(min(timeout, 1e9) * 1e9)
        while True:
            until = now + SLICE_NS if deadline < 0 else min(now + SLICE_NS, deadline)
            with nogil:
                gs_ring_wait_room(&self.view, until)
            if gs_ring_has_room(&self.view):
                return True
            now = gs_monotonic_ns()
            if deadline >= 0 and now >= deadline:
                return False
            PyErr_CheckSignals()

    def large_bytes(self):
        """Bytes of large items waiting (what max_bytes bounds)."""
        return gs_ring_large_bytes(&self.view)

    def add_handle(self, int delta):
        """+1 or -1 on the handles the header counts; the count after, or
        -1 if it was 0 already."""
        return gs_ring_handles_add(self.view.ring, delta)

    def unlink(self):
        """Remove the name: no new handle opens; mappings stay valid."""
        shm_unlink(self.path)

    cdef bint _stuck(self, bint for_get, gs_cell *cell, uint64_t seen, int64_t now) noexcept:
        """After a failed claim: whether `cell`, found claimed (`seen`), has
        been so for a second and its claimer is dead, and was taken back
        here.  The watch lasts across calls, so a consumer that polls with
        short timeouts (or none) gets past a dead producer's cell too."""
        with cython.critical_section(self):
            return self._stuck_locked(for_get, cell, seen, now)

    cdef bint _stuck_locked(self, bint for_get, gs_cell *cell, uint64_t seen,
                            int64_t now) noexcept:
        cdef int side = 1 if for_get else 0
        if cell == NULL or gs_progress(seen) % 4 not in (GS_WRITING, GS_READING):
            self.watch_cell[side] = NULL
            return False
        if seen != self.watch_seen[side] or cell != self.watch_cell[side]:
            self.watch_cell[side] = cell
            self.watch_seen[side] = seen
            self.watch_since[side] = now
            self.watch_checked[side] = 0
            return False
        if (now - self.watch_since[side] < DEAD_AFTER_NS or not self.judge_pids
                or now - self.watch_checked[side] < SLICE_NS
                or gs_claimer(seen) == gs_ring_pid):
            return False
        self.watch_checked[side] = now  # looking up a pid is a system call: ten a second at most
        if not gs_pid_dead(gs_claimer(seen)):
            return False
        gs_ring_reclaim(&self.view, cell, seen)
        self.watch_cell[side] = NULL
        return True

    cdef bint _claim(self, bint for_get, double timeout, uint64_t large, uint64_t *pos,
                     gs_cell **cell) except -1:
        """Claim a cell: True once it is ours, False when `timeout` seconds
        (0: none; < 0: for ever) pass first.  Waits without the GIL, in
        slices: between them a signal's handler runs (Ctrl-C raises here),
        and a cell claimed by a process found dead after a second of waiting
        is taken back."""
        cdef uint64_t seen = 0
        cdef int rc = gs_ring_try(&self.view, for_get, gs_ring_pid, large, pos, cell, &seen)
        if rc == GS_RING_OK:
            return True
        cdef int64_t now = gs_monotonic_ns(), until
        while self._stuck(for_get, cell[0], seen, now):
            rc = gs_ring_try(&self.view, for_get, gs_ring_pid, large, pos, cell, &seen)
            if rc == GS_RING_OK:
                return True
        if timeout == 0:
            return False
        cdef int64_t deadline = -1 if timeout < 0 else now + <int64_t>(min(timeout, 1e9) * 1e9)
        while True:
            until = now + SLICE_NS if deadline < 0 else min(now + SLICE_NS, deadline)
            with nogil:
                rc = gs_ring_wait_claim(&self.view, for_get, gs_ring_pid, large, until,
                                        pos, cell, &seen)
            if rc == GS_RING_OK:
                return True
            now = gs_monotonic_ns()
            if self._stuck(for_get, cell[0], seen, now):
                continue  # taken back: try again at once
            if deadline >= 0 and now >= deadline:
                return False
            PyErr_CheckSignals()

    cdef bint _put_raw(self, const unsigned char *data, Py_ssize_t n, uint32_t kind,
                       uint64_t large, double timeout) except -1:
        cdef uint64_t pos
        cdef gs_cell *cell = NULL
        if not self._claim(False, timeout, large, &pos, &cell):
            return False
        memcpy(cell.data, data, n)  # nothing between claim and publish can fail
        gs_ring_publish(&self.view, cell, pos, <uint32_t>n, kind)
        return True

    def put(self, obj, double timeout):
        """Put `obj`: True once it is in the ring, False if `timeout` passed
        (0: do not wait; < 0: wait for ever) with the ring full."""
        cdef unsigned char record[RECORD_MAX + 8]
        cdef Py_ssize_t n = -1, room = min(<Py_ssize_t>self.view.cell_bytes, RECORD_MAX)
        if type(obj) is _shared_type:
            n = _encode_array(obj, record, room)
            if n >= 0:
                return self._put_raw(record, n, GS_KIND_ARRAY, 0, timeout)
        cdef bytes data = _dumps(obj, 5)
        if len(data) <= <Py_ssize_t>self.view.cell_bytes:
            return self._put_raw(<const unsigned char *>data, len(data), GS_KIND_PICKLE, 0,
                                 timeout)
        return self._put_large(data, timeout, record, room)

    cdef bint _put_large(self, bytes data, double timeout, unsigned char *record,
                         Py_ssize_t room) except -1:
        """A pickle too large for a cell: into a uint8 SharedMemoryArray (a
        pool block when the pool is on), whose reference goes in the cell;
        unlinked here unless it was put."""
        _array_module()
        cdef uint64_t nbytes = len(data)
        arr = _shared_type((len(data),), _uint8)
        cdef Segment seg = <Segment>_segment_of(arr)
        cdef const char *src = data
        if nbytes >= 65536:
            with nogil:
                memcpy(seg.addr, src, nbytes)
        else:
            memcpy(seg.addr, src, nbytes)
        memcpy(record, &nbytes, 8)
        cdef bint put = False
        try:
            n = _encode_array(arr, record + 8, room - 8)
            if n < 0:
                raise RuntimeError("a grain_shm.Queue cell has no room for an array reference")
            put = self._put_raw(record, n + 8, GS_KIND_LARGE, nbytes, timeout)
        finally:
            if not put:
                seg.mark_unlink_on_release()
        return put

    def get(self, double timeout, default):
        """The next item, or `default` if `timeout` passed (0: do not wait;
        < 0: wait for ever) with the ring empty."""
        cdef uint64_t pos
        cdef gs_cell *cell = NULL
        if not self._claim(True, timeout, 0, &pos, &cell):
            return default
        cdef uint32_t kind = cell.kind
        cdef Py_ssize_t n = cell.length
        rebuild = args = data = None
        try:
            if n > <Py_ssize_t>self.view.cell_bytes:
                raise ValueError(f"a grain_shm.Queue cell says it holds {n} bytes, more than "
                                 f"its {self.view.cell_bytes}")
            if kind == GS_KIND_ARRAY:
                rebuild, args = _decode_array(cell.data, n)
            elif kind == GS_KIND_PICKLE:
                data = PyBytes_FromStringAndSize(<const char *>cell.data, n)
            elif kind == GS_KIND_LARGE and n > 8:
                rebuild, args = _decode_array(cell.data + 8, n - 8)
            else:
                raise ValueError(f"a grain_shm.Queue cell holds an item of unknown kind {kind}")
        finally:
            gs_ring_free(&self.view, cell, pos)  # the cell is free before anything is opened
        if kind == GS_KIND_ARRAY:
            if len(args) == 7:
                arr = _open_pooled(args)
                if arr is not None:
                    return arr
            return rebuild(*args)
        if kind == GS_KIND_PICKLE:
            return _loads(data)
        arr = rebuild(*args)
        arr.unlink_on_del()
        return _loads(arr)

    def drain(self):
        """Take every item left and drop it, unlinking large items' arrays
        (the last handle's close: nobody can get them any more)."""
        cdef uint64_t pos
        cdef gs_cell *cell = NULL
        while self._claim(True, 0, 0, &pos, &cell):
            rebuild = None
            try:
                if cell.kind == GS_KIND_LARGE and 8 < cell.length <= self.view.cell_bytes:
                    rebuild, args = _decode_array(cell.data + 8, cell.length - 8)
            except ValueError:
                pass
            finally:
                gs_ring_free(&self.view, cell, pos)
            if rebuild is not None:
                try:
                    rebuild(*args).unlink_on_del()
                except (OSError, ValueError):
                    pass  # gone already

    def _claim_and_abandon(self, bint for_get):
        """Tests only: claim a cell (a get: the item at the head) and leave it
        claimed, as a process killed in the middle of a put or get would.
        False if there was nothing to claim."""
        cdef uint64_t pos
        cdef gs_cell *cell = NULL
        return self._claim(for_get, 0, 0, &pos, &cell)

    def __repr__(self):
        return f"<grain_shm Ring {self.name_text!r} {self.view.capacity} x {self.view.cell_bytes} B>"


cdef Ring _ring_of(void *addr, size_t size, bytes path):
    """The Ring over a mapping, once its header checks out (the caller
    unmaps on an exception; from here on the Ring does)."""
    cdef gs_ringview view
    if not gs_ring_view(<gs_ring *>addr, size, &view):
        raise ValueError(f"shared memory {os.fsdecode(path[1:])!r} is not a grain_shm queue")
    cdef Ring ring = Ring.__new__(Ring)
    ring.view = view
    ring.size = size
    ring.path = path
    ring.name_text = os.fsdecode(path[1:])
    ring.judge_pids = PIDNS != 0 and view.ring.pidns == PIDNS
    ring.addr = addr
    return ring


def ring_create(Py_ssize_t capacity, Py_ssize_t cell_bytes, Py_ssize_t max_bytes,
                bytes prefix not None):
    """A new ring of `capacity` cells of at least `cell_bytes` each, bounding
    large items in flight to `max_bytes`, named "/<prefix>~<12 random chars>"
    (a session's prefix: the mark keeps array metadata off it); this handle
    holds its one count."""
    if not 1 <= capacity <= 0x7FFFFFFF:
        raise ValueError(f"capacity must be 1 to {0x7FFFFFFF}, not {capacity}")
    if not 8 <= cell_bytes <= (1 << 24) or max_bytes < 1:
        raise ValueError(f"cell_bytes must be 8 to {1 << 24}, and max_bytes positive")
    cdef uint64_t stride = gs_cell_stride(cell_bytes)
    cdef uint64_t size = gs_ring_bytes(<uint32_t>capacity, stride)
    if size == 0 or size > <uint64_t>PY_SSIZE_T_MAX:
        raise ArraySizeError(f"a ring of {capacity} cells of {cell_bytes} bytes is too large")
    cdef bytes marked = prefix + b"~"  # names.QUEUE_MARK, one byte past a session's prefix
    if _mark_of(b"/" + marked + b"A" * RANDOM_CHARS) != QUEUE_MARK:
        raise ValueError(f"a queue's prefix must be a session's, not {prefix!r}")
    prefix = marked
    cdef size_t prefix_len = len(prefix) + 1
    cdef char path[PREFIX_CAP + 1 + RANDOM_CHARS + 1]
    cdef void *addr = NULL
    cdef int stage = 0
    cdef int rc = _create_named(path, prefix, prefix_len, size, &addr, &stage)
    if rc != 0:
        if stage == 1 and rc in (ENOSPC, ENOMEM, EFBIG):
            raise _no_space(size, rc)
        raise_errno(rc, path if stage > 0 else None)
    gs_ring_init(<gs_ring *>addr, <uint32_t>capacity, stride, size, <uint64_t>max_bytes,
                 os.getpid(), PIDNS)
    try:
        return _ring_of(addr, size, path)
    except BaseException:
        munmap(addr, size)
        shm_unlink(path)
        raise


def ring_open(name):
    """Map the existing ring `name` (its handle count is the caller's to add)."""
    cdef bytes path = _path_of(name)
    if _mark_of(path) != QUEUE_MARK:
        raise ValueError(f"shared memory {os.fsdecode(path[1:])!r} is not a grain_shm queue")
    cdef size_t length
    cdef void *addr = _map_structure(path, sizeof(gs_ring), "a grain_shm queue", &length)
    try:
        return _ring_of(addr, length, path)
    except BaseException:
        munmap(addr, length)
        raise
