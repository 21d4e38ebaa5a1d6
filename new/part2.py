
# ======================================================================================
# Part II, the engine: the same layers, faster
# ======================================================================================
# Everything in this part exists for speed, and gives Part I's numbers up to float32
# rounding (the tests compare the loop, plain and fast forms in float64).  The ideas,
# from the largest gain down (the README's speed table has the measurements):
#
#   - im2col as a view of the input, copied and multiplied a few images at a time, so
#     that the matrix multiply reads it from the core's cache (im2col_matmul);
#   - activations kept channels-last in memory behind NCHW views, so that the next
#     im2col copies whole pixels (C numbers) at a time;
#   - a max pooling right after a convolution runs inside the convolution's call, its
#     rows in pooling-phase order, so that every window offset is a contiguous block;
#   - both cores on every step: the batch split between two threads (split_model) or,
#     in training, a forked twin process (TwinProcess); element-wise passes split
#     over threads (split_batch); OpenBLAS held at one thread while the engine runs
#     its own threads, so the two never fight over the cores;
#   - work arrays reused from call to call, freed memory kept by malloc.
#
# The fast convolution picks its variant from the shapes alone; each variant is
# named here, once, and checked against Part I by the test beside it:
#
#   layout (FastConv2D.layout)        when                                 test
#   "channel-major"  y = W @ cols^T   image rows contiguous, C < 8, F < 8   test_fast_conv_variants
#   "rows"           y = cols^T.T @ W image rows contiguous, C < 8, F >= 8  test_fast_conv_variants
#   "channels-last"  im2col_matmul    any other input                       test_fast_conv_variants
#   dx route (FastConv2D.dx_route)
#   "sum of taps"    kh*kw products   the layer widens, C < F               test_fast_conv_variants
#   "convolution"    flipped kernel   C >= F                                test_fast_conv_variants
#   pooling
#   "fused"          conv + pool      a MaxPool2D with stride = kernel right after a fast
#                                     Conv2D in a Sequential                test_fast_conv_variants
#
# The engine is safe to embed: importing it starts nothing and changes no setting;
# its helper threads start at first use and serve one call at a time, so models may
# run in several threads of your program at once (a call that finds no idle helper
# runs its slices itself, with the same numbers); a forked child starts afresh; and
# OpenBLAS's thread count, which is process-wide, is set to one while any engine call
# needs it and restored when the last one ends.
#
# The switch: CORES is how many cores the engine's own parallelism uses (its threads,
# its split of the batch, its twin process).  cnn.CORES = 1 turns all of it off.

CORES = os.cpu_count() or 1
SPLIT_MIN = 1 << 16   # fewer elements than this: a thread costs more than it saves
CHUNK_BYTES = 1 << 20  # im2col is built and multiplied in pieces of about this size
EVAL_BATCH = 256       # evaluation batch: large enough for BLAS, small enough for the cache


# --- memory layouts --------------------------------------------------------------------

def nhwc(x):
    """(N, C, H, W) array in any memory order -> contiguous (N, H, W, C).  Free (no
    copy) when x is the NCHW view of a channels-last buffer, as fast layers return."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw_view(x):
    """Contiguous (N, H, W, C) -> the (N, C, H, W) view of the same memory."""
    return x.transpose(0, 3, 1, 2)


def memory_order(x):
    """x's axes from the outermost in memory to the innermost: (0, 1, 2, 3) for
    NCHW memory, (0, 2, 3, 1) for channels-last, (1, 0, 2, 3) for channel-major."""
    return tuple(sorted(range(x.ndim), key=x.strides.__getitem__, reverse=True))


def inverse(order):
    """The permutation that undoes `order` (np.argsort(order) without its overhead)."""
    return sorted(range(len(order)), key=order.__getitem__)


def empty_in_order(shape, order, dtype):
    """An uninitialised array of this shape whose memory runs in `order`."""
    return np.empty([shape[axis] for axis in order], dtype).transpose(inverse(order))


def in_memory_order(x, order):
    """x itself if its memory runs in `order`, else a copy that does.  Layers return
    their input gradient in the order their input came in, so that the element-wise
    backward before them multiplies arrays of one layout (on two layouts NumPy's
    inner loops get as short as the channel count)."""
    if memory_order(x) == order:
        return x
    out = empty_in_order(x.shape, order, x.dtype)
    split_batch(np.copyto, out, x)
    return out


def windows(x, kh, kw, stride, axes, writeable=False):
    """All kh x kw windows of x along the two spatial `axes`, every stride-th one,
    as a view with the two window axes appended (pool_windows of Part I, for any
    axes and memory order, without sliding_window_view's per-call checks).  A
    writeable view of overlapping windows holds a pixel more than once: write into
    it one window offset [..., u, v] at a time."""
    (a, b), shape, strides = axes, list(x.shape), list(x.strides)
    shape[a], shape[b] = (x.shape[a] - kh) // stride + 1, (x.shape[b] - kw) // stride + 1
    strides[a], strides[b] = x.strides[a] * stride, x.strides[b] * stride
    return np.lib.stride_tricks.as_strided(x, shape + [kh, kw], strides + [x.strides[a], x.strides[b]],
                                           writeable=writeable)


def pooling_phases(pixels, k, axis):
    """pixels: an array whose axes axis, axis+1 are output pixels (i, j) ->
    (..., k, k, Ho // k, Wo // k, ...): the pixels that k x k pooling windows with
    stride k cover, grouped by their offset (u, v) in their window: [..., u, v, i, j,
    ...] is pixel (i*k + u, j*k + v).  A view; pixels no window covers (the last
    row or column when Ho or Wo is odd and k = 2) are left out."""
    hq, wq = pixels.shape[axis] // k, pixels.shape[axis + 1] // k
    covered = pixels[(slice(None),) * axis + (slice(0, hq * k), slice(0, wq * k))]
    split = covered.reshape(pixels.shape[:axis] + (hq, k, wq, k) + pixels.shape[axis + 2:])
    order = list(range(split.ndim))
    order[axis:axis + 4] = axis + 1, axis + 3, axis, axis + 2
    return split.transpose(order)


def receptive_fields(x, kh, kw, stride, pool=1):
    """x: (N, H, W, C) -> the view (N, Ho, Wo, kh, kw, C) of every output pixel's
    receptive field: read as a matrix, one row per output pixel in (u, v, c) order,
    this is im2col's matrix (N*Ho*Wo, kh*kw*C).  pool > 1: pixels in pooling-phase
    order (see pooling_phases), (N, pool, pool, Ho // pool, Wo // pool, kh, kw, C)."""
    cells = windows(x, kh, kw, stride, (1, 2)).transpose(0, 1, 2, 4, 5, 3)  # (N, Ho, Wo, kh, kw, C)
    return pooling_phases(cells, pool, 1) if pool > 1 else cells


def pad_hw(x, p, axes=(1, 2)):
    """Zero-pad the two spatial axes of x by p pixels (no copy when p = 0)."""
    if not p:
        return x
    shape, inner = list(x.shape), [slice(None)] * x.ndim
    for a in axes:
        shape[a] += 2 * p
        inner[a] = slice(p, -p)
    padded = np.zeros(shape, x.dtype)
    split_batch(np.copyto, padded[tuple(inner)], x)
    return padded


# --- threads and OpenBLAS ----------------------------------------------------------------

class Helper:
    """A thread that runs the calls handed to it, one at a time.  The hand-over is a
    pair of locks, about half the cost of a ThreadPoolExecutor future, and the engine
    hands work over a few dozen times per training step."""

    def __init__(self):
        self.start, self.done = threading.Lock(), threading.Lock()
        self.start.acquire()
        self.done.acquire()
        self.call, self.error = None, None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            self.start.acquire()
            try:
                self.call()
            except BaseException as error:  # handed to the caller by wait()
                self.error = error
            self.done.release()

    def submit(self, call):
        self.call = call
        self.start.release()

    def wait(self):
        """Wait for the call to end; returns the exception it raised, or None."""
        self.done.acquire()
        error, self.error = self.error, None
        return error


class EngineState:
    """What the engine shares between the threads of one process: its idle helper
    threads, and how many calls hold OpenBLAS at one thread.  A forked child makes a
    fresh one: the helpers did not survive the fork, and a lock may have been held."""

    def __init__(self, parent=None):
        self.pid, self.lock = os.getpid(), threading.Lock()
        self.idle, self.started = [], 0
        self.blas_holders, self.blas_before = 0, None
        if parent is not None and parent.blas_holders:  # forked while a call held OpenBLAS
            blas_threads(parent.blas_before)

    def take_helpers(self, count):
        """Up to count idle helpers, starting new ones up to CORES - 1 in all."""
        with self.lock:
            while len(self.idle) < count and self.started < CORES - 1:
                self.idle.append(Helper())
                self.started += 1
            taken, self.idle = self.idle[:count], self.idle[count:]
        return taken

    def give_back(self, helpers):
        with self.lock:
            self.idle.extend(helpers)

    def hold_blas(self):
        """Set OpenBLAS to one thread, unless another call already did; False where
        its thread count cannot be set."""
        with self.lock:
            if self.blas_holders == 0:
                before = blas_threads(1)
                if before is None:
                    return False
                self.blas_before = before
            self.blas_holders += 1
            return True

    def release_blas(self):
        with self.lock:
            self.blas_holders -= 1
            if self.blas_holders == 0:
                blas_threads(self.blas_before)


_engine = None
_engine_lock = threading.Lock()
_local = threading.local()  # per thread: cores_taken, and the work arrays of scratch()


def engine():
    """This process's EngineState, made at first use (and again after a fork)."""
    global _engine
    state = _engine
    if state is None or state.pid != os.getpid():
        with _engine_lock:
            if _engine is None or _engine.pid != os.getpid():
                _engine = EngineState(_engine)
            state = _engine
    return state


def cores_taken():
    """True in a thread that runs a slice of a model split over the cores: it has a
    core to itself, and hands nothing more to helper threads."""
    return getattr(_local, "cores_taken", False)


@contextlib.contextmanager
def one_blas_thread():
    """OpenBLAS on one thread within the block, for this and every other thread of
    the process, restored when the last such block ends, however it ends.  Yields
    False (and changes nothing) where OpenBLAS's thread count cannot be set.  The
    engine runs every product this way: its own threads keep the cores busy, a sum
    split over OpenBLAS's threads would depend on their number, and OpenBLAS's idle
    threads would spin on a core the engine's threads need."""
    state = engine()
    held = state.hold_blas()
    try:
        yield held
    finally:
        if held:
            state.release_blas()


@contextlib.contextmanager
def own_core(taken=True):
    """Marks the block's thread as running a slice of a split model (cores_taken)."""
    before, _local.cores_taken = cores_taken(), taken
    try:
        yield
    finally:
        _local.cores_taken = before


def in_parallel(fn, arrays, parts):
    """[fn(i, *slices_i) for i in range(parts)], slices_i being the i-th of `parts`
    near-equal slices along axis 0 of each array (None stays None).  Idle helper
    threads run slices 1, 2, ... at the same time as this thread runs slice 0; this
    thread also runs any slice no helper was free for.  The slices never depend on
    the number of helpers, so neither do the results."""
    n = len(arrays[0])
    bounds = [n * i // parts for i in range(parts + 1)]
    slices = [[None if a is None else a[lo:hi] for a in arrays] for lo, hi in zip(bounds, bounds[1:])]
    results, taken = [None] * parts, cores_taken()

    def run(i):
        with own_core(taken):
            results[i] = fn(i, *slices[i])

    state = engine()
    helpers = state.take_helpers(parts - 1)
    errors = []
    try:
        for i, helper in enumerate(helpers, 1):
            helper.submit(lambda i=i: run(i))
        run(0)
        for i in range(len(helpers) + 1, parts):
            run(i)
    finally:
        errors = [error for error in (helper.wait() for helper in helpers) if error is not None]
        state.give_back(helpers)
    if errors:
        raise errors[0]
    return results


def split_batch(fn, *arrays):
    """fn(*parts) on CORES slices of the batch (axis 0) of the arrays at once, one
    slice per thread; None stays None.  NumPy runs each element-wise operation on
    one core but releases the GIL inside its loops, so the slices run truly in
    parallel.  fn writes only into the slices it is given, so the result is the same,
    number for number.  Inside a split model every core already has its slice, and
    fn runs whole in this thread."""
    parts = min(CORES, len(arrays[0])) if arrays[0].size >= SPLIT_MIN and not cores_taken() else 1
    if parts == 1:
        fn(*arrays)
    else:
        in_parallel(lambda i, *part: fn(*part), arrays, parts)


def blas_threads(count):
    """Let OpenBLAS, the matrix-multiply library inside NumPy's wheels, use `count`
    threads (count None: leave it); returns how many it used before, or None where
    it cannot be found (NumPy built on another BLAS), in which case nothing changed."""
    global _openblas
    if _openblas is None:
        _openblas = _find_openblas()
    if not _openblas:
        return None
    set_threads, get_threads = _openblas
    before = get_threads()
    if count is not None:
        set_threads(count)
    return before


_openblas = None  # (set, get) thread-count functions once found, () if there are none


def _find_openblas():
    """OpenBLAS's thread-count functions, looked up in the libraries NumPy loaded:
    scipy-openblas in the wheels (symbols with a scipy_ prefix, 64_ suffix for
    64-bit integers), a plain libopenblas otherwise."""
    import ctypes
    import glob
    numpy_dir = os.path.dirname(np.__file__)
    paths = glob.glob(os.path.join(numpy_dir + ".libs", "*openblas*"))       # Linux, Windows wheels
    paths += glob.glob(os.path.join(numpy_dir, ".dylibs", "*openblas*"))     # macOS wheels
    try:
        with open("/proc/self/maps") as maps:                                   # any other Linux build
            paths += [line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]]
    except OSError:
        pass
    for path in dict.fromkeys(paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                set_threads = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
                get_threads = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                if set_threads and get_threads:
                    return set_threads, get_threads
    return ()


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for the next arrays instead of giving
    it back to the operating system (elsewhere this does nothing).  By default every
    array of more than a few megabytes is mapped fresh and unmapped when freed, so
    each training step pays again for the page faults and zeroing of its memory.
    Process-wide, so the engine never calls it: the scripts and the bench do, and a
    program of your own may."""
    import ctypes
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 2 ** 31 - 1)  # no array gets its own mapping
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # and freed memory is not returned
    except (OSError, AttributeError, TypeError):     # not glibc: no mallopt to call
        pass


# --- work arrays and matrix products ----------------------------------------------------

def scratch(buffers, name, shape, dtype):
    """An uninitialised work array of this shape, kept in `buffers` from call to call
    (None: this thread's, for work within one call).  NumPy gets large arrays fresh
    from the operating system each time, and first touching their pages costs about
    as much as the copy that fills them."""
    if buffers is None:
        buffers = _local.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = buffers[name] = np.empty(size, dtype)
    return buffer[:size].reshape(shape)


def by_images(fn, arrays, image_bytes):
    """[fn(*slices) for each group of images], slices being consecutive images
    (axis 0) of the arrays, as many as make CHUNK_BYTES of work at image_bytes each.
    The groups are dealt out to the cores, each running OpenBLAS on one thread.  The
    groups do not depend on the number of cores, so neither does any number."""
    n = len(arrays[0])
    group = max(1, CHUNK_BYTES // image_bytes)
    starts = range(0, n, group)

    def run(i, starts):
        return [fn(*(a[j:j + group] for a in arrays)) for j in starts]

    with one_blas_thread() as held:
        parallel = held and len(starts) > 1 and not cores_taken()
        parts = in_parallel(run, [starts], min(CORES, len(starts))) if parallel else [run(0, starts)]
    return [result for part in parts for result in part]


def im2col_rows(fields):
    """The im2col matrix (rows, K) of a few images' receptive fields view `fields`,
    copied into this thread's small work array."""
    cols = scratch(None, "cols", fields.shape, fields.dtype)
    np.copyto(cols, fields)
    return cols.reshape(-1, math.prod(fields.shape[-3:]))


def im2col_matmul(fields, weights, out):
    """out = cols @ weights, cols being the im2col matrix of the receptive fields
    view `fields` (N, ..., K numbers per row), without ever holding all of cols: each
    core copies the rows of a few images into a small buffer and multiplies it while
    it is in the core's cache.  out: (N * rows per image, F)."""
    def multiply(fields, out):
        np.matmul(im2col_rows(fields), weights, out=out.reshape(-1, weights.shape[1]))

    by_images(multiply, (fields, out.reshape(len(fields), -1)), fields[0].nbytes)
    return out


def im2col_matmul_t(fields, g):
    """cols^T @ g, summed a few images at a time as in im2col_matmul.
    g: (N, rows per image, F) -> (K, F)."""
    def multiply(fields, g):
        return im2col_rows(fields).T @ g.reshape(-1, g.shape[-1])

    return sum(by_images(multiply, (fields, g), fields[0].nbytes))


def im2col_t(x, kh, kw, stride, out, pool=1):
    """x: (N, C, H, W) -> cols^T: (C*kh*kw, N*Ho*Wo) written into out, the transpose of
    im2col's matrix built from NCHW memory: each copy moves a run of Wo neighbouring
    pixels.  pool > 1: columns in pooling-phase order (see pooling_phases)."""
    cells = windows(x, kh, kw, stride, (2, 3)).transpose(1, 4, 5, 0, 2, 3)  # (C, kh, kw, N, Ho, Wo)
    if pool > 1:
        cells = pooling_phases(cells, pool, 4)                     # (C, kh, kw, N, k, k, Ho/k, Wo/k)
    batch_first = (3, 0, 1, 2) + tuple(range(4, cells.ndim))  # split_batch cuts axis 0
    split_batch(np.copyto, out.reshape(cells.shape).transpose(batch_first), cells.transpose(batch_first))
    return out


SMALL_MATMUL = 100 ** 3  # multiply-adds up to which OpenBLAS uses its small-matrix kernels


def thin_matmul(a, b):
    """a @ b, on one OpenBLAS thread, for products with one long dimension and two
    short ones whose product is at most 256, like the first convolution's (9 or 27
    taps, 4 to 16 channels, N*Ho*Wo pixels).  Above SMALL_MATMUL multiply-adds
    OpenBLAS leaves its small-matrix kernel for a general one that is several times
    slower on shapes this thin, so the long dimension is cut into blocks under that
    size, and a long inner dimension is summed block by block.  Other products go to
    OpenBLAS whole."""
    (m, k), n = a.shape, b.shape[1]
    longest = max(m, k, n)
    short = m * k * n // longest
    block = max(1, SMALL_MATMUL // short)
    with one_blas_thread():
        if short > 256 or longest <= block:
            return a @ b
        if longest == k:                                           # sum over blocks of k
            out = a[:, :block] @ b[:block]
            for i in range(block, k, block):
                out += a[:, i:i + block] @ b[i:i + block]
            return out
        out = np.empty((m, n), np.result_type(a, b))
        for i in range(0, longest, block):
            rows = slice(i, i + block) if longest == m else slice(None)
            cols = slice(i, i + block) if longest != m else slice(None)
            np.matmul(a[rows], b[:, cols], out=out[rows, cols])
        return out


def matmul(a, b):
    """a @ b on one OpenBLAS thread (see one_blas_thread)."""
    with one_blas_thread():
        return a @ b


def column_sum(a):
    """a.sum(axis=0) for a tall matrix a, as the product ones @ a: OpenBLAS sums the
    rows an order of magnitude faster than NumPy's reduction down axis 0."""
    with one_blas_thread():
        return np.ones(a.shape[0], a.dtype) @ a


# --- the fast layers ---------------------------------------------------------------------

class FastConv2D(Conv2D):
    """Conv2D as im2col and a matrix multiply that BLAS runs near the machine's peak,
    in one of the layouts named at the top of this part, optionally with the max
    pooling after it (forward(x, pool))."""
    fast = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffers = {}  # im2col matrices reused from call to call, see scratch()

    def layout(self, x):
        """How this input's im2col matrix is built and multiplied (top of Part II)."""
        if memory_order(x)[2:] == (2, 3) and self.in_channels < 8:
            return "channel-major" if self.out_channels < 8 else "rows"
        return "channels-last"

    def dx_route(self):
        """How dL/dx is computed (top of Part II): the route that measured faster."""
        return "sum of taps" if self.in_channels < self.out_channels else "convolution"

    def fuses(self, pool):
        """Whether forward can run `pool`, a MaxPool2D right after this layer, as part
        of its own call: a fast pool whose windows do not overlap."""
        return isinstance(pool, FastMaxPool2D) and pool.stride == pool.k

    def forward(self, x, pool=None):
        """pool: the MaxPool2D after this layer, run as part of this call where
        fuses(pool) (FastSequential passes it): the result is then the pooled output,
        and backward takes the gradient of that."""
        x = self.check_input(x)
        if pool is not None and not self.fuses(pool):
            raise ValueError(f"{self!r} cannot run {pool!r} as part of its forward pass")
        y = self._forward_fast(x, pool)
        self.output_shape = y.shape if self.training else None
        return y

    def _backward(self, grad, input_grad=True):
        return self._backward_fast(grad, input_grad)

    def _forward_fast(self, x, pool):
        """With a pool of k x k windows after it, the rows of cols are put in
        pooling-phase order (see pooling_phases): for each image, first the pixels at
        offset (0, 0) of their window, then those at (0, 1), and so on.  Each window
        offset is then one contiguous block of y, and pooling runs over whole blocks.
        Pixels that no window covers are not computed at all."""
        W, p = self.params["W"], self.padding
        n, c, h, w = x.shape
        ho, wo = self.output_size(h, w)
        f, k = self.out_channels, 1 if pool is None else pool.k
        if min(ho, wo) < k:
            raise ValueError(f"{pool!r}: input {(n, f, ho, wo)} is smaller than the window")
        pixels = n * k * k * (ho // k) * (wo // k)                 # rows of cols: N*Ho*Wo unpooled
        buffers = self.buffers if self.training else None          # evaluation keeps no cache
        layout = self.layout(x)
        if layout != "channels-last":                              # cols^T: (C*kh*kw, M)
            cols = scratch(buffers, "cols", (c * self.kh * self.kw, pixels), x.dtype)
            im2col_t(pad_hw(x, p, axes=(2, 3)), self.kh, self.kw, self.stride, out=cols, pool=k)
            if layout == "channel-major":                          # y: (F, M)
                y = thin_matmul(W.reshape(f, -1), cols)
            else:                                                  # y: (M, F)
                y = thin_matmul(cols.T, W.reshape(f, -1).T)
        else:  # cols as a view of the padded input, never copied whole (see im2col_matmul)
            cols = receptive_fields(pad_hw(nhwc(x), p), self.kh, self.kw, self.stride, k)  # (N, ..., kh, kw, C)
            y = np.empty((pixels, f), x.dtype)                     # y: (M, F)
            im2col_matmul(cols, W.transpose(2, 3, 1, 0).reshape(-1, f), y)
        if "b" in self.params and layout == "channel-major":
            split_batch(np.add, y, self.params["b"][:, None], y)
        elif "b" in self.params:
            # Image by image, against the biases repeated for each pixel: broadcasting b
            # alone makes NumPy's inner loop only F numbers long.
            rows = np.tile(self.params["b"], pixels // n)             # rows: (pixels of an image * F,)
            split_batch(lambda y: np.add(y, rows, out=y), y.reshape(n, -1))
        if self.training:
            self.cache, self.x_shape, self.x_order = (layout, cols), x.shape, memory_order(x)
            self.pool, self.y_shape = pool, y.shape
        if pool is not None:
            order = (1, 0, 2, 3) if layout == "channel-major" else (0, 2, 3, 1)
            return pool.pool_windows(self._output_windows(y, layout, n, ho, wo, k), order)
        if layout == "channel-major":
            return y.reshape(f, n, ho, wo).transpose(1, 0, 2, 3)
        return nchw_view(y.reshape(n, ho, wo, f))

    def _output_windows(self, y, layout, n, ho, wo, k):
        """The (N, F, Ho/k, Wo/k, k, k) windows view of an output matrix y whose
        pixels are in pooling-phase order."""
        hq, wq = ho // k, wo // k
        if layout == "channel-major":                              # y: (F, N*k*k*Hq*Wq)
            return y.reshape(self.out_channels, n, k, k, hq, wq).transpose(1, 0, 4, 5, 2, 3)
        return y.reshape(n, k, k, hq, wq, self.out_channels).transpose(0, 5, 3, 4, 1, 2)

    def _backward_fast(self, grad_out, input_grad):
        """dW is the forward matrix multiply run backwards, cols^T @ g, and db the
        column sums of g; dL/dx goes by dx_route().  dL/dx is returned in the memory
        order of the input."""
        n, c, h, w = self.x_shape
        ho, wo = self.output_size(h, w)
        f, kh, kw = self.out_channels, self.kh, self.kw
        layout, cols = self.cache                  # cols^T (C*kh*kw, M), or a view (N, ..., kh, kw, C)
        if self.pool is None:                                      # gm: like y, (F, M) or (M, F)
            gm = grad_out.transpose(1, 0, 2, 3).reshape(f, -1) if layout == "channel-major" \
                else nhwc(grad_out).reshape(-1, f)
        else:                                                      # the pool's backward, into gm
            k = self.pool.k
            gm = np.empty(self.y_shape, grad_out.dtype)
            gm_windows = self._output_windows(gm, layout, n, ho, wo, k)  # (N, F, Ho/k, Wo/k, k, k)
            self.pool.route(grad_out, gm_windows)
        if self.trainable:
            rows = gm.T if layout == "channel-major" else gm        # rows: (M, F)
            if layout == "channels-last":                          # cols^T @ rows, a few images at a time
                dW = im2col_matmul_t(cols, rows.reshape(n, -1, f)).reshape(kh, kw, c, f).transpose(3, 2, 0, 1)
            else:                                                  # cols: (C*kh*kw, M)
                dW = thin_matmul(cols, rows).T.reshape(f, c, kh, kw)
            db = column_sum(rows) if "b" in self.params else None
            self._set_grads(np.ascontiguousarray(dW), db)
        if not input_grad:
            return None
        if self.pool is None:
            g = nhwc(grad_out)                                     # g: (N, Ho, Wo, F)
        else:  # back from pooling-phase order to pixels, zeros where no window covered
            g = (np.empty if (ho % k, wo % k) == (0, 0) else np.zeros)((n, ho, wo, f), gm.dtype)
            pixels = gm_windows.transpose(0, 2, 3, 1, 4, 5)                # (N, Ho/k, Wo/k, F, k, k)
            split_batch(np.copyto, windows(g, k, k, k, (1, 2), writeable=True), pixels)
        dx = self._input_grad_sum(g) if self.dx_route() == "sum of taps" else self._input_grad_conv(g)
        return in_memory_order(dx, self.x_order)

    def _input_grad_conv(self, g):
        """dL/dx as a convolution: the output gradient, spread out by the stride (zeros
        in between) and padded by k - 1, cross-correlated with the kernel flipped in
        both directions and with in/out channels swapped: im2col and one matrix
        multiply, as in the forward pass."""
        W, s, p = self.params["W"], self.stride, self.padding
        n, c, h, w = self.x_shape
        f, kh, kw = self.out_channels, self.kh, self.kw
        ho, wo = g.shape[1:3]
        hp, wp = h + 2 * p, w + 2 * p
        spread = np.zeros((n, hp + kh - 1, wp + kw - 1, f), g.dtype)  # spread: (N, Hp+kh-1, Wp+kw-1, F)
        split_batch(np.copyto, spread[:, kh - 1:kh - 1 + s * (ho - 1) + 1:s, kw - 1:kw - 1 + s * (wo - 1) + 1:s], g)
        w_flipped = W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(-1, c)  # (kh*kw*F, C)
        # Only the windows of the unpadded pixels: the padding's gradient is not needed.
        spread = spread[:, p:p + h + kh - 1, p:p + w + kw - 1]
        dx = np.empty((n, h, w, c), g.dtype)                       # dx: (N, H, W, C)
        im2col_matmul(receptive_fields(spread, kh, kw, 1), w_flipped, dx.reshape(-1, c))
        return nchw_view(dx)

    def _input_grad_sum(self, g):
        """dL/dx straight from the forward sum: input pixel (i*s + u, j*s + v) met
        kernel offset (u, v) at output pixel (i, j), so dL/dx is the sum over the
        kh*kw offsets of g @ W[:, :, u, v]^T shifted by (u, v).  One batched matrix
        multiply makes the kh*kw products, and adding a product onto its shifted
        slice moves whole image rows at a time.  Its matrix has kh*kw*C columns where
        the convolution's has kh*kw*F: less to copy when the layer widens.  A few
        images at a time, as in im2col_matmul."""
        W, p = self.params["W"], self.padding
        n, c, h, w = self.x_shape
        _, ho, wo, f = g.shape                                     # g: (N, Ho, Wo, F)
        taps = self.kh * self.kw
        w_taps = W.transpose(2, 3, 0, 1).reshape(taps, f, c)       # (kh*kw, F, C)
        dxpad = np.empty((n, h + 2 * p, w + 2 * p, c), g.dtype)    # dxpad: (N, H+2p, W+2p, C)

        def add_products(g, dxpad):
            parts = scratch(None, "grad_parts", (taps, len(g) * ho * wo, c), g.dtype)
            np.matmul(g.reshape(-1, f), w_taps, out=parts)
            self._overlap_add(parts.reshape(taps, len(g), ho, wo, c).transpose(1, 0, 2, 3, 4), dxpad)

        by_images(add_products, (g, dxpad), taps * ho * wo * c * g.itemsize)
        return nchw_view(dxpad[:, p:p + h, p:p + w])

    def _overlap_add(self, parts, dxpad):
        s, ho, wo = self.stride, *parts.shape[2:4]
        dxpad.fill(0)
        for t, (u, v) in enumerate(np.ndindex(self.kh, self.kw)):
            dxpad[:, u:u + s * ho:s, v:v + s * wo:s] += parts[:, t]


class FastMaxPool2D(MaxPool2D):
    """Max pooling as k*k element-wise operations over whole arrays: the window
    offsets (u, v) of windows(x) are k*k strided slices of x.  Works in any memory
    order (NumPy's inner loop runs along the innermost axis) and keeps it."""
    fast = True

    def _forward(self, x):
        order = memory_order(x)
        y = self.pool_windows(windows(x, self.k, self.k, self.stride, (2, 3)), order)
        if self.training:
            self.x_shape, self.x_order = x.shape, order
        return y

    def pool_windows(self, cells, order):
        """Max over the windows in cells (N, C, Ho, Wo, k, k), [..., u, v] being offset
        (u, v) of window (i, j): a running maximum over the k*k offsets, where `which`
        remembers the offset of the first maximum (strict > keeps the earliest), so
        backward does not search again.  Returns y (N, C, Ho, Wo) in memory order
        `order`.  FastConv2D calls it with its output's windows when this layer is
        fused with it."""
        y = empty_in_order(cells.shape[:4], order, cells.dtype)                 # y: (N, C, Ho, Wo)
        which = empty_in_order(y.shape, order, np.uint8) if self.training else None  # which: like y
        split_batch(self._max, cells, y, which)
        if self.training:
            self.which = which
        return y

    def _max(self, cells, y, which):
        np.copyto(y, cells[..., 0, 0])
        if which is not None:
            which.fill(0)
        for t, (u, v) in enumerate(np.ndindex(self.k, self.k)):
            if t:
                candidate = cells[..., u, v]
                if which is not None:  # which = t where candidate > y, else unchanged (uint8 arithmetic)
                    which += (candidate > y).view(np.uint8) * (np.uint8(t) - which)
                np.maximum(y, candidate, out=y)

    def _backward(self, grad_out):
        """dx in the input's memory order; zeros first only where some pixels are in
        no window or windows overlap."""
        (h, w), (ho, wo) = self.x_shape[2:], grad_out.shape[2:]
        dx = empty_in_order(self.x_shape, self.x_order, grad_out.dtype)  # dx: (N, C, H, W)
        if self.stride < self.k or (h, w) != (ho * self.k, wo * self.k):
            split_batch(lambda part: part.fill(0), dx)
        self.route(grad_out, windows(dx, self.k, self.k, self.stride, (2, 3), writeable=True))
        return dx

    def route(self, grad_out, cells):
        """Each window's gradient goes to the offset `which` recorded: one masked
        product per offset, written straight into cells (N, C, Ho, Wo, k, k), the
        windows of the input gradient, when windows do not overlap, added when they do."""
        split_batch(self._route, grad_out, self.which, cells)

    def _route(self, g, which, cells):
        for t, (u, v) in enumerate(np.ndindex(self.k, self.k)):
            hit = which == t
            if self.stride < self.k:
                cells[..., u, v] += g * hit
            else:
                np.multiply(g, hit, out=cells[..., u, v])


class FastGlobalMaxPool2D(GlobalMaxPool2D):
    """The max over the pixels of channels-last memory (free to get from a fast layer)."""
    fast = True

    def _forward(self, x):
        xh = nhwc(x)
        flat = xh.reshape(xh.shape[0], -1, xh.shape[3])            # flat: (N, H*W, C)
        idx = flat.argmax(axis=1)[:, None, :]                       # idx: (N, 1, C)
        if self.training:
            self.idx, self.xh_shape = idx, xh.shape
        return np.take_along_axis(flat, idx, axis=1)[:, 0, :]

    def _backward(self, grad_out):
        n, h, w, c = self.xh_shape
        dflat = np.zeros((n, h * w, c), grad_out.dtype)
        np.put_along_axis(dflat, self.idx, grad_out[:, None, :], axis=1)
        return nchw_view(dflat.reshape(n, h, w, c))


class FastReLU(ReLU):
    """ReLU over threads, keeping x's memory layout."""
    fast = True

    def _forward(self, x):
        y = np.empty_like(x)
        split_batch(lambda x, y: np.maximum(x, 0, out=y), x, y)
        if self.training:
            self.y = y
        return y

    def _backward(self, grad_out):
        dx = np.empty_like(self.y)
        split_batch(lambda g, y, dx: np.multiply(g, y > 0, out=dx), grad_out, self.y, dx)
        return dx


class FastGELU(GELU):
    """GELU as a chain of in-place operations on one or two work arrays, over threads:
    the time goes to memory, not arithmetic, and a fresh temporary array per operator
    doubles the memory traffic."""
    fast = True

    def _forward(self, x):
        t, y = np.empty_like(x), np.empty_like(x)  # same memory layout as x
        split_batch(self._forward_chain, x, t, y)
        if self.training:
            self.x, self.t = x, t
        return y

    @classmethod
    def _forward_chain(cls, x, t, y):
        np.multiply(x, x, out=t)      # t = tanh(C * x * (1 + A x^2)), built in place
        t *= cls.C * cls.A            # (x * x * x: float32 ** is much slower)
        t += cls.C
        t *= x
        np.tanh(t, out=t)
        np.add(t, 1, out=y)
        y *= x
        y *= 0.5

    def _backward(self, grad_out):
        d = np.empty_like(self.x)
        split_batch(self._backward_chain, self.x, self.t, grad_out, d)
        return d

    @classmethod
    def _backward_chain(cls, x, t, g, d):
        # dy/dx = (1 + t)/2 + x/2 * (1 - t^2) * du/dx, with du/dx = C * (1 + 3A x^2)
        np.multiply(x, x, out=d)
        d *= 3 * cls.C * cls.A
        d += cls.C
        d *= x
        one_minus_t2 = t * t
        np.subtract(1, one_minus_t2, out=one_minus_t2)
        d *= one_minus_t2
        d += t
        d += 1
        d *= 0.5
        d *= g


class FastFlatten(Flatten):
    """Flatten whose gradient comes back in the input's memory order."""
    fast = True

    def _forward(self, x):
        self.x_shape, self.x_order = x.shape, memory_order(x)
        return x.reshape(x.shape[0], -1)

    def _backward(self, grad_out):
        return in_memory_order(grad_out.reshape(self.x_shape), self.x_order)


class FastDense(Dense):
    """Dense with its products on one OpenBLAS thread and the bias gradient by BLAS."""
    fast = True

    def _forward(self, x):
        if self.training:
            self.x = x
        y = matmul(x, self.params["W"])                            # y: (N, out)
        return y + self.params["b"] if "b" in self.params else y

    def _backward(self, grad_out):
        self.grads["W"] = matmul(self.x.T, grad_out)
        if "b" in self.params:
            self.grads["b"] = column_sum(grad_out)
        return matmul(grad_out, self.params["W"].T)


class FastBatchNorm2D(BatchNorm2D):
    """BatchNorm over channels-last rows (N*H*W, C): sums as BLAS products and einsum,
    the element-wise passes in place and over threads."""
    fast = True

    def _forward(self, x):
        xh = nhwc(x)
        rows = xh.reshape(-1, self.channels)                       # rows: (N*H*W, C)
        count = rows.shape[0]
        mean = column_sum(rows) / count if self.training else self.running_mean
        centred = np.empty_like(rows)                              # centred: (N*H*W, C), x - mean
        split_batch(lambda rows, centred: np.subtract(rows, mean, out=centred), rows, centred)
        if self.training:
            var = np.einsum("ij,ij->j", centred, centred) / count
            self.update_running_stats(mean, var, count)
        else:
            var = self.running_var
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(centred.dtype)
        gamma, beta = self.params.get("gamma"), self.params["beta"]
        y = np.empty_like(centred)                                 # y: (N*H*W, C)

        def normalize(xhat, y):  # centred becomes xhat, in place
            xhat *= inv_std
            if gamma is None:
                np.add(xhat, beta, out=y)
            else:
                np.multiply(xhat, gamma, out=y)
                y += beta
        split_batch(normalize, centred, y)
        if self.training:
            self.xhat, self.inv_std = centred, inv_std
        return nchw_view(y.reshape(xh.shape))

    def _backward(self, grad_out):
        g = nhwc(grad_out)
        shape = g.shape
        g = g.reshape(-1, self.channels)                           # g: (N*H*W, C)
        xhat, count = self.xhat, g.shape[0]
        self.grads["beta"] = g_sum = column_sum(g)
        g_xhat = np.einsum("ij,ij->j", g, xhat)
        scale = self.inv_std
        if "gamma" in self.params:
            self.grads["gamma"] = g_xhat
            scale = scale * self.params["gamma"]
        # Part I's formula, dx = gamma / sigma * (g - mean(g) - xhat * mean(g * xhat)):
        coef, shift = -g_xhat / count, g_sum / count
        dx = np.empty_like(xhat)                                   # dx: (N*H*W, C)

        def combine(xhat, g, dx):
            np.multiply(xhat, coef, out=dx)
            dx += g
            dx -= shift
            dx *= scale
        split_batch(combine, xhat, g, dx)
        return nchw_view(dx.reshape(shape))


# --- the fast model, and the batch split over the cores -----------------------------------

class FastSequential(Sequential):
    """Sequential in which a fast Conv2D directly followed by a MaxPool2D it fuses with
    runs the pooling as part of its own forward and backward (the same numbers), and
    whose predict splits each batch over the cores."""
    fast = True

    def fused_pools(self):
        """{i: the MaxPool2D at i + 1} for each Conv2D at i that runs it."""
        return {i: pool for i, (conv, pool) in enumerate(zip(self.layers, self.layers[1:]))
                if isinstance(conv, FastConv2D) and conv.fuses(pool)}

    def forward(self, x):
        pools = self.fused_pools()
        for i, layer in enumerate(self.layers):
            if i in pools:
                x = layer.forward(x, pool=pools[i])
            elif i - 1 not in pools:  # else it ran with the convolution before it
                x = layer.forward(x)
        return x

    def backward(self, grad, input_grad=False):
        first = self.first_trained()
        stop = 0 if input_grad or first is None else first
        pools = self.fused_pools()
        for i in range(len(self.layers) - 1, stop, -1):
            if i - 1 not in pools:  # a fused pool's backward runs in its convolution's
                grad = self.layers[i].backward(grad)
        last = self.layers[stop]
        return last.backward(grad, input_grad=input_grad) if isinstance(last, Conv2D) else last.backward(grad)

    def predict(self, x, batch_size=EVAL_BATCH):
        """Logits for x in evaluation mode, batch by batch, each batch split over the
        cores (split_model)."""
        with self.evaluating():
            return np.concatenate([np.concatenate(split_model(self, FastSequential.forward, x[i:i + batch_size]))
                                   for i in range(0, len(x), batch_size)])


def twin_of(model, slot):
    """A copy of model that another thread can run at the same time: the same
    parameter arrays, its own gradients, caches and work arrays (slot: which)."""
    layers = []
    for layer in model.layers:
        twin = copy.copy(layer)
        twin.grads = {}
        if isinstance(layer, FastConv2D):
            twin.buffers = layer.buffers.setdefault(("twin", slot), {})
        layers.append(twin)
    return Sequential(*layers)


def split_model(model, fn, *arrays):
    """[fn(net, *slices)] for CORES slices of the batch (axis 0 of the arrays), all at
    once, each run by its own net in its own thread with OpenBLAS on one thread: the
    model itself on the first slice, twins of it (twin_of) on the others.  With a few
    dozen channels a layer is too little work to split each call over the cores,
    but the whole network on each slice is not.  fn runs once on the whole batch on
    one core, for one image, or where OpenBLAS's thread count cannot be set."""
    parts = min(CORES, len(arrays[0]))
    with one_blas_thread() as held:
        if parts < 2 or not held or cores_taken():
            return [fn(model, *arrays)]
        nets = [model] + [twin_of(model, i) for i in range(1, parts)]
        with own_core():
            return in_parallel(lambda i, *part: fn(nets[i], *part), arrays, parts)


def needs_whole_batch(model):
    """True for a model with batch statistics (BatchNorm): they must come from the
    whole batch, so its training steps are not split."""
    return any(layer.buffer_names for layer in model.layers)


def slice_gradient(net, loss_fn, x, y, batch_size):
    """Forward, loss and backward on a slice (x, y) of a batch of batch_size images:
    returns (summed loss, logits) and leaves the slice's part of the batch's
    gradient in net's layers.  The loss gradient is weighted by the slice's share
    of the batch, so that the slices' gradients add up to the batch's."""
    logits = net.forward(x)
    loss = loss_fn.forward(logits, y)
    grad = loss_fn.backward()
    if len(y) < batch_size:
        grad = grad * grad.dtype.type(len(y) / batch_size)
    net.backward(grad)
    return loss * len(y), logits


def train_step(model, loss_fn, x, y, twin=None, meanwhile=None):
    """Forward, loss and backward on one batch: returns (mean loss, logits) and
    leaves the whole batch's gradients (up to float32 rounding) in the model's layers.

    A model without batch statistics runs on slices of the batch at once: half in
    a TwinProcess if one is given, else one slice per thread (split_model), the
    twins' gradients added to the model's.  A model with BatchNorm runs whole.
    meanwhile: a function to call once this process's part is done, while the twin
    finishes its half (train_epoch prepares the next batch in it)."""
    if needs_whole_batch(model):
        results = [slice_gradient(model, loss_fn, x, y, len(y))]
    elif twin is not None and twin.fits(x):
        return twin.step(x, y, meanwhile)
    else:
        def run(net, x_part, y_part):
            criterion = loss_fn if net is model else copy.copy(loss_fn)
            return slice_gradient(net, criterion, x_part, y_part, len(y)) + (net,)
        results = split_model(model, run, x, y)
        for _, _, net in results[1:]:
            for mine, its in zip(model.layers, net.layers):
                for key in mine.grads:
                    mine.grads[key] += its.grads[key]
    if meanwhile is not None:
        meanwhile()
    return mean_loss_and_logits(results, len(y))


def mean_loss_and_logits(results, batch_size):
    """[(summed loss, logits)] of a batch's slices -> (mean loss, logits)."""
    return sum(r[0] for r in results) / batch_size, np.concatenate([r[1] for r in results])


def shared_array(shape, dtype):
    """A zeroed array in memory that processes forked after its creation share
    with this one (an anonymous shared memory map)."""
    dtype, size = np.dtype(dtype), math.prod(shape)
    return np.frombuffer(mmap.mmap(-1, max(1, size * dtype.itemsize)), dtype, size).reshape(shape)


class TwinProcess:
    """A forked copy of this process that computes the gradient of the second half
    of each training batch while this process computes the first half.

    Threads share one GIL: the Python between NumPy's loops runs one thread at a
    time.  A process has a GIL of its own.  Forked at the first step, the twin holds
    a copy of the model as it was then.  At each step it gets the current weights
    and its half of the batch through shared memory, runs slice_gradient on its copy,
    and hands back its gradients, summed loss and logits the same way; the pipe only
    carries "go" and "done".  The numbers are split_model's on two cores, bit for
    bit.  Only Linux has a fork that is safe in a process with threads.  Only
    train_epoch (Part III) starts one, for one epoch at a time: change the layers
    (not just the weights) only between epochs."""

    @staticmethod
    def usable(model):
        return (sys.platform.startswith("linux") and CORES > 1 and blas_threads(None) is not None
                and not needs_whole_batch(model))

    def __init__(self, model, loss_fn):
        self.model, self.loss_fn, self.process = model, loss_fn, None
        self.weights = [(layer, key) for layer in model.layers for key in layer.params]
        self.trained = [(layer, key) for _, layer, key in model.parameters()]

    def fits(self, x):
        return self.process is None or len(x) - len(x) // 2 <= len(self.x)

    def _start(self, x, y):
        rows = len(x) - len(x) // 2                                # the twin's half of a full batch
        logits = self.model.predict(x[:1])                         # for the shape of the output
        self.x, self.y = shared_array((rows,) + x.shape[1:], x.dtype), shared_array((rows,), y.dtype)
        self.logits = shared_array((rows,) + logits.shape[1:], logits.dtype)
        self.numbers = shared_array((3,), np.float64)             # batch size, rows, summed loss
        self.shared_weights = [shared_array(l.params[k].shape, l.params[k].dtype) for l, k in self.weights]
        self.shared_grads = [shared_array(l.params[k].shape, l.params[k].dtype) for l, k in self.trained]
        self.pipe, twin_end = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("fork").Process(
            target=self._serve, args=(twin_end,), daemon=True)
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a process with threads.  Ours hold no
            # lock while idle, and the twin starts none.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.process.start()
        twin_end.close()

    def step(self, x, y, meanwhile=None):
        """(mean loss, logits) of the batch, computed half here and half in the
        twin; the model's gradients are the whole batch's afterwards.  meanwhile()
        runs once this half is done, while the twin (which started later) finishes."""
        if self.process is None:
            self._start(x, y)
        n, half = len(x), len(x) // 2
        for (layer, key), shared in zip(self.weights, self.shared_weights):
            np.copyto(shared, layer.params[key])
        self.x[:n - half], self.y[:n - half] = x[half:], y[half:]
        self.numbers[:2] = n, n - half
        try:
            self.pipe.send_bytes(b"go")
        except OSError:
            self._died()
        try:
            with one_blas_thread(), own_core():
                mine = slice_gradient(self.model, self.loss_fn, x[:half], y[:half], n)
            if meanwhile is not None:
                meanwhile()
        finally:  # even if this half failed: the next step must not read this step's answer
            try:
                error = self.pipe.recv_bytes()
            except EOFError:
                self._died()
        if error:
            raise RuntimeError(f"the twin training process failed: {error.decode()}")
        for (layer, key), shared in zip(self.trained, self.shared_grads):
            layer.grads[key] += shared
        return mean_loss_and_logits([mine, (self.numbers[2], self.logits[:n - half])], n)

    def _died(self):
        self.process.join(1)
        raise RuntimeError(f"the twin training process died (exit code {self.process.exitcode})") from None

    def _serve(self, pipe):
        """The twin's loop, until the pipe closes.  Ctrl-C is the parent's to handle."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.pipe.close()    # the parent's end: the pipe must close when the parent closes it
        _local.cores_taken = True
        blas_threads(1)
        for (layer, key), shared in zip(self.weights, self.shared_weights):
            layer.params[key] = shared
        while True:
            try:
                pipe.recv_bytes()
            except EOFError:
                return
            n, rows = int(self.numbers[0]), int(self.numbers[1])
            error = b""
            try:
                self.numbers[2], self.logits[:rows] = slice_gradient(
                    self.model, self.loss_fn, self.x[:rows], self.y[:rows], n)
                for (layer, key), shared in zip(self.trained, self.shared_grads):
                    np.copyto(shared, layer.grads[key])
            except Exception as exception:
                error = f"{type(exception).__name__}: {exception}".encode()
            try:
                pipe.send_bytes(error)
            except OSError:  # the parent closed the pipe
                return

    def close(self):
        if self.process is not None:
            self.pipe.close()
            self.process.join(5)
            if self.process.is_alive():
                self.process.terminate()
            self.process = None

    @classmethod
    @contextlib.contextmanager
    def where_usable(cls, model, loss_fn):
        """A TwinProcess for the block if one can run here for this model (usable),
        else None; closed when the block ends, however it ends."""
        twin = cls(model, loss_fn) if cls.usable(model) else None
        try:
            yield twin
        finally:
            if twin is not None:
                twin.close()

