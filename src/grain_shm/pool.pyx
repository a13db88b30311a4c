# Included by _shm.pyx.  The pool (SharedMemoryArray.enable_recycling):
# arenas of pre-faulted blocks that are reused at memcpy speed.  Layout and
# atomics: _pool.h.

cdef enum:
    N_CLASSES = GS_CLASSES       # blocks of 256 B ... 256 MiB, 1.25x apart at most
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
    cdef gs_held *held            # this process's references per block (C memory)

    def __dealloc__(self):
        if self.held != NULL:
            if self.held.total > 0:
                return  # still counted (cannot be: segments keep their Arena): keep the mapping
            gs_core_acquire()  # the list of records
            gs_held_free(self.held)
            gs_core_release()
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


cdef void _release_block(Arena arena, uint32_t index, bint unlink) noexcept:
    """The release of one block reference this process holds (the segment's
    __dealloc__)."""
    cdef gs_block *block = &arena.hdr.blocks[index]
    gs_held_sub(arena.held, index)
    arena.live -= 1
    if gs_block_release(block, unlink):
        arena.block_freed(block)
    if arena.live == 0 and not arena.own() and (arena.hdr.retired or arena.hdr.owner_gone):
        _forget(arena)  # its last array here: nothing holds its pages for us now
    _pool_tick()


# ---------------------------------------------------------------------------
# The pool's state in this process, with every Arena's fields: touched under
# gs_core_lock (_lock.h; the GIL on the default build), taken by the entry
# points (create's pool branch, a block segment's release, open_block,
# unlink_block, and the functions below). Racing takers would underflow an
# arena's `nfree` and write past `free`, and the lists and dicts here change
# under an iteration. Its counters are plain integers for that reason: they
# change only under the lock. `create` reads `_pool_limit` unlocked only to
# skip the lock when the pool is off.

cdef Py_ssize_t _pool_limit = 0      # bytes of own arenas at most; 0: off
cdef bytes _pool_prefix = b""        # the creations it serves (the session's)
cdef bytes _arena_prefix = b""       # what arena names start with: it and the mark
cdef Py_ssize_t _pool_bytes = 0      # bytes of own arenas now
cdef unsigned long _pool_gen = 0     # gs_generation the own lists belong to
cdef list _pool_classes = [[] for _ in range(N_CLASSES)]  # own arenas by class
cdef dict _arenas = {}               # name -> Arena: own ones and the cache
cdef list _foreign = []              # the cache's arenas (the others'), for _let_go
cdef unsigned long long _cache_clock = 0
cdef unsigned long long _pool_ops = 0
cdef double _last_trim = 0.0
cdef unsigned long long _taken = 0, _fallbacks = 0, _arenas_made = 0, _arenas_retired = 0


cdef inline uint32_t _blocks_per_arena(int klass) noexcept:
    cdef uint64_t block_bytes = gs_class_bytes(klass)
    cdef uint64_t n = ARENA_TARGET // block_bytes
    return <uint32_t>(1 if n < 1 else (MAX_BLOCKS if n > MAX_BLOCKS else n))


cdef inline Py_ssize_t _arena_bytes(int klass) noexcept:
    """Header and blocks, in whole pages (tmpfs allocates no less)."""
    cdef uint32_t n = _blocks_per_arena(klass)
    cdef uint64_t end = gs_arena_data_start(n, PAGE) + n * gs_class_bytes(klass)
    return <Py_ssize_t>((end + PAGE - 1) // PAGE * PAGE)


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
    gs_held_add(arena.held, index)
    seg.held_epoch = arena.held.epoch
    arena.live += 1
    return seg


cdef list _own_classes():
    """This process's own arenas by class. In a forked child the parent's
    are another process's: the child's pool starts empty (they stay in the
    cache, as foreign)."""
    global _pool_bytes, _pool_gen, _pool_classes
    cdef int klass
    if _pool_gen != gs_generation:
        for klass in range(N_CLASSES):
            _foreign.extend(_pool_classes[klass])  # the parent's: cached, as another's
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
    cdef char path[PREFIX_CAP + 1 + RANDOM_CHARS + 1]  # the arena's mark too
    cdef void *addr = NULL
    cdef int stage = 0
    if _create_named(path, _arena_prefix, len(_arena_prefix) + 1, size, &addr, &stage) != 0:
        return None
    cdef uint32_t nblocks = _blocks_per_arena(klass)
    cdef Arena arena = Arena.__new__(Arena)
    arena.hdr = <gs_arena *>addr
    arena.size = size
    arena.path = path
    arena.name = arena.path[1:].decode("ascii")
    arena.nblocks = nblocks
    arena.block_bytes = gs_class_bytes(klass)
    arena.data_start = gs_arena_data_start(nblocks, PAGE)
    arena.owner_gen = gs_generation
    arena.free = <uint32_t *>malloc(nblocks * sizeof(uint32_t))
    arena.held = gs_held_new(arena.hdr, nblocks, path)
    if arena.free == NULL or arena.held == NULL:
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
        _let_go(False)
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
    for arena in list(_foreign):
        if not arena.hdr.retired and _owner_gone(arena):
            if gs_arena_none_linked(arena.hdr, arena.nblocks) and gs_arena_retire(arena.hdr):
                shm_unlink(arena.path)
            if arena.live == 0:
                _forget(arena)
    _let_go(False)


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


def enable_pool(Py_ssize_t max_bytes, bytes prefix not None):
    """Take new arrays created under `prefix` from the pool, whose own arenas
    hold `max_bytes` at most and are named with that prefix."""
    global _pool_limit, _pool_prefix, _arena_prefix
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    _check_prefix(prefix)
    if not _is_arena_path(b"/" + prefix + b"." + b"A" * RANDOM_CHARS):
        raise ValueError(f"pool prefix {prefix!r} is not a session's (names.segment_prefix)")
    cdef bytes arena_prefix = prefix + b"."  # names.ARENA_MARK
    gs_core_acquire()  # a creation reads the three together
    _pool_prefix = prefix
    _arena_prefix = arena_prefix
    _pool_limit = max_bytes
    gs_core_release()


def disable_pool():
    """New arrays get fresh segments again; arenas all free go now, the
    others once their blocks are free and a trim finds them so."""
    global _pool_limit
    gs_core_acquire()
    _pool_limit = 0
    _pool_trim(0.0)
    gs_core_release()


def block_size(Py_ssize_t nbytes):
    """The bytes of the block an array of `nbytes` (> 0) takes, or None if it
    is larger than any class (tests, diagnostics)."""
    if nbytes < 1:
        raise ValueError(f"nbytes must be positive, not {nbytes}")
    cdef int klass = gs_size_class(nbytes)
    return None if klass >= N_CLASSES else gs_class_bytes(klass)


def pool_trim(double idle_seconds=0.0):
    """Return own arenas idle for `idle_seconds` to the system (tests, diagnostics)."""
    gs_core_acquire()
    _pool_trim(idle_seconds)
    gs_core_release()


def pool_stats():
    """The pool's figures in this process."""
    gs_core_acquire()
    try:
        return _pool_stats_locked()
    finally:
        gs_core_release()


cdef dict _pool_stats_locked():
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


# This process's block references are dropped only after its last Python
# code can have run: atexit handlers registered before grain_shm's run after
# its exit hook, and daemon threads until the end, and either may still use
# an array, whose block the owner would reuse once it is given back.  So
# they go at the very end of the interpreter, in C (Py_AtExit: after
# finalization, no Python, atomics and shm_unlink only).
cdef bint _dropped_at_finalization = Py_AtExit(gs_helds_drop) == 0


def _leaves_through_os_exit():
    """Whether this process is a multiprocessing child started by fork or
    forkserver: those leave through os._exit once their exit handlers ran
    (popen_fork's _launch, forkserver's main), which skips the C hook."""
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if ((code.co_name == "_launch" and code.co_filename.endswith("popen_fork.py"))
                or (code.co_name == "main" and code.co_filename.endswith("forkserver.py"))):
            return True
        frame = frame.f_back
    return False


def pool_at_exit(bint leaving_through_os_exit=False):
    """Exit, after unlink_owned (so owned blocks are unlinked first): the pool
    off, and the own arenas left to whoever frees their last block (the ones
    all free go now). The block references this process holds are dropped at
    the interpreter's end (above), or here in a process for which that never
    comes (os._exit: a multiprocessing child started by fork or forkserver,
    found on the stack, or a caller that says so): then nothing of Python
    runs after but threading's shutdown."""
    gs_core_acquire()
    try:
        _pool_at_exit_locked(leaving_through_os_exit)
    finally:
        gs_core_release()


cdef _pool_at_exit_locked(bint leaving_through_os_exit):
    global _pool_limit, _pool_bytes
    cdef Arena arena
    _pool_limit = 0
    cdef list classes = _own_classes()
    for klass in range(N_CLASSES):
        for arena in classes[klass]:
            arena.owner_gen = 0
            if gs_arena_abandon(arena.hdr, arena.nblocks):
                shm_unlink(arena.path)
        classes[klass] = []
    _pool_bytes = 0
    if not _dropped_at_finalization or leaving_through_os_exit or _leaves_through_os_exit():
        gs_helds_drop()
        for arena in _arenas.values():
            arena.live = 0
