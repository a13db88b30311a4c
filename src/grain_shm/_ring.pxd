# C declarations of the queue's ring (_ring.h), kept apart from its logic (ring.pyx).
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cdef extern from "_ring.h" nogil:
    enum: GS_RING_PAD
    enum: GS_CELL_HEADER
    enum: GS_WRITING
    enum: GS_READING
    enum: GS_RING_OK
    enum: GS_RING_FULL
    enum: GS_RING_EMPTY
    enum: GS_RING_BUSY
    enum: GS_KIND_ARRAY
    enum: GS_KIND_PICKLE
    enum: GS_KIND_LARGE
    ctypedef struct gs_ring:
        uint32_t capacity
        uint64_t cell_bytes
        uint64_t max_bytes
        uint64_t pidns
        uint32_t handles
    ctypedef struct gs_cell:
        uint64_t state
        uint32_t length
        uint32_t kind
        unsigned char data[1]
    ctypedef struct gs_ringview:
        gs_ring *ring
        uint32_t capacity
        uint64_t cell_stride
        uint64_t cell_bytes
        uint64_t data_start
        uint64_t max_bytes
    uint32_t gs_progress(uint64_t state)
    uint32_t gs_claimer(uint64_t state)
    uint64_t gs_cell_stride(uint64_t cell_bytes)
    uint64_t gs_ring_bytes(uint32_t capacity, uint64_t stride)
    void gs_ring_init(gs_ring *r, uint32_t capacity, uint64_t stride, uint64_t size,
                      uint64_t max_bytes, int64_t pid, uint64_t pidns)
    bint gs_ring_view(gs_ring *r, uint64_t size, gs_ringview *v)
    gs_cell *gs_cell_at(const gs_ringview *v, uint64_t pos)
    uint64_t gs_load_state(gs_cell *c)
    int gs_ring_claim_put(const gs_ringview *v, uint32_t pid, uint64_t *pos,
                          gs_cell **cell, uint64_t *seen)
    int gs_ring_claim_get(const gs_ringview *v, uint32_t pid, uint64_t *pos,
                          gs_cell **cell, uint64_t *seen)
    void gs_ring_publish(const gs_ringview *v, gs_cell *c, uint64_t pos,
                         uint32_t length, uint32_t kind)
    void gs_ring_free(const gs_ringview *v, gs_cell *c, uint64_t pos)
    bint gs_ring_reclaim(const gs_ringview *v, gs_cell *c, uint64_t seen)
    gs_cell *gs_ring_head_cell(const gs_ringview *v)
    gs_cell *gs_ring_tail_cell(const gs_ringview *v)
    uint64_t gs_ring_depth(const gs_ringview *v)
    bint gs_ring_has_room(const gs_ringview *v)
    void gs_ring_wait_room(const gs_ringview *v, int64_t until_ns)
    void gs_cpu_relax()
    uint32_t *gs_ring_word(const gs_ringview *v, bint for_get)
    uint32_t *gs_ring_waiting(const gs_ringview *v, bint for_get)
    uint32_t gs_ring_count_in(uint32_t *word, uint32_t *waiting)
    void gs_ring_count_out(uint32_t *waiting)
    void gs_ring_sleep(uint32_t *word, uint32_t seen, int64_t timeout_ns)
    int64_t gs_ring_handles_add(gs_ring *r, int delta)
    uint64_t gs_ring_large_bytes(const gs_ringview *v)
    int gs_ring_try(const gs_ringview *v, bint for_get, uint32_t pid, uint64_t large,
                    uint64_t *pos, gs_cell **cell, uint64_t *seen)
    int gs_ring_wait_claim(const gs_ringview *v, bint for_get, uint32_t pid, uint64_t large,
                           int64_t until_ns, uint64_t *pos, gs_cell **cell, uint64_t *seen)
    bint gs_pid_dead(int pid)
    uint32_t gs_ring_pid
    int gs_ring_init_pid()
    int64_t gs_monotonic_ns()
