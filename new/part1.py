# ======================================================================================
# Part I, the textbook: layers, loss, optimizers, model
# ======================================================================================


class HasFastVersion:
    """Base of the classes that Part II makes faster.  Each takes impl="fast" (the
    default), "plain" or, for convolution and pooling, "loop".  impl="fast" builds the
    subclass of the class that Part II defines for it (marked fast = True): the same
    layer, with the same numbers up to float32 rounding.  Without Part II (this part
    copied alone) "fast" builds the plain class."""
    fast = False

    def __new__(cls, *args, impl="fast", **kwargs):
        if impl == "fast" and not cls.fast:
            cls = next((sub for sub in cls.__subclasses__() if sub.fast), cls)
        return super().__new__(cls)

    def __getnewargs_ex__(self):  # copies and pickles keep the class they have
        return (), {"impl": self.impl}


class Layer(HasFastVersion):
    """What every layer has: `params` and `grads` (dicts with the same keys), a
    `training` flag, forward(x) and backward(grad).

    forward checks its input and runs the layer's _forward; in training mode the layer
    keeps what backward will need, in evaluation mode nothing.  backward checks that a
    training-mode forward came first and that grad has its output's shape, then runs
    _backward, which returns dL/dx and leaves dL/dparams in grads."""
    impls = ("plain", "fast")
    training = True
    buffer_names = ()  # arrays saved with the model that are not trained (running statistics)

    def __init__(self, impl="fast"):
        if impl not in self.impls:
            raise ValueError(f"{type(self).__name__}: impl must be one of {self.impls}, got {impl!r}")
        self.impl, self.params, self.grads = impl, {}, {}
        self.output_shape = None  # of the last training-mode forward, for backward's check

    @property
    def name(self):
        """The layer's class name in Part I ("Conv2D" for a fast Conv2D too)."""
        cls = type(self)
        return cls.__base__.__name__ if cls.fast else cls.__name__

    def __repr__(self):
        return f"{self.name}()"

    def __call__(self, x):
        return self.forward(x)

    def input_pattern(self):
        """The input shape this layer takes, names standing for any size, e.g.
        ("N", 3, "H", "W"); None: any shape."""
        return None

    def check_input(self, x):
        """x as an array, or a ValueError/TypeError naming this layer and the problem."""
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{self!r}: input must be floating-point, got {x.dtype} "
                            f"(normalize integer images first, e.g. with cnn.normalize)")
        pattern = self.input_pattern()
        if pattern is not None and (x.ndim != len(pattern) or any(
                isinstance(want, int) and want != size for want, size in zip(pattern, x.shape))):
            want = "(" + ", ".join(str(p) for p in pattern) + ")"
            raise ValueError(f"{self!r}: expected input of shape {want}, got {tuple(x.shape)}")
        return x

    def check_grad(self, grad):
        if self.output_shape is None:
            raise RuntimeError(f"{self!r}: backward() needs a forward() in training mode first")
        if grad.shape != self.output_shape:
            raise ValueError(f"{self!r}: gradient of shape {tuple(grad.shape)}, but the last "
                             f"output had shape {self.output_shape}")

    def forward(self, x):
        x = self.check_input(x)
        y = self._forward(x)
        self.output_shape = y.shape if self.training else None
        return y

    def backward(self, grad):
        self.check_grad(grad)
        return self._backward(grad)


def he_normal(rng, shape, fan_in, dtype):
    """He initialisation: keeps the variance of activations steady through ReLUs."""
    rng = np.random.default_rng() if rng is None else rng
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


# --- convolution -----------------------------------------------------------------------

def conv_output_size(h, w, kh, kw, stride, padding):
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def im2col(x, kh, kw, stride=1, padding=0):
    """x: (N, C, H, W) -> the matrix (N*Ho*Wo, C*kh*kw) whose row (n, i, j) holds the
    receptive field of output pixel (i, j) of image n, in (c, u, v) order.  A
    convolution is then one matrix multiply: im2col(x) @ W.reshape(F, -1).T."""
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, w, kh, kw, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.empty((n, ho, wo, c, kh, kw), x.dtype)
    for u in range(kh):          # kernel offset (u, v) meets pixel (i*s + u, j*s + v)
        for v in range(kw):
            cols[..., u, v] = xp[:, :, u:u + stride * ho:stride, v:v + stride * wo:stride].transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, c * kh * kw)


def col2im(cols, x_shape, kh, kw, stride=1, padding=0):
    """The adjoint of im2col, (N*Ho*Wo, C*kh*kw) -> (N, C, H, W): each number goes
    back onto the pixel it was copied from, and a pixel that sits in several receptive
    fields gets the sum.  So col2im(g @ Wmat) is dL/dx when g @ Wmat is dL/dcols."""
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, w, kh, kw, stride, padding)
    cols = cols.reshape(n, ho, wo, c, kh, kw)
    xp = np.zeros((n, c, h + 2 * padding, w + 2 * padding), cols.dtype)
    for u in range(kh):
        for v in range(kw):
            xp[:, :, u:u + stride * ho:stride, v:v + stride * wo:stride] += cols[..., u, v].transpose(0, 3, 1, 2)
    return xp[:, :, padding:padding + h, padding:padding + w]


class Conv2D(Layer):
    """2-D cross-correlation, as in PyTorch:

        y[n, f, i, j] = b[f] + sum over c, u, v of W[f, c, u, v] * xpad[n, c, i*s + u, j*s + v]

    impl="loop" computes exactly that with Python loops; impl="plain" as im2col and
    one matrix multiply."""
    impls = ("loop", "plain", "fast")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 impl="fast", bias=True, dtype=np.float32, rng=None):
        super().__init__(impl)
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kh, self.kw, self.stride, self.padding = kh, kw, stride, padding
        self.params["W"] = he_normal(rng, (out_channels, in_channels, kh, kw), in_channels * kh * kw, dtype)
        if bias:
            self.params["b"] = np.zeros(out_channels, dtype)
        self.trainable = True  # False: fixed weights (no weight gradient, no update)

    def __repr__(self):
        return (f"Conv2D({self.in_channels}, {self.out_channels}, ({self.kh}, {self.kw}), "
                f"stride={self.stride}, padding={self.padding})")

    def input_pattern(self):
        return ("N", self.in_channels, "H", "W")

    def output_size(self, h, w):
        return conv_output_size(h, w, self.kh, self.kw, self.stride, self.padding)

    def check_input(self, x):
        x = super().check_input(x)
        ho, wo = self.output_size(*x.shape[2:])
        if ho < 1 or wo < 1:
            raise ValueError(f"{self!r}: input {tuple(x.shape)} is smaller than the kernel")
        return x

    def backward(self, grad, input_grad=True):
        """input_grad=False skips dL/dx (nothing before the first trained layer needs
        it) and returns None."""
        self.check_grad(grad)
        return self._backward(grad, input_grad)

    def _forward(self, x):
        self.x_shape = x.shape
        return self._forward_loop(x) if self.impl == "loop" else self._forward_plain(x)

    def _backward(self, grad, input_grad=True):
        if self.impl == "loop":
            return self._backward_loop(grad, input_grad)
        return self._backward_plain(grad, input_grad)

    def _set_grads(self, dW, db):
        if self.trainable:
            self.grads["W"] = dW
            if "b" in self.params:
                self.grads["b"] = db

    # -- the formula, term by term ------------------------------------------------------
    def _forward_loop(self, x):
        W, s = self.params["W"], self.stride
        b = self.params.get("b", np.zeros(self.out_channels, W.dtype))
        xp = np.pad(x, ((0, 0), (0, 0), (self.padding,) * 2, (self.padding,) * 2))  # xp: (N, C, H+2p, W+2p)
        n_, f_ = x.shape[0], self.out_channels
        ho, wo = self.output_size(*x.shape[2:])
        y = np.zeros((n_, f_, ho, wo), np.result_type(x, W))       # y: (N, F, Ho, Wo)
        for n in range(n_):
            for f in range(f_):
                for i in range(ho):
                    for j in range(wo):
                        window = xp[n, :, i * s:i * s + self.kh, j * s:j * s + self.kw]
                        y[n, f, i, j] = np.sum(W[f] * window) + b[f]
        if self.training:
            self.xp = xp
        return y

    def _backward_loop(self, grad, input_grad):
        W, s, p = self.params["W"], self.stride, self.padding
        xp = self.xp
        dxp = np.zeros_like(xp)                                    # dxp: (N, C, H+2p, W+2p)
        dW = np.zeros_like(W)                                      # dW: (F, C, kh, kw)
        db = np.zeros(self.out_channels, W.dtype)
        n_, f_, ho, wo = grad.shape
        for n in range(n_):
            for f in range(f_):
                for i in range(ho):
                    for j in range(wo):
                        g = grad[n, f, i, j]
                        rows, cols = slice(i * s, i * s + self.kh), slice(j * s, j * s + self.kw)
                        # y[n,f,i,j] touched W[f] and this window: each gets g times the other.
                        dW[f] += g * xp[n, :, rows, cols]
                        dxp[n, :, rows, cols] += g * W[f]
                        db[f] += g
        self._set_grads(dW, db)
        if not input_grad:
            return None
        h, w = self.x_shape[2:]
        return dxp[:, :, p:p + h, p:p + w]

    # -- im2col and one matrix multiply ----------------------------------------------
    def _forward_plain(self, x):
        W = self.params["W"]
        n, f = len(x), self.out_channels
        ho, wo = self.output_size(*x.shape[2:])
        cols = im2col(x, self.kh, self.kw, self.stride, self.padding)  # cols: (N*Ho*Wo, C*kh*kw)
        y = cols @ W.reshape(f, -1).T                              # y: (N*Ho*Wo, F)
        if "b" in self.params:
            y += self.params["b"]
        if self.training:
            self.cols = cols
        return y.reshape(n, ho, wo, f).transpose(0, 3, 1, 2)       # (N, F, Ho, Wo)

    def _backward_plain(self, grad, input_grad):
        W, f = self.params["W"], self.out_channels
        g = grad.transpose(0, 2, 3, 1).reshape(-1, f)              # g: (N*Ho*Wo, F), rows as in cols
        # y = cols @ Wmat^T + b, so dWmat = g^T @ cols, db = the column sums of g,
        # and dcols = g @ Wmat, which col2im adds back onto the pixels.
        self._set_grads((g.T @ self.cols).reshape(W.shape), g.sum(axis=0))
        if not input_grad:
            return None
        return col2im(g @ W.reshape(f, -1), self.x_shape, self.kh, self.kw, self.stride, self.padding)


# --- pooling ---------------------------------------------------------------------------

def pool_windows(x, k, stride):
    """x: (N, C, H, W) -> the view (N, C, Ho, Wo, k, k) of every k x k window, every
    stride-th one: [n, c, i, j] is the window whose top-left pixel is (i*s, j*s)."""
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]


class MaxPool2D(Layer):
    """Max over each kernel_size x kernel_size window (stride defaults to the kernel).
    The gradient goes to the first maximum of each window (row-major order, as in
    PyTorch) and adds up where windows overlap."""
    impls = ("loop", "plain", "fast")

    def __init__(self, kernel_size=2, stride=None, impl="fast"):
        super().__init__(impl)
        self.k, self.stride = kernel_size, stride or kernel_size

    def __repr__(self):
        return f"MaxPool2D({self.k}, stride={self.stride})"

    def input_pattern(self):
        return ("N", "C", "H", "W")

    def output_size(self, h, w):
        return (h - self.k) // self.stride + 1, (w - self.k) // self.stride + 1

    def check_input(self, x):
        x = super().check_input(x)
        if min(x.shape[2:]) < self.k:
            raise ValueError(f"{self!r}: input {tuple(x.shape)} is smaller than the window")
        return x

    def _forward(self, x):
        self.x_shape = x.shape
        return self._forward_loop(x) if self.impl == "loop" else self._forward_plain(x)

    def _backward(self, grad):
        return self._backward_loop(grad) if self.impl == "loop" else self._backward_plain(grad)

    def _forward_loop(self, x):
        k, s = self.k, self.stride
        n_, c_ = x.shape[:2]
        ho, wo = self.output_size(*x.shape[2:])
        y = np.empty((n_, c_, ho, wo), x.dtype)
        self.argmax = np.empty((n_, c_, ho, wo), np.int64)        # flat index in the window
        for n in range(n_):
            for c in range(c_):
                for i in range(ho):
                    for j in range(wo):
                        window = x[n, c, i * s:i * s + k, j * s:j * s + k]
                        self.argmax[n, c, i, j] = np.argmax(window)   # first maximum
                        y[n, c, i, j] = window.flat[self.argmax[n, c, i, j]]
        return y

    def _backward_loop(self, grad):
        k, s = self.k, self.stride
        dx = np.zeros(self.x_shape, grad.dtype)
        n_, c_, ho, wo = grad.shape
        for n in range(n_):
            for c in range(c_):
                for i in range(ho):
                    for j in range(wo):
                        u, v = divmod(self.argmax[n, c, i, j], k)
                        dx[n, c, i * s + u, j * s + v] += grad[n, c, i, j]
        return dx

    def _forward_plain(self, x):
        cells = pool_windows(x, self.k, self.stride)               # cells: (N, C, Ho, Wo, k, k)
        flat = cells.reshape(cells.shape[:4] + (-1,))              # flat: (N, C, Ho, Wo, k*k)
        self.argmax = flat.argmax(axis=-1)                         # the first maximum
        return np.take_along_axis(flat, self.argmax[..., None], axis=-1)[..., 0]

    def _backward_plain(self, grad):
        dx = np.zeros(self.x_shape, grad.dtype)
        u, v = np.divmod(self.argmax, self.k)                      # the winner's place in its window
        n, c, i, j = np.indices(grad.shape, sparse=True)
        np.add.at(dx, (n, c, i * self.stride + u, j * self.stride + v), grad)  # adds where windows overlap
        return dx


class GlobalMaxPool2D(Layer):
    """(N, C, H, W) -> (N, C): the largest value of each channel; its gradient goes
    to the first maximum."""

    def input_pattern(self):
        return ("N", "C", "H", "W")

    def _forward(self, x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)               # flat: (N, C, H*W)
        self.x_shape, self.argmax = x.shape, flat.argmax(axis=2)
        return np.take_along_axis(flat, self.argmax[..., None], axis=2)[..., 0]

    def _backward(self, grad):
        n, c, h, w = self.x_shape
        dflat = np.zeros((n, c, h * w), grad.dtype)
        np.put_along_axis(dflat, self.argmax[..., None], grad[..., None], axis=2)
        return dflat.reshape(self.x_shape)


# --- activations and the other layers -------------------------------------------------

class ReLU(Layer):
    """y = max(x, 0); dy/dx = 1 where x > 0, else 0."""

    def _forward(self, x):
        y = np.maximum(x, 0)
        if self.training:
            self.y = y
        return y

    def _backward(self, grad):
        return grad * (self.y > 0)


class GELU(Layer):
    """GELU, tanh approximation: y = x/2 * (1 + t), t = tanh(u), u = C (x + A x^3)."""
    C, A = math.sqrt(2.0 / math.pi), 0.044715

    def _forward(self, x):
        t = np.tanh(self.C * (x + self.A * x ** 3))
        if self.training:
            self.x, self.t = x, t
        return 0.5 * x * (1 + t)

    def _backward(self, grad):
        # dy/dx = (1 + t)/2 + x/2 * (1 - t^2) * du/dx, with du/dx = C (1 + 3A x^2)
        x, t = self.x, self.t
        du = self.C * (1 + 3 * self.A * x * x)
        return grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), in C, H, W order."""

    def _forward(self, x):
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def _backward(self, grad):
        return grad.reshape(self.x_shape)


class Dense(Layer):
    """y = x @ W + b with W: (in_features, out_features)."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None, impl="fast"):
        super().__init__(impl)
        self.in_features, self.out_features = in_features, out_features
        self.params["W"] = he_normal(rng, (in_features, out_features), in_features, dtype)
        if bias:
            self.params["b"] = np.zeros(out_features, dtype)

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features})"

    def input_pattern(self):
        return ("N", self.in_features)

    def _forward(self, x):
        if self.training:
            self.x = x
        y = x @ self.params["W"]                                   # y: (N, out)
        return y + self.params["b"] if "b" in self.params else y

    def _backward(self, grad):
        self.grads["W"] = self.x.T @ grad
        if "b" in self.params:
            self.grads["b"] = grad.sum(axis=0)
        return grad @ self.params["W"].T


class Scale(Layer):
    """y = factor * x (a fixed factor, e.g. to temper the logits)."""

    def __init__(self, factor, impl="fast"):
        super().__init__(impl)
        self.factor = factor

    def __repr__(self):
        return f"Scale({self.factor:g})"

    def _forward(self, x):
        return x * self.factor

    def _backward(self, grad):
        return grad * self.factor


class BatchNorm2D(Layer):
    """Batch normalization over N, H, W for each channel, PyTorch semantics: batch
    statistics in training (the running variance is updated with the unbiased
    estimate), running statistics in evaluation.  scale=False fixes gamma at 1 (only
    the shift beta is trained)."""
    buffer_names = ("running_mean", "running_var")

    def __init__(self, channels, momentum=0.1, eps=1e-5, scale=True, dtype=np.float32, impl="fast"):
        super().__init__(impl)
        self.channels, self.momentum, self.eps = channels, momentum, eps
        if scale:
            self.params["gamma"] = np.ones(channels, dtype)
        self.params["beta"] = np.zeros(channels, dtype)
        self.running_mean = np.zeros(channels, dtype)
        self.running_var = np.ones(channels, dtype)

    def __repr__(self):
        return f"BatchNorm2D({self.channels})"

    def input_pattern(self):
        return ("N", self.channels, "H", "W")

    def update_running_stats(self, mean, var, count):
        m = self.momentum
        self.running_mean[:] = (1 - m) * self.running_mean + m * mean
        self.running_var[:] = (1 - m) * self.running_var + m * var * count / max(count - 1, 1)

    def _forward(self, x):
        axes, count = (0, 2, 3), x.size // self.channels
        if self.training:
            mean, var = x.mean(axis=axes), x.var(axis=axes)        # mean, var: (C,)
            self.update_running_stats(mean, var, count)
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = 1 / np.sqrt(var + self.eps)
        xhat = (x - mean[:, None, None]) * inv_std[:, None, None]  # xhat: (N, C, H, W)
        if self.training:
            self.xhat, self.inv_std = xhat, inv_std
        gamma = self.params.get("gamma", np.ones(self.channels, x.dtype))
        return (gamma[:, None, None] * xhat + self.params["beta"][:, None, None]).astype(x.dtype, copy=False)

    def _backward(self, grad):
        # With m = N*H*W values per channel, xhat = (x - mean) / sigma and
        # y = gamma * xhat + beta, x reaches the loss three ways: through its own
        # xhat, through the mean and through the variance.  Differentiating,
        #   dxhat_i/dx_j = (delta_ij - 1/m) / sigma - xhat_i xhat_j / (m sigma)
        # so, with gx = dL/dxhat = gamma * g,
        #   dL/dx = (gx - mean(gx) - xhat * mean(gx * xhat)) / sigma.
        axes, xhat = (0, 2, 3), self.xhat
        self.grads["beta"] = grad.sum(axis=axes)
        if "gamma" in self.params:
            self.grads["gamma"] = (grad * xhat).sum(axis=axes)
        gamma = self.params.get("gamma", np.ones(self.channels, grad.dtype))
        gx = grad * gamma[:, None, None]
        mean_gx = gx.mean(axis=axes, keepdims=True)
        mean_gx_xhat = (gx * xhat).mean(axis=axes, keepdims=True)
        return ((gx - mean_gx - xhat * mean_gx_xhat) * self.inv_std[:, None, None]).astype(grad.dtype, copy=False)


# --- the loss --------------------------------------------------------------------------

def log_softmax(logits):
    """log(softmax(logits)) along axis 1, as z - log(sum(exp(z))) with z = logits - max:
    exp never overflows."""
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.  With label
    smoothing e the target is (1 - e) * one_hot + e / K.  The mean over the batch is
    taken here and nowhere else.  Its gradient is (softmax - target) / N."""

    def __init__(self, label_smoothing=0.0):
        self.label_smoothing = label_smoothing

    def __repr__(self):
        return f"SoftmaxCrossEntropy(label_smoothing={self.label_smoothing})"

    def check(self, logits, labels):
        logits, labels = np.asarray(logits), np.asarray(labels)
        if logits.ndim != 2 or logits.dtype.kind != "f":
            raise ValueError(f"{self!r}: logits must be floating-point (N, K), got {logits.dtype} {logits.shape}")
        n, k = logits.shape
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"{self!r}: labels must be 1-D integers, got {labels.dtype} {labels.shape}")
        if len(labels) != n:
            raise ValueError(f"{self!r}: {len(labels)} labels for {n} rows of logits")
        if n and (labels.min() < 0 or labels.max() >= k):
            bad = labels.min() if labels.min() < 0 else labels.max()
            raise ValueError(f"{self!r}: label {bad} out of range for {k} classes (0..{k - 1})")
        return logits, labels

    def forward(self, logits, labels):
        logits, labels = self.check(logits, labels)
        n, k = logits.shape
        log_probs = log_softmax(logits)
        target = np.full((n, k), self.label_smoothing / k, logits.dtype)
        target[np.arange(n), labels] += 1 - self.label_smoothing
        self.probs, self.target = np.exp(log_probs), target
        return float(-(target * log_probs).sum() / n)

    def backward(self):
        return (self.probs - self.target) / self.probs.shape[0]


# --- optimizers and learning-rate schedules -------------------------------------------

def checked_parameters(owner, params):
    """params as a list of (name, layer, key), or a TypeError saying what is expected."""
    params = list(params)
    for entry in params:
        if not (isinstance(entry, tuple) and len(entry) == 3 and isinstance(getattr(entry[1], "params", None), dict)
                and entry[2] in entry[1].params):
            raise TypeError(f"{owner}: expects model.parameters(), a list of (name, layer, key); "
                            f"got an item of type {type(entry).__name__}")
    return params


class SGD:
    """p <- p - lr * v, with v = momentum * v + (g + weight_decay * p) (PyTorch's
    convention); Nesterov uses g + momentum * v instead of v.  A layer's `lr_scale`
    attribute multiplies the learning rate of its gradient term but not its weight
    decay (the decay per step stays lr * weight_decay * p, as in the airbench recipe,
    where BatchNorm shifts learn 64x faster without being decayed 64x harder)."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.params, self.lr = checked_parameters("SGD", params), lr
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.state = {name: np.zeros_like(layer.params[key]) for name, layer, key in self.params}

    def step(self):
        for name, layer, key in self.params:
            p, g = layer.params[key], layer.grads[key]
            scale = getattr(layer, "lr_scale", 1.0)
            if self.weight_decay:
                g = g + (self.weight_decay / scale) * p
            lr = self.lr * scale
            if self.momentum:
                v = self.state[name]
                v *= self.momentum
                v += g
                g = g + self.momentum * v if self.nesterov else v
            p -= (lr * g).astype(p.dtype, copy=False)


class Adam:
    """Adam (Kingma & Ba), with L2 weight decay added to the gradient as in PyTorch.
    The step count lives in `state` with the moments, so a checkpoint keeps it."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lr, self.betas = checked_parameters("Adam", params), lr, betas
        self.eps, self.weight_decay = eps, weight_decay
        self.state = {"adam.t": np.zeros((), np.int64)}
        for name, layer, key in self.params:
            self.state[name + ".m"] = np.zeros_like(layer.params[key])
            self.state[name + ".v"] = np.zeros_like(layer.params[key])

    def step(self):
        self.state["adam.t"] += 1
        t, (b1, b2) = int(self.state["adam.t"]), self.betas
        for name, layer, key in self.params:
            p, g = layer.params[key], layer.grads[key]
            if self.weight_decay:
                g = g + self.weight_decay * p
            m, v = self.state[name + ".m"], self.state[name + ".v"]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            lr = self.lr * getattr(layer, "lr_scale", 1.0)
            p -= (lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(p.dtype, copy=False)


class Lookahead:
    """Lookahead weight averaging (Zhang et al., 2019) as airbench uses it, wrapped
    around another optimizer.  Every `every` steps the slow copy of the weights moves
    toward the trained ("fast") ones, slow += (1 - d) * (fast - slow), and training
    goes on from the slow weights.  d = decay * (t / total_steps)^3 is near 0 early
    (no averaging while the weights still travel far) and grows to `decay` at the
    end, smoothing out the noise of the last steps; after the last step the model
    keeps the slow weights.  BatchNorm running statistics are averaged with the rest.
    The slow weights and the step count live in `state`, so checkpoints keep them."""

    def __init__(self, optimizer, model, total_steps, every=5, decay=0.95 ** 5):
        self.optimizer, self.total_steps, self.every, self.decay = optimizer, total_steps, every, decay
        self.fast = {name: a for name, a in model.state_arrays().items() if a.dtype.kind == "f"}
        self.state = optimizer.state
        self.state["lookahead.t"] = np.zeros((), np.int64)
        for name, a in self.fast.items():
            self.state["slow/" + name] = a.copy()

    @property
    def t(self):
        return int(self.state["lookahead.t"])

    @property
    def lr(self):
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    def step(self):
        self.optimizer.step()
        self.state["lookahead.t"] += 1
        if self.t % self.every == 0:
            self.pull(self.decay * (self.t / self.total_steps) ** 3)
        if self.t == self.total_steps:
            self.pull(1.0)

    def pull(self, d):
        for name, fast in self.fast.items():
            slow = self.state["slow/" + name]
            slow += (1 - d) * (fast - slow)
            fast[...] = slow


# A schedule maps the step number (0, 1, ..., total_steps - 1) to a learning rate.

def constant_lr(lr):
    return lambda step: lr


def step_lr(lr, step_size, gamma=0.1):
    """lr * gamma ** (step // step_size)."""
    return lambda step: lr * gamma ** (step // step_size)


def cosine_lr(lr, total_steps, final_lr=0.0):
    """Half a cosine from lr down to final_lr over total_steps."""
    return lambda step: final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1)))


def warmup_linear_lr(lr, total_steps, warmup=0.2, final_fraction=0.0, initial_fraction=0.0):
    """Linear warm-up from initial_fraction * lr to lr over the first `warmup`
    fraction of the steps, then linear decay to final_fraction * lr at the last step."""
    peak = max(1, round(warmup * total_steps))

    def schedule(step):
        if step < peak:
            return lr * (initial_fraction + (1 - initial_fraction) * (step + 1) / peak)
        done = (step - peak) / max(1, total_steps - 1 - peak)
        return lr * (1 - (1 - final_fraction) * min(done, 1.0))
    return schedule


# --- the model -------------------------------------------------------------------------

class DataError(ValueError):
    """A file that is missing or not what it should be; the message names the file and
    the problem."""


def save_npz(path, arrays):
    """np.savez into a temporary file beside path, then rename: a crash never leaves
    half a file under path."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_npz(path):
    """{name: array} of an .npz file of plain numeric arrays, or a DataError naming the
    file and the problem.  Never unpickles (an .npz can hold pickled objects, which
    could run code)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path}: damaged or not a model file ({type(e).__name__}: {e})") from None
    if not isinstance(arrays, dict):
        raise DataError(f"{path}: not a model file (a single array, not a set of named arrays)")
    for name, value in arrays.items():
        if value.dtype.kind not in "biuf":
            raise DataError(f"{path}: not a model file ({name} holds {value.dtype}, not numbers)")
    return arrays


class Sequential(HasFastVersion):
    """Layers applied in order.  backward() stops at the first layer with trained
    parameters: nothing before it needs a gradient (the images never do), so that
    layer's input gradient is skipped too, unless input_grad=True."""

    def __init__(self, *layers, impl="fast"):
        self.layers, self.impl = list(layers), impl

    def __repr__(self):
        return "Sequential(\n" + "".join(f"  {layer!r},\n" for layer in self.layers) + ")"

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def __call__(self, x):
        return self.forward(x)

    def first_trained(self):
        """The index of the first layer whose parameters are trained (None if none
        is): backward needs no input gradient below it."""
        return next((i for i, layer in enumerate(self.layers)
                     if layer.params and getattr(layer, "trainable", True)), None)

    def backward(self, grad, input_grad=False):
        first = self.first_trained()
        stop = 0 if input_grad or first is None else first
        for layer in self.layers[:stop:-1]:
            grad = layer.backward(grad)
        last = self.layers[stop]
        return last.backward(grad, input_grad=input_grad) if isinstance(last, Conv2D) else last.backward(grad)

    def train(self):
        for layer in self.layers:
            layer.training = True
        return self

    def eval(self):
        for layer in self.layers:
            layer.training = False
        return self

    @contextlib.contextmanager
    def evaluating(self):
        """Evaluation mode within the block, each layer's mode restored after it."""
        modes = [layer.training for layer in self.layers]
        self.eval()
        try:
            yield self
        finally:
            for layer, mode in zip(self.layers, modes):
                layer.training = mode

    def parameters(self):
        """[(name, layer, key)] for every trained array, e.g. ("0.Conv2D.W", conv, "W")."""
        return [(f"{i}.{layer.name}.{key}", layer, key)
                for i, layer in enumerate(self.layers) if getattr(layer, "trainable", True)
                for key in layer.params]

    def state_arrays(self):
        """Every array that defines the model: parameters and buffers, by name."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            for key, value in list(layer.params.items()) + [(k, getattr(layer, k)) for k in layer.buffer_names]:
                arrays[f"{i}.{layer.name}.{key}"] = value
        return arrays

    def predict(self, x, batch_size=256):
        """Logits for x in evaluation mode, batch by batch, without backward caches."""
        with self.evaluating():
            return np.concatenate([self.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def summary(self, input_shape, file=None):
        """Print each layer's output shape and parameter count for one input of
        input_shape (C, H, W); returns the text."""
        lines = [f"{'layer':<44}{'output shape':>20}{'parameters':>12}"]
        x, total = np.zeros((1,) + tuple(input_shape), np.float32), 0
        with self.evaluating():
            for layer in self.layers:
                x = layer.forward(x)
                count = sum(p.size for p in layer.params.values())
                total += count
                lines.append(f"{layer!r:<44}{str(tuple(x.shape[1:])):>20}{count:>12,}")
        lines.append(f"{'total':<64}{total:>12,}")
        text = "\n".join(lines)
        print(text, file=file or sys.stdout)
        return text

    def save(self, path, extra=None):
        """Write every parameter and buffer to an .npz file (plus any `extra` arrays,
        e.g. optimizer state), through a temporary file renamed into place."""
        arrays = {"model/" + k: v for k, v in self.state_arrays().items()}
        arrays.update(extra or {})
        save_npz(path, arrays)

    def load(self, path):
        """Load arrays written by save(); every name and shape must match this model,
        or a DataError says what differs and nothing is changed.  Returns the file's
        other arrays (optimizer state, metadata)."""
        stored = load_npz(path)
        expected = self.state_arrays()
        names = {k[len("model/"):] for k in stored if k.startswith("model/")}
        missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or unexpected:
            raise DataError(f"{path}: made for another network: missing {missing or 'nothing'}, "
                            f"unexpected {unexpected or 'nothing'}")
        for name, target in expected.items():
            if stored["model/" + name].shape != target.shape:
                raise DataError(f"{path}: made for another network: {name} has shape "
                                f"{stored['model/' + name].shape}, the model expects {target.shape}")
        for name, target in expected.items():
            target[...] = stored["model/" + name]
        return {k: v for k, v in stored.items() if not k.startswith("model/")}


def numerical_gradient(f, x, eps=1e-6):
    """dF/dx by central differences, (f(x + eps) - f(x - eps)) / (2 eps), one element
    of x at a time.  f takes no argument and reads x, which is changed in place and
    restored."""
    grad = np.zeros(x.shape, np.float64)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f()
        x[i] = old - eps
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


# --- initialisers beyond He's ----------------------------------------------------------

def whitening_filters(x, kernel_size=2, eps=5e-4):
    """Filters (2 * C*k*k, C, k, k) that whiten the k x k patches of images x
    (N, C, H, W): the eigenvectors of the patches' covariance, each scaled by
    1 / sqrt(eigenvalue + eps), used with both signs (so a ReLU-like activation after
    them loses nothing).  A convolution with them decorrelates neighbouring pixels and
    channels, which makes the first epochs of training much more effective."""
    c = x.shape[1]
    patches = np.ascontiguousarray(im2col(np.asarray(x, np.float64), kernel_size, kernel_size).T)  # (C*k*k, M)
    covariance = patches @ patches.T / patches.shape[1]
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = (eigenvectors.T / np.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, kernel_size, kernel_size)
    return np.concatenate([filters, -filters])


def dirac_init(conv):
    """Make the first in_channels filters of conv pass their input channel through
    unchanged (a 1 at the kernel's centre): the block starts close to the identity."""
    W = conv.params["W"]
    n = min(conv.in_channels, conv.out_channels)
    W[:n] = 0
    W[np.arange(n), np.arange(n), conv.kh // 2, conv.kw // 2] = 1

