# Included by _shm.pyx: the ndarray over a segment (wrap), and
# SharedMemoryArray's per-operation hooks.

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
