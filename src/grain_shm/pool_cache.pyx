# Included by _shm.pyx, after pool.pyx.  The others' arenas: mapped once
# (validated, their geometry copied), kept in a bounded cache, let go once
# nothing here uses them, and the blocks opened, unlinked and looked at by
# reference.


cdef Arena _map_arena(str name):
    """Map another process's arena (or an own one no longer cached), check
    its header and put it in the cache."""
    cdef bytes path = _path_of(name)
    if not _is_arena_path(path):
        raise ValueError(f"shared memory {name!r} is not a grain_shm pool arena (by its name)")
    cdef size_t length
    cdef void *addr = _map_structure(path, sizeof(gs_arena), "a grain_shm pool arena", &length)
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
    arena.held = gs_held_new(arena.hdr, arena.nblocks, path)
    if arena.held == NULL:
        raise MemoryError(f"no memory to count references to {name!r}")
    _cache_insert(arena)
    return arena


cdef void _forget(Arena arena) noexcept:
    """Drop a cached arena: unmapped with its last reference (at once, if no
    array of this process lives in it)."""
    if _arenas is not None and _arenas.get(arena.name) is arena:
        del _arenas[arena.name]
    if _foreign is not None and arena in _foreign:
        _foreign.remove(arena)


cdef Py_ssize_t _let_go(bint every_idle) noexcept:
    """Unmap the others' arenas in which no array of this process lives and
    that its owner retired or left (`every_idle`: all of them, for a full
    /dev/shm): tmpfs keeps a file's pages while anything maps it, so a cached
    arena would pin memory its owner gave back.  Returns how many went.
    What it costs a pool operation: a load per cached arena (two more for
    those with no live array here).  An owner killed before it could say it
    left is found by the trim (_owner_gone)."""
    cdef Arena arena
    cdef list idle = None
    if _foreign is None:  # the module is being torn down
        return 0
    for arena in _foreign:
        if arena.live == 0 and (every_idle or arena.hdr.retired or arena.hdr.owner_gone):
            if idle is None:
                idle = []
            idle.append(arena)
    if idle is None:
        return 0
    for arena in idle:
        _forget(arena)
    return len(idle)


cdef bint _pool_give_back() noexcept:
    """A full /dev/shm: give back the room the pool holds here, the own
    arenas all free and the mappings of the others' that no array here
    uses (their owner may have unlinked them).  Whether anything went."""
    cdef bint had_own = _pool_bytes > 0
    if had_own:
        _pool_trim(0.0)
    _own_classes()  # in a forked child, the parent's arenas are the others' too
    return _let_go(True) > 0 or had_own


cdef void _cache_insert(Arena arena) noexcept:
    """Cache `arena`, then unmap the others' arenas that no array of this
    process uses: retired ones (nothing in them can be opened again), then
    the least recently used, while the cache is over its bounds."""
    _arenas[arena.name] = arena
    _foreign.append(arena)
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
        _forget(a)  # unmapped with its last reference
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
    gs_core_acquire()  # the cache, the arena's fields, the reference counts
    try:
        return _open_block_locked(name, index, generation, low, high)
    finally:
        gs_core_release()


cdef Segment _open_block_locked(name, Py_ssize_t index, Py_ssize_t generation,
                                Py_ssize_t low, Py_ssize_t high):
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
    seg = _block_segment(arena, <uint32_t>index, <uint32_t>generation, <Py_ssize_t>nbytes)
    _let_go(False)  # after: this arena has a live array now, and stays
    return seg


def unlink_block(name, Py_ssize_t index, Py_ssize_t generation):
    """Remove a block's "name": no new reference opens; it is free once the
    last mapping of it goes."""
    cdef Arena arena
    cdef gs_block *block
    cdef int rc
    gs_core_acquire()
    try:
        arena = _arena_named(name)
        block = _block_of(arena, index, generation)
        rc = gs_block_unlink(block, <uint32_t>generation)
        if rc == 1:
            arena.block_freed(block)
    finally:
        gs_core_release()
    if rc < 0:
        raise_errno(ENOENT, arena.path)


def block_state(name, Py_ssize_t index, Py_ssize_t generation):
    """(linked, references) of block `index` of arena `name` if it is still
    under `generation`, else None: what the pool knows of one array's "name"
    (tests, diagnostics)."""
    cdef Arena arena
    cdef uint64_t word
    gs_core_acquire()
    try:
        arena = _arena_named(name)
        word = gs_word(_block_of(arena, index, generation))
    finally:
        gs_core_release()
    if GS_GEN(word) != <uint32_t>generation:
        return None
    return bool(word & GS_LINKED), int(word & GS_REFS)
