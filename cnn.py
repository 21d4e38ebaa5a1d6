"""A convolutional neural network in pure NumPy, in one file you can read top to bottom.

Part I, the textbook.  Every layer with its forward and backward pass side by side
(Conv2D, MaxPool2D, GlobalMaxPool2D, ReLU, GELU, Flatten, Dense, Scale, BatchNorm2D),
the loss, the optimizers and learning-rate schedules, the Sequential model (forward,
backward, train/eval, summary, save/load), and check_gradients to test any layer
against central differences.  Convolution and max pooling come in two readable
forms: impl="loop", the formula term by term, and impl="plain", im2col and one matrix
multiply.  Part I uses nothing defined after it: copy it alone and it trains.

Part II, the engine.  Faster versions of the same layers, which impl="fast", the
default, picks (Layer.fast_versions).  They give Part I's numbers up to float32
rounding; everything that exists only for speed is here (memory layouts, im2col in
cache-sized pieces, convolution and pooling fused, threads, a twin process for
training, OpenBLAS's thread count, malloc settings).  It is safe to embed: importing
it changes nothing outside this module, models may run in several threads of your
program at once, and a process forked from yours can run layers.  Set cnn.CORES = 1
to turn all of its own parallelism off.

Part III, running it.  Data readers and a checked downloader, mini-batches with
augmentation, the training loop with exact resume, metrics, drawing (Pillow, imported
there only), the steps the train_*.py scripts call (which define the networks), and
`python cnn.py gradcheck` and `python cnn.py bench`.

Arrays are NCHW, (N, C, H, W), float32 unless the parameters are float64.  Only the
standard library and NumPy are imported here.
"""
import argparse
import contextlib
import copy
import functools
import gzip
import hashlib
import json
import math
import mmap
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile

import numpy as np

# ======================================================================================
# Part I, the textbook: layers, loss, optimizers, model
# ======================================================================================


class Layer:
    """What every layer has: `params`, its arrays, and `grads`, which backward fills
    with the gradient of each trained one under the same key; a `training` flag;
    forward(x) and backward(grad).

    forward checks its input and runs the layer's _forward; in training mode the layer
    keeps what backward will need, in evaluation mode nothing.  backward checks that a
    training-mode forward came first and that grad has its output's shape, then runs
    _backward, which returns dL/dx and leaves dL/dparams in grads.

    impl says how the layer computes: "plain" (NumPy, as written in this part),
    "loop" (Conv2D and MaxPool2D: the formula term by term), or "fast" (the version
    that Part II registers in fast_versions: the same numbers, faster; without Part
    II, "plain").  See to()."""
    impls = ("plain", "fast")
    fast_versions = {}     # Part I class -> its Part II version; Part II fills it
    is_fast = False        # True on Part II's versions
    training = True
    trainable = True       # False: fixed parameters (no gradient, no update; see Conv2D)
    lr_scale = 1.0         # multiplies the learning rate of this layer's gradient step
    buffer_names = ()      # arrays saved with the model that are not trained (running statistics)
    saved_for_backward = ()  # what a training-mode forward keeps for backward

    def __init__(self, impl="fast"):
        self.params, self.grads = {}, {}
        self.output_shape = None  # of the last training-mode forward, for backward's check
        self.to(impl)

    @property
    def textbook_class(self):
        """The class of this part that this layer is, or whose fast version it is."""
        return type(self).__base__ if self.is_fast else type(self)

    @property
    def name(self):
        """The class name in Part I ("Conv2D" for a fast Conv2D too)."""
        return self.textbook_class.__name__

    def to(self, impl):
        """Compute the way impl says from now on (the parameters stay); returns self."""
        return put_in_form(self, impl)

    def __repr__(self):
        return f"{self.name}()"

    def __call__(self, x):
        return self.forward(x)

    def __getstate__(self):
        """What copies and pickles keep: the settings, parameters and buffers, not what
        the last forward saved for backward, nor the gradients."""
        state = {k: v for k, v in vars(self).items() if k not in self.saved_for_backward}
        state.update(grads={}, output_shape=None)
        return state

    def input_pattern(self):
        """The input shape this layer takes, names standing for any size, e.g.
        ("N", 3, "H", "W"); None: any shape."""
        return None

    def check_input(self, x):
        """x as an array, or a ValueError/TypeError naming this layer and the problem."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{self!r}: input must be floating-point, got {x.dtype} "
                            f"(convert integer images to float first, e.g. x / 255)")
        if x.ndim and len(x) == 0:
            raise ValueError(f"{self!r}: empty batch, input of shape {tuple(x.shape)}")
        pattern = self.input_pattern()
        if pattern is not None and not shape_fits(x.shape, pattern):
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

    def backward(self, grad, input_grad=True):
        """dL/dx for grad = dL/dy; dL/dparams go to grads.  input_grad=False: the
        caller needs no dL/dx (no layer before this one is trained) and gets None;
        Conv2D then skips computing it."""
        self.check_grad(grad)
        dx = self._backward(grad)
        return dx if input_grad else None


def put_in_form(obj, impl):
    """A Layer or Sequential made to compute the way impl says, in place; returns it.
    For "fast" the object becomes an instance of its class's fast version (found in
    Layer.fast_versions), a subclass that replaces the textbook's methods with
    faster ones; for the others, an instance of the textbook class again."""
    if impl not in obj.impls:
        raise ValueError(f"{obj.name}: impl must be one of {obj.impls}, got {impl!r}")
    textbook = type(obj).__base__ if obj.is_fast else type(obj)
    fast = Layer.fast_versions.get(textbook) if impl == "fast" else None
    obj.__class__ = fast or textbook
    obj.impl = "plain" if impl == "fast" and fast is None else impl
    return obj


def shape_fits(shape, pattern):
    """Whether shape matches pattern: as many axes, and the given sizes where it has numbers."""
    if len(shape) != len(pattern):
        return False
    for size, want in zip(shape, pattern):
        if want != size and type(want) is int:
            return False
    return True


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
    one matrix multiply.  trainable = False fixes the weights (network 4's whitening
    filters): backward then leaves no gradient for them."""
    saved_for_backward = ("x_shape", "xp", "cols")
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
        """As Layer.backward; input_grad=False skips computing dL/dx."""
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
    saved_for_backward = ("x_shape", "argmax")
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
    saved_for_backward = ("x_shape", "argmax")

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
    saved_for_backward = ("y",)

    def _forward(self, x):
        y = np.maximum(x, 0)
        if self.training:
            self.y = y
        return y

    def _backward(self, grad):
        return grad * (self.y > 0)


class GELU(Layer):
    """GELU, tanh approximation: y = x/2 * (1 + t), t = tanh(u), u = C (x + A x^3)."""
    saved_for_backward = ("x", "t")
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
    saved_for_backward = ("x_shape",)

    def _forward(self, x):
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def _backward(self, grad):
        return grad.reshape(self.x_shape)


class Dense(Layer):
    """y = x @ W + b with W: (in_features, out_features)."""
    saved_for_backward = ("x",)

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
    the shift beta is trained).  use_running_stats = True normalizes with the running
    statistics in training mode too, without changing them: a fixed per-channel
    affine map, whose backward is gamma / sigma * grad (saliency uses it)."""
    use_running_stats = False
    saved_for_backward = ("xhat", "inv_std")
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
        if self.training and not self.use_running_stats:
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
        # Per channel, over its m = N*H*W values: mu = mean(x), var = mean((x - mu)^2),
        # sigma = sqrt(var + eps), xhat = (x - mu) / sigma, y = gamma * xhat + beta.
        # So dL/dbeta = sum(g) and dL/dgamma = sum(g * xhat).  Each x_j reaches every
        # xhat_i through mu and sigma as well as its own:
        #   dmu/dx_j    = 1/m
        #   dvar/dx_j   = 2 (x_j - mu) / m      (mu's own change adds 2 mean(x - mu) = 0)
        #   dsigma/dx_j = dvar/dx_j / (2 sigma) = xhat_j / m
        #   dxhat_i/dx_j = (delta_ij - 1/m) / sigma - (x_i - mu) / sigma^2 * dsigma/dx_j
        #                = (delta_ij - 1/m) / sigma - xhat_i xhat_j / (m sigma)
        # and with gx = dL/dxhat = gamma * g, summing gx_i dxhat_i/dx_j over i:
        #   dL/dx = (gx - mean(gx) - xhat * mean(gx * xhat)) / sigma.
        axes, xhat = (0, 2, 3), self.xhat
        self.grads["beta"] = grad.sum(axis=axes)
        if "gamma" in self.params:
            self.grads["gamma"] = (grad * xhat).sum(axis=axes)
        gamma = self.params.get("gamma", np.ones(self.channels, grad.dtype))
        gx = grad * gamma[:, None, None]
        if self.use_running_stats:  # mu and sigma fixed: only x's own xhat depends on it
            return (gx * self.inv_std[:, None, None]).astype(grad.dtype, copy=False)
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
        if n == 0:
            raise ValueError(f"{self!r}: empty batch, logits of shape {logits.shape}")
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
    expected = f"{owner}: expects model.parameters(), a list of (name, layer, key)"
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{expected}; got {getattr(params, 'name', type(params).__name__)}")
    for entry in params:
        if not (isinstance(entry, tuple) and len(entry) == 3 and isinstance(getattr(entry[1], "params", None), dict)
                and entry[2] in entry[1].params):
            raise TypeError(f"{expected}; got an item of type {type(entry).__name__}")
    return list(params)


class SGD:
    """p <- p - lr * v, with v = momentum * v + (g + weight_decay * p) (PyTorch's
    convention); Nesterov uses g + momentum * v instead of v.  A layer's lr_scale
    multiplies the learning rate of its gradient term but not its weight decay: the
    decay per step stays lr * weight_decay * p, so a layer can learn faster without
    being pulled to zero harder."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.params, self.lr = checked_parameters("SGD", params), lr
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.state = {name: np.zeros_like(layer.params[key]) for name, layer, key in self.params}

    def step(self):
        for name, layer, key in self.params:
            p, g = layer.params[key], layer.grads[key]
            scale = layer.lr_scale
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
            lr = self.lr * layer.lr_scale
            p -= (lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(p.dtype, copy=False)


class Lookahead:
    """Lookahead weight averaging (Zhang et al., 2019), wrapped around another
    optimizer, with a decay that grows over the run.  Every `every` steps a slow copy
    of the weights moves toward the trained ones, slow += (1 - d) * (weights - slow),
    and training goes on from the slow copy.  d = decay * (t / total_steps)^3 is near
    0 early (no averaging while the weights still travel far) and grows to `decay` at
    the end, smoothing out the noise of the last steps; after the last step the model
    keeps the slow weights.  BatchNorm running statistics are averaged with the rest.
    The slow weights and the step count live in `state`, so checkpoints keep them."""

    def __init__(self, optimizer, model, total_steps, every=5, decay=0.95 ** 5):
        self.optimizer, self.total_steps, self.every, self.decay = optimizer, total_steps, every, decay
        self.weights = {name: a for name, a in model.state_arrays().items() if a.dtype.kind == "f"}
        self.state = optimizer.state
        self.state["lookahead.t"] = np.zeros((), np.int64)
        for name, a in self.weights.items():
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
        for name, weights in self.weights.items():
            slow = self.state["slow/" + name]
            slow += (1 - d) * (weights - slow)
            weights[...] = slow


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


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """A file to write path's new contents into: a temporary file beside path,
    renamed to path when the block ends, removed if it ends with an error.  Readers
    of path (and a run that crashes) see the old file or the whole new one, never
    half a file."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path, arrays):
    """np.savez, written atomically (atomic_write)."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_npz(path):
    """{name: array} of an .npz file of plain numeric arrays, or a DataError naming the
    file and the problem.  Never unpickles (an .npz can hold pickled objects, which
    could run code), and reads an array only after its header proved that the file
    holds all the numbers it declares, so a damaged or forged header cannot make it
    allocate more than the file holds."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a model file (not an .npz archive: cut short, or another kind of file)")
    try:
        with zipfile.ZipFile(path) as archive:
            return dict(read_npy_member(path, archive, info) for info in archive.infolist())
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: damaged model file ({type(e).__name__}: {e})") from None


def read_npy_member(path, archive, info):
    """(name, array) of one member of an .npz archive: an .npy file, a header that
    gives its shape and type, then exactly that many numbers."""
    name = info.filename[:-len(".npy")]
    if not info.filename.endswith(".npy"):
        raise DataError(f"{path}: not a model file of ours ({info.filename} is not an .npy array)")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise DataError(f"{path}: not a model file of ours ({name}: .npy version {version})")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if dtype.hasobject:
            raise DataError(f"{path}: not a model file of ours (it holds pickled objects, which are never loaded)")
        if dtype.kind not in "biuf":
            raise DataError(f"{path}: not a model file of ours ({name} holds {dtype}, not numbers)")
        size = math.prod(shape) * dtype.itemsize
        held = info.file_size - f.tell()
        if size != held:
            raise DataError(f"{path}: damaged model file ({name} declares {shape} {dtype}, {size:,} bytes, "
                            f"but holds {held:,})")
        data = f.read(size)
    if len(data) != size:
        raise DataError(f"{path}: damaged model file ({name} is cut short)")
    array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")
    return name, array.copy(order="K")


class Sequential:
    """Layers applied in order.  impl puts every layer in that form (Layer.to; a layer
    without a "loop" form runs "plain" in a "loop" model), and for "fast" the model
    itself in the version Part II registers, which runs a convolution and the max
    pooling after it in one call."""
    impls = ("loop", "plain", "fast")
    is_fast = False
    name = "Sequential"

    def __init__(self, *layers, impl="fast"):
        self.layers = list(layers)
        self.to(impl)

    def to(self, impl):
        """Every layer and the model computing the way impl says; returns self."""
        put_in_form(self, impl)
        for layer in self.layers:
            layer.to(impl if impl in layer.impls else "plain")
        return self

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
        is): no gradient is needed below it."""
        return next((i for i, layer in enumerate(self.layers) if layer.params and layer.trainable), None)

    def backward(self, grad, input_grad=True):
        """dL/dx for grad = dL/d(output), every layer's parameter gradients left in
        its grads.  input_grad=False: the caller needs no dL/dx (training does not:
        the images are not trained), so backward stops at the first trained layer,
        which skips its own input gradient, and returns None."""
        first = self.first_trained()
        stop = 0 if input_grad or first is None else first
        for layer in self.layers[:stop:-1]:
            grad = layer.backward(grad)
        return self.layers[stop].backward(grad, input_grad=input_grad)

    def train(self):
        for layer in self.layers:
            layer.training = True
        return self

    def eval(self):
        for layer in self.layers:
            layer.training = False
        return self

    def evaluation_copy(self):
        """A copy in evaluation mode that shares this model's parameter arrays: what
        predict runs, so that predicting writes nothing to the model (no mode, no
        saved arrays, no BatchNorm statistics), from any number of threads at once."""
        model = copy.copy(self)
        model.layers = [copy.copy(layer) for layer in self.layers]
        for layer in model.layers:
            layer.training = False
        return model

    def parameters(self):
        """[(name, layer, key)] for every trained array, e.g. ("0.Conv2D.W", conv, "W")."""
        return [(f"{i}.{layer.name}.{key}", layer, key)
                for i, layer in enumerate(self.layers) if layer.trainable for key in layer.params]

    def state_arrays(self):
        """Every array that defines the model: parameters and buffers, by name."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            for key, value in list(layer.params.items()) + [(k, getattr(layer, k)) for k in layer.buffer_names]:
                arrays[f"{i}.{layer.name}.{key}"] = value
        return arrays

    def predict(self, x, batch_size=256):
        """Logits for x in evaluation mode (evaluation_copy), batch by batch."""
        model = self.evaluation_copy()
        return np.concatenate([model.forward(batch) for batch in in_batches(x, batch_size)])

    def summary(self, input_shape, file=None):
        """Print each layer's output shape and parameter count for one input of
        input_shape (C, H, W); returns the text."""
        lines = [f"{'layer':<44}{'output shape':>20}{'parameters':>12}"]
        x, total = np.zeros((1,) + tuple(input_shape), np.float32), 0
        for layer in self.evaluation_copy().layers:
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


def in_batches(x, batch_size):
    """x in consecutive pieces of batch_size (what predict runs); an empty x stays one
    empty piece, so that the first layer says what is wrong with it."""
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)] or [x]


def numerical_gradient(f, x, eps=1e-6):
    """dF/dx by central differences, (f(x + eps) - f(x - eps)) / (2 eps), one element
    of x at a time.  f takes no argument and reads x, which is changed in place and
    restored.  x must be float64 for this eps: float32 keeps about 7 digits, so
    x + 1e-6 rounds away most of the step and the difference is mostly rounding."""
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


def relative_error(a, b):
    """max |a - b| / max (|a| + |b|), over all elements: 0 for equal arrays, about
    1e-10 or less for a correct float64 gradient against central differences, near 1
    for unrelated ones.  Scale-free, and not thrown by single tiny elements."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(a) + np.abs(b), initial=0.0), 1e-300))


def check_gradients(layer, x, seed=12345):
    """{name: relative_error(backward's gradient, central differences)} for dL/dx
    ("x") and every trained parameter of a Layer or a Sequential, with
    L = sum(forward(x) * G) for a random G drawn with seed.  Runs on a float64 copy of the
    layer (see numerical_gradient), in training mode; the layer itself is not
    changed.  Below about 1e-7 the two agree; a wrong backward gives 1e-2 or more.
    Works for any Layer subclass you write."""
    net = copy.deepcopy(layer)
    layers = net.layers if isinstance(net, Sequential) else [net]
    for part in layers:
        part.training = True
        part.params = {key: value.astype(np.float64) for key, value in part.params.items()}
        for name in part.buffer_names:
            setattr(part, name, getattr(part, name).astype(np.float64))
    x = np.asarray(x).astype(np.float64)                 # keeps x's memory layout
    upstream = np.random.default_rng(seed).standard_normal(net.forward(x).shape)
    dx = net.backward(upstream)
    named = net.parameters() if isinstance(net, Sequential) else \
        [(key, net, key) for key in net.params if net.trainable]
    analytic = {"x": dx, **{name: part.grads[key].copy() for name, part, key in named}}

    def loss():
        return float(np.sum(net.forward(x) * upstream))

    numeric = {"x": numerical_gradient(loss, x),
               **{name: numerical_gradient(loss, part.params[key]) for name, part, key in named}}
    return {name: relative_error(analytic[name], numeric[name]) for name in analytic}


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
#     in training, a second process (TwinProcess); element-wise passes split
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
#   "fused"          conv + pool      a MaxPool2D with stride = kernel right after a
#                                     FastConv2D in a FastSequential         test_fast_conv_variants
#
# The engine is safe to embed: importing it starts nothing and changes no setting;
# its helper threads start at first use and take slices of work from a queue, so
# models may run in several threads of your program at once (a caller runs the slices
# no helper took, with the same numbers); it never forks (the twin process is a new
# interpreter), and a child that your program forks starts with a clean engine;
# OpenBLAS's thread count, which is process-wide, is set to one while any engine call
# needs it and restored when the last one ends; and a Ctrl-C that lands anywhere
# leaves a state that the next call repairs.
#
# The switch: CORES is how many cores the engine's own parallelism uses (its threads,
# its split of the batch, its twin process).  cnn.CORES = 1 turns all of it off.

def usable_cores(cgroup="/sys/fs/cgroup"):
    """How many cores this process may use: those the scheduler lets it run on
    (os.sched_getaffinity, e.g. under taskset), or fewer where Linux shows a CPU
    quota for its container (cgroup v2's cpu.max, v1's cpu.cfs_quota_us)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    for quota_file, period_file in ((f"{cgroup}/cpu.max", None),
                                    (f"{cgroup}/cpu/cpu.cfs_quota_us", f"{cgroup}/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as f:
                words = f.read().split()
            if period_file:
                with open(period_file) as f:
                    words.append(f.read().strip())
            quota, period = words[0], words[-1]
            if quota not in ("max", "-1"):
                count = min(count, max(1, int(quota) // int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return count


CORES = usable_cores()
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
    as a view with the two window axes appended (Part I's pool_windows, for any
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

class Call:
    """One slice of in_parallel's work: run by whichever thread claims it first, a
    helper or the caller, exactly once; or never, once cancelled.  Each call object
    serves once, so a caller interrupted by Ctrl-C leaves nothing behind that a later
    call could take for its own."""

    def __init__(self, fn):
        self.fn, self.error, self.ended = fn, None, False
        self.claim, self.done = threading.Lock(), threading.Lock()  # done: released when it ended
        self.done.acquire()

    def run(self):
        """Run fn, unless another thread already claimed it."""
        if self.claim.acquire(blocking=False):
            try:
                self.fn()
            except BaseException as error:  # handed to the caller by wait()
                self.error = error
            finally:
                self.fn, self.ended = None, True  # no reference to the caller's arrays stays behind
                self.done.release()

    def cancel(self):
        """Make sure fn never starts, if it has not."""
        if self.claim.acquire(blocking=False):
            self.fn, self.ended = None, True
            self.done.release()

    def wait(self):
        """Wait for the call to end, even through Ctrl-C (raised once it ended);
        returns the exception the call raised, or None."""
        interrupted = None
        while True:
            try:
                self.done.acquire()
                break
            except KeyboardInterrupt as interrupt:  # wait on, unless it ended meanwhile
                interrupted = interrupt
                if self.ended:
                    break
        if interrupted is not None:
            raise interrupted
        return self.error


class EngineState:
    """What the engine shares between the threads of one process: the queue of work
    for its helper threads, and which threads hold OpenBLAS at one thread.  A Ctrl-C
    between any two of its lines leaves a state that the next call repairs: a helper
    never belongs to a caller (it takes calls from the queue), the holders are the
    threads themselves (holding twice is holding once), and blas_changed stays True
    until OpenBLAS's thread count is really restored."""

    def __init__(self):
        self.lock, self.work, self.helpers = threading.Lock(), queue.SimpleQueue(), 0
        self.running = 0  # helpers running a call: the others take what is queued next
        self.blas_holders, self.blas_before, self.blas_changed = set(), None, False

    def hand_out(self, calls):
        """Queue calls for the helper threads, starting helpers up to CORES - 1 (none:
        nothing is queued, the caller runs them all)."""
        with self.lock:
            while self.helpers < min(len(calls), CORES - 1):
                self.helpers += 1
                threading.Thread(target=self._serve, daemon=True).start()
        for call in calls if self.helpers else ():
            self.work.put(call)

    def _serve(self):  # a helper thread
        while True:
            call = self.work.get()
            with self.lock:
                self.running += 1
            call.run()
            with self.lock:
                self.running -= 1

    def hold_blas(self, thread):
        """Set OpenBLAS to one thread for `thread` (its ident), unless a holder
        already did; False where its thread count cannot be set."""
        with self.lock:
            if not self.blas_holders:
                current = blas_threads(None)
                if current is None:
                    return False
                if not self.blas_changed:  # else a release was cut short: blas_before stands
                    self.blas_before, self.blas_changed = current, True
                if current != 1:
                    blas_threads(1)
            self.blas_holders.add(thread)
            return True

    def release_blas(self, thread):
        with self.lock:
            self.blas_holders.discard(thread)
            if not self.blas_holders and self.blas_changed:
                blas_threads(self.blas_before)
                self.blas_changed = False


class ThreadState(threading.local):
    """What the engine keeps for each thread of the process."""
    cores_taken = False  # this thread runs a slice of a split model (see cores_taken)
    blas_held = False    # this thread is inside one_blas_thread()

    def __init__(self):
        self.buffers = {}  # the work arrays of scratch(None, ...), freed with the thread


_engine = None
_engine_lock = threading.Lock()
_local = ThreadState()


def engine():
    """This process's EngineState, made at first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                if hasattr(os, "register_at_fork"):
                    os.register_at_fork(after_in_child=_start_afresh_after_fork)
                _engine = EngineState()
    return _engine


def _start_afresh_after_fork():
    """In a child forked from this process: a clean engine.  Its helper threads did
    not survive the fork, a lock may have been held, and the forking thread's own
    state (inside one_blas_thread, OpenBLAS at one thread) is not the child's."""
    global _engine, _engine_lock
    state, _engine, _engine_lock = _engine, None, threading.Lock()
    _local.blas_held = _local.cores_taken = False
    if state is not None and state.blas_changed:
        blas_threads(state.blas_before)


def cores_taken():
    """True in a thread that runs a slice of a model split over the cores: it has a
    core to itself, and hands nothing more to helper threads."""
    return _local.cores_taken


class one_blas_thread:
    """OpenBLAS on one thread within the block (with ... as held), for this and every
    other thread of the process, restored when the last such block ends, however it
    ends.  held is False (and nothing changed) where OpenBLAS's thread count cannot be
    set.  The engine runs every product this way: its own threads keep the cores
    busy, a sum split over OpenBLAS's threads would depend on their number, and
    OpenBLAS's idle threads would spin on a core the engine's threads need.  Blocks
    within a block of the same thread cost almost nothing."""

    def __enter__(self):
        self.nested = _local.blas_held
        if self.nested:
            return True
        self.state, self.thread = engine(), threading.get_ident()
        self.held = _local.blas_held = self.state.hold_blas(self.thread)
        return self.held

    def __exit__(self, *exc):
        if not self.nested and self.held:
            _local.blas_held = False
            self.state.release_blas(self.thread)


def on_one_blas_thread(method):
    """Decorator: the method runs within one_blas_thread() (the fast layers' passes)."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with one_blas_thread():
            return method(*args, **kwargs)
    return run


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
    near-equal slices along axis 0 of each array (None stays None).  Helper threads
    run slices 1, 2, ... at the same time as this thread runs slice 0; this thread
    also runs the slices that no helper took and none is about to take (all busy,
    e.g. with another thread's work).  The slices never depend on who runs them, so
    neither do the results."""
    n = len(arrays[0])
    bounds = [n * i // parts for i in range(parts + 1)]
    slices = [[None if a is None else a[lo:hi] for a in arrays] for lo, hi in zip(bounds, bounds[1:])]
    results, taken, held = [None] * parts, _local.cores_taken, _local.blas_held

    def run(i):  # in a helper thread, as in this one: the same cores_taken, OpenBLAS held
        before, _local.blas_held = _local.blas_held, held
        try:
            with own_core(taken):
                results[i] = fn(i, *slices[i])
        finally:
            _local.blas_held = before

    calls = [Call(lambda i=i: run(i)) for i in range(1, parts)]
    state = engine()
    state.hand_out(calls)
    try:
        run(0)
        for call in calls:
            if state.running >= state.helpers:  # every helper busy with other work: do it here
                call.run()
    except BaseException:  # Ctrl-C or an error: what has not started never starts
        for call in calls:
            call.cancel()
        raise
    finally:  # and what has started has ended before this returns
        errors = [error for error in (call.wait() for call in calls) if error is not None]
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
    parts = min(CORES, len(arrays[0])) if arrays[0].size >= SPLIT_MIN and not _local.cores_taken else 1
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
    program of your own may.  A TwinProcess started afterwards does it too."""
    global FREED_MEMORY_KEPT
    import ctypes
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 2 ** 31 - 1)  # no array gets its own mapping
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # and freed memory is not returned
        FREED_MEMORY_KEPT = True
    except (OSError, AttributeError, TypeError):     # not glibc: no mallopt to call
        pass


FREED_MEMORY_KEPT = False  # keep_freed_memory() was called in this process


# --- work arrays and matrix products ----------------------------------------------------
# A FastSequential runs its layers with OpenBLAS on one thread (on_one_blas_thread),
# and so the products below, whose own split over OpenBLAS's threads would make their
# sums depend on the number of threads.

def scratch(buffers, name, shape, dtype):
    """An uninitialised work array of this shape, kept in `buffers` from call to call
    (None: this thread's, for work within one call).  NumPy gets large arrays fresh
    from the operating system each time, and first touching their pages costs about
    as much as the copy that fills them."""
    if buffers is None:
        buffers = _local.buffers
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
    """a @ b for products with one long dimension and two
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


def column_sum(a):
    """a.sum(axis=0) for a tall matrix a, as the product ones @ a: OpenBLAS sums the
    rows an order of magnitude faster than NumPy's reduction down axis 0."""
    return np.ones(a.shape[0], a.dtype) @ a


# --- the fast layers ---------------------------------------------------------------------

class FastConv2D(Conv2D):
    """Conv2D as im2col and a matrix multiply that BLAS runs near the machine's peak,
    in one of the layouts named at the top of this part; forward_pooled also runs
    the max pooling after it."""
    saved_for_backward = Conv2D.saved_for_backward + ("cache", "x_order", "pool", "y_shape", "buffers")
    is_fast = True

    def layout(self, x):
        """How this input's im2col matrix is built and multiplied (top of Part II)."""
        if memory_order(x)[2:] == (2, 3) and self.in_channels < 8:
            return "channel-major" if self.out_channels < 8 else "rows"
        return "channels-last"

    def dx_route(self):
        """How dL/dx is computed (top of Part II): the route that measured faster."""
        return "sum of taps" if self.in_channels < self.out_channels else "convolution"

    def fuses(self, pool):
        """Whether forward_pooled can run `pool`, a MaxPool2D right after this layer,
        as part of its own call: a fast pool whose windows do not overlap."""
        return isinstance(pool, FastMaxPool2D) and pool.stride == pool.k

    def work_arrays(self):
        """The im2col matrices kept from call to call in training (see scratch), made
        at first use (a layer becomes fast in place, see Layer.to)."""
        if "buffers" not in vars(self):
            self.buffers = {}
        return self.buffers

    def forward_pooled(self, x, pool):
        """pool.forward(self.forward(x)) in one call, for a pool this layer fuses
        with; backward then takes the gradient of the pooled output."""
        if not self.fuses(pool):
            raise ValueError(f"{self!r} cannot run {pool!r} as part of its forward pass")
        x = self.check_input(x)
        y = self._forward_im2col(x, pool)
        self.output_shape = y.shape if self.training else None
        return y

    def _forward(self, x):
        return self._forward_im2col(x, None)

    def _forward_im2col(self, x, pool):
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
        buffers = self.work_arrays() if self.training else None   # evaluation keeps no cache
        layout, x_order = self.layout(x), memory_order(x)
        if layout != "channels-last":                              # cols^T: (C*kh*kw, M)
            cols = scratch(buffers, "cols", (c * self.kh * self.kw, pixels), x.dtype)
            im2col_t(pad_hw(x, p, axes=(2, 3)), self.kh, self.kw, self.stride, out=cols, pool=k)
            if layout == "channel-major":                          # y: (F, M)
                y = thin_matmul(W.reshape(f, -1), cols)
            else:                                                  # y: (M, F)
                y = thin_matmul(cols.T, W.reshape(f, -1).T)
        else:  # cols as a view of the padded input, never copied whole (see im2col_matmul)
            cols = receptive_fields(pad_hw(nhwc(x), p), self.kh, self.kw, self.stride, k)  # (N, ..., kh, kw, C)
            y = np.empty((pixels, f), np.result_type(x, W))        # y: (M, F)
            im2col_matmul(cols, W.transpose(2, 3, 1, 0).reshape(-1, f), y)
        if "b" in self.params:
            add_bias(y, self.params["b"], layout, n)
        if self.training:
            self.cache, self.x_shape, self.x_order = (layout, cols), x.shape, x_order
            self.pool, self.y_shape = pool, y.shape
        if pool is not None:
            order = (1, 0, 2, 3) if layout == "channel-major" else (0, 2, 3, 1)
            return pool.max_over_windows(phase_windows(y, layout, n, f, ho, wo, k), order)
        if layout == "channel-major":
            return y.reshape(f, n, ho, wo).transpose(1, 0, 2, 3)
        return nchw_view(y.reshape(n, ho, wo, f))

    def _backward(self, grad_out, input_grad=True):
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
            gm_windows = phase_windows(gm, layout, n, f, ho, wo, k)  # (N, F, Ho/k, Wo/k, k, k)
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
        route = input_grad_by_taps if self.dx_route() == "sum of taps" else input_grad_by_convolution
        dx = route(g, self.params["W"], self.x_shape, self.stride, self.padding)
        return in_memory_order(dx, self.x_order)


def add_bias(y, b, layout, n):
    """y += b for a convolution's output matrix y: (F, M) channel-major, else (M, F)
    with the M rows image by image."""
    if layout == "channel-major":
        split_batch(np.add, y, b[:, None], y)
    else:
        # Image by image, against the biases repeated for each pixel: broadcasting b
        # alone makes NumPy's inner loop only F numbers long.
        rows = np.tile(b, len(y) // n)                             # rows: (pixels of an image * F,)
        split_batch(lambda y: np.add(y, rows, out=y), y.reshape(n, -1))


def phase_windows(y, layout, n, f, ho, wo, k):
    """The (N, F, Ho/k, Wo/k, k, k) windows view of a convolution's output matrix y
    whose pixels are in pooling-phase order."""
    hq, wq = ho // k, wo // k
    if layout == "channel-major":                                  # y: (F, N*k*k*Hq*Wq)
        return y.reshape(f, n, k, k, hq, wq).transpose(1, 0, 4, 5, 2, 3)
    return y.reshape(n, k, k, hq, wq, f).transpose(0, 5, 3, 4, 1, 2)


def input_grad_by_convolution(g, W, x_shape, s, p):
    """A convolution's dL/dx as a convolution: the output gradient g (N, Ho, Wo, F),
    spread out by the stride s (zeros in between) and padded by k - 1,
    cross-correlated with the kernel W flipped in both directions and with in/out
    channels swapped: im2col and one matrix multiply, as in the forward pass.
    Returns dx (N, C, H, W) as a view of channels-last memory."""
    n, c, h, w = x_shape
    f, _, kh, kw = W.shape
    ho, wo = g.shape[1:3]
    hp, wp = h + 2 * p, w + 2 * p
    spread = np.zeros((n, hp + kh - 1, wp + kw - 1, f), g.dtype)  # spread: (N, Hp+kh-1, Wp+kw-1, F)
    split_batch(np.copyto, spread[:, kh - 1:kh - 1 + s * (ho - 1) + 1:s, kw - 1:kw - 1 + s * (wo - 1) + 1:s], g)
    w_flipped = W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(-1, c)  # (kh*kw*F, C)
    # Only the windows of the unpadded pixels: the padding's gradient is not needed.
    spread = spread[:, p:p + h + kh - 1, p:p + w + kw - 1]
    dx = np.empty((n, h, w, c), g.dtype)                           # dx: (N, H, W, C)
    im2col_matmul(receptive_fields(spread, kh, kw, 1), w_flipped, dx.reshape(-1, c))
    return nchw_view(dx)


def input_grad_by_taps(g, W, x_shape, s, p):
    """A convolution's dL/dx straight from the forward sum: input pixel
    (i*s + u, j*s + v) met kernel offset (u, v) at output pixel (i, j), so dL/dx is
    the sum over the kh*kw offsets of g @ W[:, :, u, v] shifted by (u, v).  One
    batched matrix multiply makes the kh*kw products, and adding a product onto its
    shifted slice moves whole image rows at a time.  Its matrix has kh*kw*C columns
    where the convolution's has kh*kw*F: less to copy when the layer widens.  A few
    images at a time, as in im2col_matmul.  g: (N, Ho, Wo, F) -> dx (N, C, H, W)."""
    n, c, h, w = x_shape
    f, _, kh, kw = W.shape
    _, ho, wo, _ = g.shape
    taps = kh * kw
    w_taps = W.transpose(2, 3, 0, 1).reshape(taps, f, c)           # (kh*kw, F, C)
    dxpad = np.empty((n, h + 2 * p, w + 2 * p, c), g.dtype)        # dxpad: (N, H+2p, W+2p, C)

    def add_products(g, dxpad):
        parts = scratch(None, "grad_parts", (taps, len(g) * ho * wo, c), g.dtype)
        np.matmul(g.reshape(-1, f), w_taps, out=parts)
        parts = parts.reshape(taps, len(g), ho, wo, c)
        dxpad.fill(0)
        for t, (u, v) in enumerate(np.ndindex(kh, kw)):
            dxpad[:, u:u + s * ho:s, v:v + s * wo:s] += parts[t]

    by_images(add_products, (g, dxpad), taps * ho * wo * c * g.itemsize)
    return nchw_view(dxpad[:, p:p + h, p:p + w])


class FastMaxPool2D(MaxPool2D):
    """Max pooling as k*k element-wise operations over whole arrays: the window
    offsets (u, v) of windows(x) are k*k strided slices of x.  Works in any memory
    order (NumPy's inner loop runs along the innermost axis) and keeps it."""
    saved_for_backward = ("x_shape", "x_order", "which")
    is_fast = True

    def _forward(self, x):
        order = memory_order(x)
        y = self.max_over_windows(windows(x, self.k, self.k, self.stride, (2, 3)), order)
        if self.training:
            self.x_shape, self.x_order = x.shape, order
        return y

    def max_over_windows(self, cells, order):
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
    saved_for_backward = ("idx", "xh_shape")
    is_fast = True

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
    is_fast = True

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
    is_fast = True

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
    saved_for_backward = ("x_shape", "x_order")
    is_fast = True

    def _forward(self, x):
        self.x_shape, self.x_order = x.shape, memory_order(x)
        return x.reshape(x.shape[0], -1)

    def _backward(self, grad_out):
        return in_memory_order(grad_out.reshape(self.x_shape), self.x_order)


class FastBatchNorm2D(BatchNorm2D):
    """BatchNorm over channels-last rows (N*H*W, C): sums as BLAS products and einsum,
    the element-wise passes in place and over threads."""
    is_fast = True

    def _forward(self, x):
        xh = nhwc(x)
        rows = xh.reshape(-1, self.channels)                       # rows: (N*H*W, C)
        count = rows.shape[0]
        batch_statistics = self.training and not self.use_running_stats
        mean = column_sum(rows) / count if batch_statistics else self.running_mean
        centred = np.empty_like(rows)                              # centred: (N*H*W, C), x - mean
        split_batch(lambda rows, centred: np.subtract(rows, mean, out=centred), rows, centred)
        if batch_statistics:
            var = np.einsum("ij,ij->j", centred, centred) / count
            self.update_running_stats(mean, var, count)
        else:
            var = self.running_var
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(centred.dtype)
        gamma, beta = self.params.get("gamma"), self.params["beta"]
        y = np.empty_like(centred)                                 # y: (N*H*W, C)

        def scale_and_shift(xhat, y):  # centred becomes xhat, in place
            xhat *= inv_std
            if gamma is None:
                np.add(xhat, beta, out=y)
            else:
                np.multiply(xhat, gamma, out=y)
                y += beta
        split_batch(scale_and_shift, centred, y)
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
        # Part I's formula, dx = gamma / sigma * (g - mean(g) - xhat * mean(g * xhat)),
        # or gamma / sigma * g with fixed statistics:
        coef, shift = (0 * g_xhat, 0 * g_sum) if self.use_running_stats else (-g_xhat / count, g_sum / count)
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
    whose predict splits each batch over the cores.  One model trains in one thread
    at a time (its layers keep one set of arrays saved for backward): a training
    forward in another thread while one is between its forward and backward is
    refused with a RuntimeError.  predict may run in any number of threads."""
    is_fast = True

    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k != "trainer"}

    def claim_training(self):
        """Make this thread the model's trainer until its backward ends, or refuse."""
        me = threading.get_ident()
        with engine().lock:
            trainer = vars(self).get("trainer")
            if trainer not in (None, me) and trainer in {t.ident for t in threading.enumerate()}:
                raise RuntimeError("Sequential: another thread is in the middle of a training step on this "
                                   "model; train each model in one thread (predict may run in any)")
            self.trainer = me

    def fused_pools(self):
        """{i: the MaxPool2D at i + 1} for each Conv2D at i that runs it."""
        return {i: pool for i, (conv, pool) in enumerate(zip(self.layers, self.layers[1:]))
                if isinstance(conv, FastConv2D) and conv.fuses(pool)}

    @on_one_blas_thread
    def forward(self, x):
        if any(layer.training for layer in self.layers):
            self.claim_training()
        pools = self.fused_pools()
        for i, layer in enumerate(self.layers):
            if i in pools:
                x = layer.forward_pooled(x, pools[i])
            elif i - 1 not in pools:  # else it ran with the convolution before it
                x = layer.forward(x)
        return x

    @on_one_blas_thread
    def backward(self, grad, input_grad=True):
        first = self.first_trained()
        stop = 0 if input_grad or first is None else first
        pools = self.fused_pools()
        for i in range(len(self.layers) - 1, stop, -1):
            if i - 1 not in pools:  # a fused pool's backward runs in its convolution's
                grad = self.layers[i].backward(grad)
        grad = self.layers[stop].backward(grad, input_grad=input_grad)
        self.trainer = None
        return grad

    def predict(self, x, batch_size=EVAL_BATCH):
        """Logits for x in evaluation mode (evaluation_copy), batch by batch, each
        batch split over the cores (split_model)."""
        model = self.evaluation_copy()
        return np.concatenate([np.concatenate(split_model(model, FastSequential.forward, batch))
                               for batch in in_batches(x, batch_size)])


# What impl="fast" builds (Layer.to, Sequential.to): each Part I class and its version here.
Layer.fast_versions.update({
    Conv2D: FastConv2D, MaxPool2D: FastMaxPool2D, GlobalMaxPool2D: FastGlobalMaxPool2D, ReLU: FastReLU,
    GELU: FastGELU, Flatten: FastFlatten, BatchNorm2D: FastBatchNorm2D,
    Sequential: FastSequential})


def thread_copy(model, slot):
    """A copy of model that another thread can run at the same time: the same
    parameter arrays, its own saved arrays, gradients and work arrays (slot: which)."""
    twin = copy.copy(model)
    twin.layers = [copy.copy(layer) for layer in model.layers]
    for layer, layer_copy in zip(model.layers, twin.layers):
        if isinstance(layer, FastConv2D):
            layer_copy.buffers = layer.work_arrays().setdefault(("copy", slot), {})
    return twin


def split_model(model, fn, *arrays):
    """[fn(net, *slices)] for CORES slices of the batch (axis 0 of the arrays), all at
    once, each run by its own net in its own thread with OpenBLAS on one thread: the
    model itself on the first slice, copies of it (thread_copy) on the others.  With a few
    dozen channels a layer is too little work to split each call over the cores,
    but the whole network on each slice is not.  fn runs once on the whole batch on
    one core, for one image, or where OpenBLAS's thread count cannot be set."""
    parts = min(CORES, len(arrays[0]))
    with one_blas_thread() as held:
        if parts < 2 or not held or cores_taken():
            return [fn(model, *arrays)]
        nets = [model] + [thread_copy(model, i) for i in range(1, parts)]
        with own_core():
            return in_parallel(lambda i, *part: fn(nets[i], *part), arrays, parts)


def needs_whole_batch(model):
    """True for a model whose training steps must see the whole batch at once: one
    with batch statistics (BatchNorm), or with a layer of your own, which may keep
    them too, or draw random numbers (dropout) that two slices would draw alike."""
    return any(layer.buffer_names or type(layer).__module__ != __name__ for layer in model.layers)


def slice_gradient(net, loss_fn, x, y, batch_size):
    """Forward, loss and backward on a slice (x, y) of a batch of batch_size images:
    returns (summed loss, logits) and leaves the slice's part of the batch's
    gradient in net's layers.  The loss gradient is weighted by the slice's share
    of the batch, so that the slices' gradients add up to the batch's.  Training
    needs no gradient for the images: backward stops at the first trained layer."""
    logits = net.forward(x)
    loss = loss_fn.forward(logits, y)
    grad = loss_fn.backward()
    if len(y) < batch_size:
        grad = grad * grad.dtype.type(len(y) / batch_size)
    net.backward(grad, input_grad=False)
    return loss * len(y), logits


def train_step(model, loss_fn, x, y, twin=None, meanwhile=None):
    """Forward, loss and backward on one batch: returns (mean loss, logits) and
    leaves the whole batch's gradients (up to float32 rounding) in the model's layers.

    A model without batch statistics runs on slices of the batch at once: half in
    a TwinProcess if one is given, else one slice per thread (split_model), the
    copies' gradients added to the model's.  A model with BatchNorm runs whole.
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


class SharedArrays:
    """Named arrays laid out in one file that two processes map into their memory:
    made by one (in /dev/shm where there is one, so in memory), opened by path by
    the other.  specs: [(name, shape, dtype)]; arrays: {name: array}."""

    def __init__(self, specs, path=None):
        layout, offset = [], 0
        for name, shape, dtype in specs:
            dtype = np.dtype(dtype)
            layout.append((name, tuple(shape), dtype, offset))
            offset += -(-math.prod(shape) * dtype.itemsize // 64) * 64  # each array 64-byte aligned
        self.specs, self.path, self.owner = specs, path, path is None
        if self.owner:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, self.path = tempfile.mkstemp(prefix="cnn-twin-", dir=folder)
            os.ftruncate(fd, max(offset, 1))
        else:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            self.map = mmap.mmap(fd, max(offset, 1))
        finally:
            os.close(fd)
        self.arrays = {name: np.frombuffer(self.map, dtype, math.prod(shape), at).reshape(shape)
                       for name, shape, dtype, at in layout}

    def unlink(self):
        """Remove the file (its memory lives on while mapped); for its maker only."""
        if self.owner and self.path is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.path = None


def shared_slots(model):
    """The (layer, key) pairs whose arrays a TwinProcess shares, in the order both
    processes name them (weight0, weight1, ..., grad0, ...): every parameter (the
    twin gets all the weights at each step), then the trained ones (it hands back
    their gradients)."""
    weights = [(layer, key) for layer in model.layers for key in layer.params]
    trained = [(layer, key) for _, layer, key in model.parameters()]
    return weights, trained


# The engine's settings, which the twin process takes over so that it computes alike.
ENGINE_SETTINGS = ("CORES", "SPLIT_MIN", "CHUNK_BYTES", "SMALL_MATMUL", "FREED_MEMORY_KEPT")


def _send(stream, data):
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream):
    """The next message of _send, or None where the stream ended."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    data = stream.read(int.from_bytes(head, "little"))
    return data if len(data) == int.from_bytes(head, "little") else None


class TwinProcess:
    """A second Python process that computes the gradient of the second half of each
    training batch while this process computes the first half.

    Threads share one GIL: the Python between NumPy's loops runs one thread at a
    time.  A process has a GIL of its own.  The twin is a new interpreter started
    with subprocess (never a fork of this process, which may have threads of its
    own), once per fit: it gets a copy of the model and the loss (pickled), then at
    each step the current weights and its half of the batch through SharedArrays,
    runs slice_gradient on its copy, and hands back its gradients, summed loss and
    logits the same way; its stdin and stdout carry only "go" and "done".  The
    numbers are split_model's on two cores, bit for bit.  Change the layers (not
    just the weights) only when no twin runs."""

    def __init__(self, model, loss_fn):
        self.model, self.loss_fn, self.process, self.exit_code = model, loss_fn, None, None
        self.weights, self.trained = shared_slots(model)
        self.copy = None  # the pickled model and loss, once made; False: they cannot be pickled

    def fits(self, x):
        """Whether the twin can compute half of this batch: not more rows than its first
        batch had, and a model and loss that can be pickled (else train_step splits
        the batch over threads instead, with the same numbers)."""
        if self.copy is None:
            try:
                self.copy = pickle.dumps((self.model, self.loss_fn))
            except (pickle.PicklingError, TypeError, AttributeError):
                self.copy = False
        return bool(self.copy) and (self.process is None or len(x) - len(x) // 2 <= len(self.shared.arrays["x"]))

    def _start(self, x, y):
        rows = len(x) - len(x) // 2                                # the twin's half of a full batch
        logits = self.model.predict(x[:1])                         # for the shape of the output
        specs = [("x", (rows,) + x.shape[1:], x.dtype), ("y", (rows,), y.dtype),
                 ("logits", (rows,) + logits.shape[1:], logits.dtype),
                 ("numbers", (3,), np.float64)]                    # batch size, rows, summed loss
        specs += [(f"weight{i}", l.params[k].shape, l.params[k].dtype) for i, (l, k) in enumerate(self.weights)]
        specs += [(f"grad{i}", l.params[k].shape, l.params[k].dtype) for i, (l, k) in enumerate(self.trained)]
        self.shared = SharedArrays(specs)
        code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"   # Ctrl-C is the parent's
                "import importlib, pickle, sys\n"
                "path, module = pickle.load(sys.stdin.buffer)\n"
                "sys.path[:0] = path\n"
                "importlib.import_module(module).serve_twin()\n")
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        settings = {name: globals()[name] for name in ENGINE_SETTINGS}
        try:
            pickle.dump((sys.path, __name__), self.process.stdin)
            _send(self.process.stdin, self.copy)
            _send(self.process.stdin, pickle.dumps((self.shared.path, specs, settings)))
            ready = _receive(self.process.stdout)
        except OSError:
            ready = None
        if ready != b"":
            self._died(ready)
        self.shared.unlink()  # mapped by both: the memory stays until both let go

    def step(self, x, y, meanwhile=None):
        """(mean loss, logits) of the batch, computed half here and half in the
        twin; the model's gradients are the whole batch's afterwards.  meanwhile()
        runs once this half is done, while the twin (which started later) finishes.
        Only for a batch that fits()."""
        if self.process is None:
            self._start(x, y)
        shared, n, half = self.shared.arrays, len(x), len(x) // 2
        for i, (layer, key) in enumerate(self.weights):
            np.copyto(shared[f"weight{i}"], layer.params[key])
        shared["x"][:n - half], shared["y"][:n - half] = x[half:], y[half:]
        shared["numbers"][:2] = n, n - half
        try:
            _send(self.process.stdin, b"go")
        except OSError:
            self._died()
        try:
            with one_blas_thread(), own_core():
                mine = slice_gradient(self.model, self.loss_fn, x[:half], y[:half], n)
            if meanwhile is not None:
                meanwhile()
        finally:  # even if this half failed: the next step must not read this step's answer
            error = _receive(self.process.stdout)
        if error is None:
            self._died()
        if error:
            raise RuntimeError(f"the twin training process failed: {error.decode()}")
        for i, (layer, key) in enumerate(self.trained):
            layer.grads[key] += shared[f"grad{i}"]
        return mean_loss_and_logits([mine, (shared["numbers"][2], shared["logits"][:n - half])], n)

    def _died(self, message=None):
        self.close()
        why = f": {message.decode()}" if message else ""
        raise RuntimeError(f"the twin training process died (exit code {self.exit_code}){why}") from None

    def close(self):
        """End the twin (it ends when its stdin closes) and free the shared memory."""
        if self.process is not None:
            process, self.process = self.process, None
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
            self.exit_code = process.returncode
            self.shared.unlink()


def serve_twin():
    """The twin process's side of TwinProcess, reading from stdin until it closes:
    the model, loss and shared arrays, then one step of slice_gradient per "go"."""
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, not into the messages
    model, loss_fn = pickle.loads(_receive(stdin))
    path, specs, settings = pickle.loads(_receive(stdin))
    globals().update(settings)
    if FREED_MEMORY_KEPT:
        keep_freed_memory()
    shared = SharedArrays(specs, path).arrays
    blas_threads(1)  # for good: this process only ever runs its slice on its core
    _local.cores_taken = _local.blas_held = True
    weights, trained = shared_slots(model)
    for i, (layer, key) in enumerate(weights):
        layer.params[key] = shared[f"weight{i}"]
    _send(stdout, b"")
    while _receive(stdin) is not None:
        n, rows = int(shared["numbers"][0]), int(shared["numbers"][1])
        error = b""
        try:
            shared["numbers"][2], shared["logits"][:rows] = slice_gradient(
                model, loss_fn, shared["x"][:rows], shared["y"][:rows], n)
            for i, (layer, key) in enumerate(trained):
                np.copyto(shared[f"grad{i}"], layer.grads[key])
        except Exception as exception:
            error = f"{type(exception).__name__}: {exception}".encode()
        try:
            _send(stdout, error)
        except OSError:  # the parent is gone
            return


def twin_process_usable(model):
    """Whether a TwinProcess can train this model here: with two cores or more,
    OpenBLAS's thread count settable, a model whose steps may be split, and this
    file imported as a module (the twin imports it by its name)."""
    return (CORES > 1 and blas_threads(None) is not None and not needs_whole_batch(model)
            and __name__ != "__main__")


@contextlib.contextmanager
def twin_process(model, loss_fn):
    """A TwinProcess for the block if one is usable for this model, else None;
    closed when the block ends, however it ends."""
    twin = TwinProcess(model, loss_fn) if twin_process_usable(model) else None
    try:
        yield twin
    finally:
        if twin is not None:
            twin.close()


# ======================================================================================
# Part III, running it: data, training, metrics, pictures, command line, bench
# ======================================================================================

# --- data: readers and a checked downloader ---------------------------------------------

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def cache_dir():
    """Where to put decompressed files when the data folder is read-only."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "numpy-cnn")


def _writable_path(path):
    """path itself if its folder is writable, else the same name in cache_dir()."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.access(folder, os.W_OK):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    return os.path.join(cache_dir(), os.path.basename(path))


def gunzip_once(path):
    """Decompress path (a .gz) to a raw file beside it (or in the cache folder) the
    first time; later calls find the raw file and return at once."""
    raw = _writable_path(path[:-3])
    if os.path.exists(raw) and os.path.getmtime(raw) >= os.path.getmtime(path):
        return raw
    try:
        with gzip.open(path, "rb") as src, atomic_write(raw) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None
    return raw


def read_idx(path):
    """Read an IDX file (raw or .gz) as a read-only memory-mapped array.

    Layout: two zero bytes, a type code (0x08 = uint8, ...), the number of
    dimensions, one big-endian uint32 size per dimension, then the data."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    raw = gunzip_once(path) if path.endswith(".gz") else path
    with open(raw, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[:2] != b"\0\0":
            raise DataError(f"{path}: bad magic bytes {header!r}, not an IDX file")
        type_code, ndim = header[2], header[3]
        if type_code not in IDX_TYPES:
            raise DataError(f"{path}: unknown IDX type code 0x{type_code:02x}")
        dims_bytes = f.read(4 * ndim)
        if len(dims_bytes) < 4 * ndim:
            raise DataError(f"{path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(dims_bytes, ">u4"))
    dtype = np.dtype(IDX_TYPES[type_code])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = os.path.getsize(raw)
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: header says {expected} bytes, file has {actual}")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(raw, dtype=dtype, mode="r", offset=offset, shape=shape)


def write_idx(path, array):
    """Write an array as an IDX file (gzip-compressed if path ends in .gz)."""
    codes = {np.dtype(v).newbyteorder(">") if np.dtype(v).itemsize > 1 else np.dtype(v): k
             for k, v in IDX_TYPES.items()}
    big = array.astype(np.dtype(array.dtype).newbyteorder(">") if array.dtype.itemsize > 1
                       else array.dtype)
    header = bytes([0, 0, codes[big.dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + big.tobytes()
    with atomic_write(path) as f:
        f.write(gzip.compress(data) if path.endswith(".gz") else data)


def _find_file(folder, names):
    for name in names:
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    raise DataError(f"{folder}: none of {', '.join(names)} (or .gz) found")


def load_mnist(folder, split="train"):
    """MNIST or Fashion-MNIST from a folder of IDX files (raw or .gz).
    Returns images uint8 (N, 1, 28, 28) and labels uint8 (N,), memory-mapped."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    images_path = _find_file(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    labels_path = _find_file(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected 28 x 28 images (MNIST format), got "
                        f"{images.shape[1]} x {images.shape[2]}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: count mismatch: {len(labels)} labels for "
                        f"{len(images)} images in {images_path}")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{labels_path}: label out of range: {int(labels.max())} (expected 0..9)")
    return images[:, None], labels


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batches contain: NumPy arrays and plain
    containers.  Any other global (os.system, eval, ...) is refused before it runs."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(1))[0]
        if module == "_codecs":
            import codecs
            return codecs.encode
        return getattr(np, name)


def read_cifar_batch(path):
    """One CIFAR-10 batch file -> images uint8 (N, 3, 32, 32), labels uint8 (N,)."""
    try:
        with open(path, "rb") as f:
            batch = SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or corrupt pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: not a CIFAR-10 batch (needs b'data' and b'labels', has {keys})")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: not a CIFAR-10 batch (data should be uint8 (N, 3072), got {shape})")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: count mismatch: {labels.size} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: label out of range: {int(labels.max())} (expected 0..9)")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def safe_extract(archive, target):
    """Extract a tar archive into target; refuses links, devices and any member whose
    path would land outside target.  Extracts into a temporary folder renamed into
    place, so an interrupted extraction leaves nothing half-done."""
    target = os.path.abspath(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                dest = os.path.abspath(os.path.join(target, m.name))
                if os.path.isabs(m.name) or not dest.startswith(target + os.sep) and dest != target:
                    raise DataError(f"{archive}: unsafe member {m.name!r} escapes the target folder")
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"{archive}: unsafe member {m.name!r} (links and devices are refused)")
            tmp = tempfile.mkdtemp(prefix=".extract-", dir=os.path.dirname(target))
            try:
                for m in members:
                    tar.extract(m, tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                for name in os.listdir(tmp):
                    if not os.path.exists(os.path.join(target, name)):
                        os.makedirs(target, exist_ok=True)
                        os.replace(os.path.join(tmp, name), os.path.join(target, name))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: not a readable tar archive ({e})") from None


def _cifar_folder(path):
    """Resolve a CIFAR-10 path (archive, batches folder, or a folder holding either)
    to the cifar-10-batches-py folder, extracting the archive once if needed."""
    if os.path.isfile(path) and path.endswith((".tar.gz", ".tgz", ".tar")):
        archive, folder = path, _writable_path(os.path.join(os.path.dirname(path), "cifar-10-batches-py"))
        if not os.path.isdir(folder):
            safe_extract(archive, os.path.dirname(folder))
        if not os.path.isdir(folder):
            raise DataError(f"{archive}: holds no cifar-10-batches-py folder")
        return folder
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isfile(os.path.join(path, "batches.meta")):
        return path
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        return os.path.join(path, "cifar-10-batches-py")
    archive = os.path.join(path, "cifar-10-python.tar.gz")
    if os.path.isfile(archive):
        return _cifar_folder(archive)
    raise DataError(f"{path}: no cifar-10-python.tar.gz or cifar-10-batches-py here")


def load_cifar10(path, split="train"):
    """CIFAR-10 from cifar-10-python.tar.gz, the cifar-10-batches-py folder, or a
    folder holding either.  Returns images uint8 (N, 3, 32, 32), labels uint8 (N,)
    and the ten class names."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.get(split)
    if names is None:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    folder = _cifar_folder(path)
    meta_path = os.path.join(folder, "batches.meta")
    try:
        with open(meta_path, "rb") as f:
            meta = SafeUnpickler(f, encoding="bytes").load()
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
    except FileNotFoundError:
        raise DataError(f"{meta_path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: not a CIFAR-10 batches.meta ({type(e).__name__}: {e})") from None
    parts = [read_cifar_batch(os.path.join(folder, n)) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes


# --- finding and downloading ----------------------------------------------------------

MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"]
FASHION_MIRRORS = ["https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                   "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"]
# name -> (mirrors, {file: SHA-256}).  For the IDX files the checksum is that of the
# official uncompressed file (the .gz is decompressed while it streams), so a mirror
# that recompressed the data still verifies.
DATASETS = {
    "mnist": (MNIST_MIRRORS, {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"}),
    "fashion-mnist": (FASHION_MIRRORS, {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"}),
    "cifar10": (["https://www.cs.toronto.edu/~kriz/"], {
        "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"}),
}
SYSTEM_DIRS = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}


def _human(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def download(url, dest, sha256, timeout=30):
    """Stream url into dest, checking its SHA-256.  A url ending in .gz for a dest
    that does not is decompressed on the fly (the checksum is then that of the
    decompressed file).  Shows a progress bar on a terminal and a few lines otherwise.
    Written atomically, and only if the checksum matches: a failed or interrupted
    download never leaves a file under dest."""
    import zlib
    unzip = zlib.decompressobj(31) if url.endswith(".gz") and not dest.endswith(".gz") else None
    digest, done, start = hashlib.sha256(), 0, time.time()
    tty = sys.stderr.isatty()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_write(dest) as out:
            total = int(response.headers.get("Content-Length") or 0)
            next_report = 0.25
            while True:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                done += len(chunk)
                data = unzip.decompress(chunk) if unzip else chunk
                digest.update(data)
                out.write(data)
                rate = done / max(time.time() - start, 1e-9)
                if tty:
                    pct = f"{100 * done / total:5.1f} %" if total else ""
                    print(f"\r  {os.path.basename(dest)}: {_human(done)} {pct} {_human(rate)}/s",
                          end="", file=sys.stderr, flush=True)
                elif total and done / total >= next_report:
                    print(f"  {os.path.basename(dest)}: {100 * done / total:.0f} % of {_human(total)}",
                          file=sys.stderr)
                    next_report += 0.25
            if tty:
                print(file=sys.stderr)
            if total and done != total:
                raise DataError(f"{url}: connection closed after {done} of {total} bytes")
            if unzip:
                if not unzip.eof:
                    raise DataError(f"{url}: gzip stream ends early")
                rest = unzip.flush()
                digest.update(rest)
                out.write(rest)
            if digest.hexdigest() != sha256:
                raise DataError(f"{url}: checksum mismatch: SHA-256 {digest.hexdigest()}, expected {sha256}")
    except (urllib.error.URLError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{url}: download failed ({getattr(e, 'reason', e)})") from None
    return dest


def fetch_dataset(name, folder, mirrors=None):
    """Download the files of DATASETS[name] that folder lacks, trying each mirror in
    order.  On failure, says which files are needed and where to put them."""
    default_mirrors, files = DATASETS[name]
    os.makedirs(folder, exist_ok=True)
    for filename, sha in files.items():
        dest = os.path.join(folder, filename)
        if os.path.exists(dest):
            continue
        errors = []
        remote = filename if filename.endswith(".gz") else filename + ".gz"
        for mirror in mirrors or default_mirrors:
            print(f"downloading {mirror}{remote}", file=sys.stderr)
            try:
                download(mirror + remote, dest, sha)
                break
            except DataError as e:
                errors.append(str(e))
        else:
            raise DataError(f"could not download {name} ({errors[-1]}); put "
                            f"{', '.join(files)} (or their .gz) in {folder} or pass --data-dir")
    return folder


def locate_dataset(name, data_dir=None):
    """Where the training scripts find their data: --data-dir if given (it must hold
    the data), else ./data/NAME, then the system folders (Debian's
    dataset-fashion-mnist), else a download into ./data/NAME."""
    loader = load_cifar10 if name == "cifar10" else load_mnist
    if data_dir is not None:
        if not os.path.exists(data_dir):
            raise DataError(f"--data-dir {data_dir}: no such folder")
        loader(data_dir, "test")
        return data_dir
    for folder in [os.path.join("data", name)] + SYSTEM_DIRS.get(name, []):
        try:
            loader(folder, "test")
            return folder
        except DataError:
            continue
    return fetch_dataset(name, os.path.join("data", name))



# --- mini-batches with augmentation -----------------------------------------------------



def channel_stats(images, chunk=5000):
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), in
    chunks, so the whole set is never converted to floating point at once."""
    c = images.shape[1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(images), chunk):
        block = np.asarray(images[i:i + chunk], np.float64)
        total += block.sum(axis=(0, 2, 3))
        total_sq += (block * block).sum(axis=(0, 2, 3))
        count += block.size // c
    mean = total / count
    return mean.astype(np.float32), np.sqrt(total_sq / count - mean ** 2).astype(np.float32)


def normalize(batch, mean, std):
    """uint8 (B, C, H, W) -> float32 with mean 0 and standard deviation 1 per channel.
    NCHW memory: the first convolution builds its im2col matrix fastest from it."""
    x = batch.astype(np.float32)                                   # x: (B, C, H, W)
    x -= mean[:, None, None]
    x *= (1 / std)[:, None, None]
    return x


def pad_images(batch, pad, mode="reflect"):
    """batch (B, C, H, W) padded by `pad` pixels on each side, mirrored (as np.pad's
    "reflect": the edge pixel is not repeated) or with zeros.  Written as slice
    copies into one array, about twice as fast as np.pad's general code."""
    n, c, h, w = batch.shape
    if mode == "reflect" and pad >= min(h, w):  # reflecting more than once: np.pad knows how
        return np.pad(batch, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    # Not pad_hw: handing this small uint8 copy to a thread costs more than it saves.
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), batch.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = batch
    if mode == "reflect" and pad:
        padded[:, :, pad:pad + h, :pad] = batch[:, :, :, pad:0:-1]
        padded[:, :, pad:pad + h, pad + w:] = batch[:, :, :, w - 2:w - 2 - pad:-1]
        padded[:, :, :pad] = padded[:, :, 2 * pad:pad:-1]
        padded[:, :, pad + h:] = padded[:, :, pad + h - 2:h - 2:-1]
    return padded


def crop_at(batch, pad, dy, dx, mode="reflect"):
    """Pad by `pad` pixels and cut, from image k, the H x W window at (dy[k], dx[k]);
    vectorized: all windows are views of the padded batch, one fancy index picks them."""
    n, c, h, w = batch.shape
    crops = windows(pad_images(batch, pad, mode), h, w, 1, (2, 3))  # crops: (B, C, 2p+1, 2p+1, H, W)
    return crops[np.arange(n), :, dy, dx]


def flip_some(batch, flip):
    """Mirror, in place, the images where the boolean mask flip is True; returns
    batch.  Only those images are copied (np.where would copy the whole batch)."""
    batch[flip] = batch[flip, ..., ::-1]
    return batch


def iterate_batches(images, labels, batch_size, mean, std, *, shuffle=True, seed=0, epoch=0,
                    crop=0, pad_mode="reflect", flip=None, drop_last=False, start=0):
    """Yield (x float32 (B, C, H, W), y int64 (B,)) over one epoch, from batch `start` on.

    Everything random comes from a generator seeded with (seed, epoch): the order, a
    fresh permutation for each epoch, and the augmentation.  The batches before
    `start` draw their random numbers too, without being made, so a run resumed in
    the middle of an epoch sees exactly the batches it would have seen.  Only one
    batch is converted to float32 at a time.  Augmentation: crop > 0 pads by crop
    pixels and crops back at random; flip "random" mirrors half the images, flip
    "alternate" mirrors each image on every other epoch (a random half on even
    epochs, the other half on odd ones)."""
    n = len(images)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if flip == "alternate":
        flip_mask = (np.random.default_rng([seed, 7919]).random(n) < 0.5) ^ bool(epoch % 2)
    stop = n - n % batch_size if drop_last else n
    for number, begin in enumerate(range(0, stop, batch_size)):
        idx = np.sort(order[begin:begin + batch_size])  # memory-mapped reads go faster in file order
        if crop:
            dy, dx = rng.integers(0, 2 * crop + 1, len(idx)), rng.integers(0, 2 * crop + 1, len(idx))
        flips = rng.random(len(idx)) < 0.5 if flip == "random" else \
            flip_mask[idx] if flip == "alternate" else None
        if number < start:
            continue
        batch = np.asarray(images[idx])
        if crop:
            batch = crop_at(batch, crop, dy, dx, pad_mode)
        if flips is not None:
            batch = flip_some(batch, flips)
        yield normalize(batch, mean, std), np.asarray(labels[idx]).astype(np.int64)


# --- training ----------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    pass


def predict_logits(model, images, mean, std, batch_size=EVAL_BATCH, tta=0, plain=None):
    """Logits for uint8 images, in evaluation mode, with test-time augmentation:
    tta=1 averages the logits of each image and its mirror image; tta=2 (airbench's
    level 2) gives that pair half the weight and the other half to the same pair
    shifted one pixel up-left and one pixel down-right (reflect padding).
    plain: the logits without augmentation, if a call with tta=0 already computed
    them, so that they are not computed twice."""
    def mirrored(batch, logits=None):
        if logits is None:
            logits = model.predict(normalize(batch, mean, std), batch_size)
        if tta:
            logits = 0.5 * (logits + model.predict(normalize(batch[..., ::-1], mean, std), batch_size))
        return logits

    out = []
    with one_blas_thread():  # for the whole set, see fit
        for i in range(0, len(images), batch_size):
            batch = np.asarray(images[i:i + batch_size])
            logits = mirrored(batch, None if plain is None else plain[i:i + batch_size])
            if tta >= 2:
                h, w = batch.shape[2:]
                padded = pad_images(batch, 1)
                shifted = 0.5 * (mirrored(padded[:, :, :h, :w]) + mirrored(padded[:, :, 2:, 2:]))
                logits = 0.5 * (logits + shifted)
            out.append(logits)
    return np.concatenate(out)


def score(logits, labels):
    """(mean cross-entropy, accuracy, predicted classes) of logits against labels."""
    labels = np.asarray(labels).astype(np.int64)
    loss = float(-log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels].mean())
    predictions = logits.argmax(axis=1)
    return loss, float((predictions == labels).mean()), predictions


def evaluate(model, images, labels, mean, std, batch_size=EVAL_BATCH, tta=0):
    """(mean cross-entropy, accuracy, predicted classes) on a whole set."""
    return score(predict_logits(model, images, mean, std, batch_size, tta), labels)


class Progress:
    """On a terminal, one line per epoch rewritten in place (images done, images/s,
    running loss, time left); otherwise nothing until the epoch's summary line."""

    def __init__(self, epoch, epochs, total, done=0, stream=sys.stderr):
        self.epoch, self.epochs, self.total, self.stream = epoch, epochs, total, stream
        self.tty, self.first = stream.isatty(), done
        self.start = self.last = time.time()

    def update(self, done, loss):
        now = time.time()
        if not self.tty or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        rate = (done - self.first) / max(now - self.start, 1e-9)
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        left = (self.total - done) / max(rate, 1e-9)
        print(f"\repoch {self.epoch}/{self.epochs} [{bar}] {done}/{self.total} {rate:,.0f} img/s "
              f"loss {loss:.4f} {left:4.0f}s left ", end="", file=self.stream, flush=True)

    def close(self):
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", file=self.stream, flush=True)


class StopRequest:
    """Within the block, Ctrl-C asks the training loop to stop after the current step
    (requested becomes True), so that a checkpoint always holds whole steps.  A
    second Ctrl-C stops at once.  Signals reach only the main thread: in another
    thread the block changes nothing."""

    def __init__(self):
        self.requested, self.previous = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def new_position(epoch=0):
    """Where training stands: the epoch, the batches done in it, and its running sums."""
    return dict(epoch=epoch, batch=0, loss_sum=0.0, correct=0, seen=0, seconds=0.0)


def train_epoch(model, loss_fn, optimizer, schedule, batches, at, steps_per_epoch, progress, stop=None,
                twin=None):
    """Train on `batches`, the rest of epoch at["epoch"] from batch at["batch"],
    updating the position `at` after every step.  Returns True at the end of the
    epoch, False where stop.requested ended it early (after a whole step).  twin: a
    TwinProcess that computes half of every step (see train_step)."""
    model.train()
    batches, upcoming = iter(batches), None

    def prepare_next():  # while the twin finishes the current step, see TwinProcess.step
        nonlocal upcoming
        upcoming = next(batches, None)

    prepare_next()
    while upcoming is not None:
        x, y = upcoming
        step = at["epoch"] * steps_per_epoch + at["batch"]
        optimizer.lr = schedule(step)
        loss, logits = train_step(model, loss_fn, x, y, twin, meanwhile=prepare_next)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss} at step {step}")
        optimizer.step()
        at["batch"] += 1
        at["loss_sum"] += loss * len(y)
        at["correct"] += int((logits.argmax(axis=1) == y).sum())
        at["seen"] += len(y)
        progress.update(at["seen"], at["loss_sum"] / at["seen"])
        if stop is not None and stop.requested and upcoming is not None:
            progress.close()
            return False
    progress.close()
    return True


def save_checkpoint(path, model, optimizer, meta):
    """Model, optimizer state and metadata (JSON) in one .npz, renamed into place."""
    extra = {"optimizer/" + k: v for k, v in optimizer.state.items()}
    extra["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    model.save(path, extra)


def load_checkpoint(path, model, optimizer=None):
    """Load a checkpoint written by save_checkpoint into model (and optimizer);
    returns its metadata.  A DataError names the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no checkpoint here (train first, or check --out)")
    extra = model.load(path)
    try:
        meta = json.loads(bytes(extra["meta"]).decode())
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: damaged checkpoint (no readable metadata: {type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: damaged checkpoint (metadata is not a record)")
    for key, value in (optimizer.state.items() if optimizer is not None else ()):
        stored = extra.get("optimizer/" + key)
        if stored is None or stored.shape != value.shape:
            raise DataError(f"{path}: optimizer state {key} missing or of the wrong shape "
                            f"(saved with another optimizer?)")
        value[...] = stored
    return meta


def fit(model, loss_fn, optimizer, schedule, train_set, val_set, mean, std, *, epochs,
        batch_size, seed=0, augment=None, checkpoint=None, meta=None, position=None,
        history=None, log=print):
    """The training loop: for each epoch, shuffle, train, measure on the validation
    set, log one line and save a checkpoint (weights, optimizer state, history and
    position, see new_position).

    Ctrl-C stops after the current step, saves the checkpoint at that exact position
    and raises KeyboardInterrupt; fit(..., position=, history=) with what
    load_checkpoint returned then goes on with the numbers of a run that was never
    interrupted.  A run killed outright resumes the same way from its last
    checkpoint (the end of the last whole epoch).  Stops with TrainingDiverged if
    the loss stops being finite (the last checkpoint is kept).

    What runs meanwhile: the engine's helper threads (one per core after the first),
    and, for a model without batch statistics or layers of your own, one TwinProcess
    (a second Python process, started with subprocess, never forked) for the whole
    call, ended when it returns.  cnn.CORES = 1 turns both off."""
    if not len(train_set[0]):
        raise ValueError("fit: no training images")
    history = list(history or [])
    (x_train, y_train), (x_val, y_val) = train_set, val_set
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    at = dict(new_position(), **(position or {}))
    meta = dict(meta or {})

    def save():
        if checkpoint:
            meta.update(position=at, history=history)
            save_checkpoint(checkpoint, model, optimizer, meta)

    # OpenBLAS on one thread for the whole run, not step by step: each time its thread
    # count goes back up, its idle threads spin on the cores the engine's threads need.
    with StopRequest() as stop, one_blas_thread(), twin_process(model, loss_fn) as twin:
        while at["epoch"] < epochs:
            epoch, start = at["epoch"], time.time()
            batches = iterate_batches(x_train, y_train, batch_size, mean, std, seed=seed, epoch=epoch,
                                      start=at["batch"], **(augment or {}))
            progress = Progress(epoch + 1, epochs, len(x_train), at["seen"])
            ended = train_epoch(model, loss_fn, optimizer, schedule, batches, at, steps_per_epoch, progress, stop,
                                twin)
            at["seconds"] += time.time() - start
            if not ended:
                save()
                raise KeyboardInterrupt
            val_loss, val_acc = evaluate(model, x_val, y_val, mean, std)[:2] if len(x_val) else (math.nan, math.nan)
            history.append(dict(epoch=epoch + 1, train_loss=at["loss_sum"] / at["seen"],
                                train_acc=at["correct"] / at["seen"], val_loss=val_loss, val_acc=val_acc,
                                seconds=at["seconds"], lr=optimizer.lr))
            val_text = f"val loss {val_loss:.4f} acc {val_acc:.4f}  " if len(x_val) else ""
            log(f"epoch {epoch + 1:3d}/{epochs}  train loss {history[-1]['train_loss']:.4f} "
                f"acc {history[-1]['train_acc']:.4f}  {val_text}{at['seconds']:.1f}s")
            at = new_position(epoch + 1)
            save()
            if stop.requested:
                raise KeyboardInterrupt
    return history


# --- metrics -------------------------------------------------------------------------------

def confusion_matrix(labels, predictions, num_classes):
    """cm[i, j] = how many images of class i were predicted as class j."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def f1_scores(cm):
    """Per-class F1 = 2 TP / (2 TP + FP + FN); a class never predicted and never
    present has no defined F1 and counts as 0, like a class with no hit."""
    tp = np.diag(cm).astype(np.float64)
    denominator = cm.sum(axis=0) + cm.sum(axis=1)  # = 2 TP + FP + FN
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def macro_f1(cm):
    return float(f1_scores(cm).mean())


# --- drawing (Pillow, imported here only) -------------------------------------------------

def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _save_png(image, path):
    with atomic_write(path) as f:
        image.save(f, format="PNG")


def _nice_ticks(low, high, count=6):
    """Round tick values covering [low, high]."""
    span = max(high - low, 1e-12)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def draw_learning_curve(history, test_loss, title, path, size=(900, 560)):
    """Training error per epoch (green), validation error (blue) and the final test
    error (red horizontal line), cross-entropy on the y axis."""
    from PIL import Image, ImageDraw
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small, big = _font(15), _font(13), _font(18)
    left, right, top, bottom = 80, width - 30, 60, height - 60
    # (name, colour, [(epoch, error)]) without the NaNs of epochs lacking a value;
    # a series with no value at all (--val 0) is neither drawn nor listed.
    series = [(name, color, [(h["epoch"], h[key]) for h in history if math.isfinite(h[key])])
              for name, color, key in (("training error", (30, 150, 50), "train_loss"),
                                       ("validation error", (40, 90, 200), "val_loss"))]
    series = [entry for entry in series if entry[2]]
    values = [v for _, _, pairs in series for _, v in pairs] + [test_loss]
    yticks = _nice_ticks(0.0, max(values) * 1.05)
    ymax = yticks[-1]
    x_last = max(history[-1]["epoch"], 2)
    xticks = [t for t in _nice_ticks(1, x_last, 8) if t >= 1 and float(t).is_integer()] or [1]

    def px(epoch, value):
        return (left + (right - left) * (epoch - 1) / (x_last - 1),
                bottom - (bottom - top) * value / ymax)

    for t in yticks:  # grid and y ticks
        y = px(1, t)[1]
        draw.line([(left, y), (right, y)], fill=(228, 228, 228))
        draw.text((left - 8, y), f"{t:g}", fill="black", font=small, anchor="rm")
    for t in xticks:
        x = px(t, 0)[0]
        draw.line([(x, bottom), (x, bottom + 5)], fill="black")
        draw.text((x, bottom + 8), f"{int(t)}", fill="black", font=small, anchor="ma")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    draw.text(((left + right) / 2, height - 22), "epoch", fill="black", font=font, anchor="mm")
    label = Image.new("RGBA", (300, 24), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((150, 12), "cross-entropy error", fill="black", font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    image.paste(label, (8, (top + bottom) // 2 - 150), label)
    draw.text((width / 2, 28), title, fill="black", font=big, anchor="mm")

    y_test = px(1, test_loss)[1]
    draw.line([(left, y_test), (right, y_test)], fill=(210, 40, 40), width=2)
    for name, color, pairs in series:
        points = [px(e, v) for e, v in pairs]
        if len(points) > 1:
            draw.line(points, fill=color, width=3, joint="curve")
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    legend = series + [(f"test error (final) {test_loss:.3f}", (210, 40, 40), None)]
    lx, ly = right - 250, top + 10
    draw.rectangle([lx - 10, ly - 8, right - 8, ly + 22 * len(legend)], fill="white", outline=(180, 180, 180))
    for i, (name, color, _) in enumerate(legend):
        y = ly + 22 * i + 7
        draw.line([(lx, y), (lx + 30, y)], fill=color, width=3)
        draw.text((lx + 40, y), name, fill="black", font=small, anchor="lm")
    _save_png(image, path)


def draw_confusion_matrix(cm, classes, title, path, cell=54):
    """Rows: true class, columns: predicted class; darker blue = more images."""
    from PIL import Image, ImageDraw
    k = len(classes)
    font, small = _font(15), _font(12)
    margin_left, margin_top = 130, 140
    size = (margin_left + k * cell + 20, margin_top + k * cell + 50)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((size[0] / 2, 20), title, fill="black", font=font, anchor="mm")
    draw.text((margin_left + k * cell / 2, 45), "predicted class", fill="black", font=font, anchor="mm")
    row_max = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        y = margin_top + i * cell
        draw.text((margin_left - 8, y + cell / 2), classes[i], fill="black", font=small, anchor="rm")
        for j in range(k):
            x = margin_left + j * cell
            share = cm[i, j] / row_max[i, 0]
            shade = tuple(int(255 - share * (255 - c)) for c in (20, 70, 160))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade, outline=(220, 220, 220))
            draw.text((x + cell / 2, y + cell / 2), str(cm[i, j]), font=small, anchor="mm",
                      fill="white" if share > 0.5 else "black")
    for j in range(k):  # column names, rotated
        label = Image.new("RGBA", (margin_top - 60, cell), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((margin_top - 62, cell / 2), classes[j], fill="black", font=small, anchor="rm")
        label = label.rotate(90, expand=True)
        image.paste(label, (margin_left + j * cell, 58), label)
    draw.text((20, margin_top + k * cell + 25), "rows: true class", fill="black", font=small, anchor="lm")
    _save_png(image, path)


def draw_mistakes(images, labels, predictions, classes, title, path, count=40, columns=8, scale=3):
    """A grid of misclassified images, each captioned true -> predicted."""
    from PIL import Image, ImageDraw
    wrong = np.flatnonzero(np.asarray(predictions) != np.asarray(labels))[:count]
    c, h, w = images.shape[1:]
    tile_w, tile_h = max(w * scale, 110) + 10, h * scale + 38
    rows = max(1, math.ceil(len(wrong) / columns))
    image = Image.new("RGB", (columns * tile_w + 10, rows * tile_h + 50), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(11)
    draw.text((image.width / 2, 22), title if len(wrong) else title + ": no mistakes", fill="black",
              font=font, anchor="mm")
    for n, i in enumerate(wrong):
        r, col = divmod(n, columns)
        x, y = 10 + col * tile_w, 45 + r * tile_h
        pixels = np.asarray(images[i]).transpose(1, 2, 0)
        picture = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
        picture = picture.resize((w * scale, h * scale), Image.NEAREST)
        image.paste(picture, (x + (tile_w - 10 - w * scale) // 2, y))
        draw.text((x + (tile_w - 10) / 2, y + h * scale + 4), f"true {classes[labels[i]]}",
                  fill=(30, 120, 40), font=small, anchor="ma")
        draw.text((x + (tile_w - 10) / 2, y + h * scale + 18), f"pred {classes[predictions[i]]}",
                  fill=(200, 30, 30), font=small, anchor="ma")
    _save_png(image, path)



# --- your own pictures, prepared like the dataset's images -------------------------------

MAX_IMAGE_PIXELS = 1 << 25  # larger pictures are refused before they are decoded


def open_picture(path):
    """Any picture Pillow opens, as an RGB image: turned upright as the camera's
    EXIF tag says, transparency over white.  A DataError names the file and what is
    wrong (missing, not an image, too large to decode)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                if picture.width * picture.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{path}: {picture.width} x {picture.height} pixels, too large to "
                                    f"decode (at most {MAX_IMAGE_PIXELS:,} pixels)")
                picture = ImageOps.exif_transpose(picture)
                if "A" in picture.getbands() or "transparency" in picture.info:
                    rgba = picture.convert("RGBA")
                    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
                return picture.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: too large to decode ({e})") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read this image ({e})") from None


def _border(pixels):
    """The pixels along the four edges of a (H, W, ...) array."""
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def _resized(pixels, size):
    """uint8 (H, W) or (H, W, 3) resized to size (width, height), antialiased."""
    from PIL import Image
    return np.asarray(Image.fromarray(np.asarray(pixels, np.uint8)).resize(size, Image.LANCZOS))


def prepare_like_mnist(picture):
    """A picture of one digit -> uint8 (28, 28) made the way MNIST's were (LeCun et al.,
    "The MNIST database"): light ink on black, the ink's bounding box scaled so that its
    longer side is 20 pixels (aspect ratio kept, antialiased), placed in a 28 x 28 field
    with its centre of mass at the centre.  The page is the plane that best fits the
    border (a photo's uneven light too), the ink what differs from it by more than the
    photo's noise, dark on light or light on dark; the bounding box is found on a
    slightly blurred copy, so that specks of noise do not widen it.  A 28 x 28
    picture that is already light on black comes back unchanged."""
    from PIL import Image, ImageFilter
    gray = np.asarray(picture.convert("L"), np.float64)
    if gray.shape == (28, 28) and np.median(_border(gray)) < 128:
        return gray.astype(np.uint8)
    ink = np.abs(gray - _page(gray))
    noise = 1.4826 * np.median(_border(ink))                        # robust standard deviation
    ink = np.clip(ink - 3 * noise, 0, None)                         # within 3 sigma: the page
    if ink.max() <= 0:
        return np.zeros((28, 28), np.uint8)
    radius = max(1.0, min(gray.shape) / 100)
    blurred = np.asarray(Image.fromarray((255 * ink / ink.max()).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius)), np.float64)
    rows, cols = np.nonzero(blurred > 0.2 * blurred.max())
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # the bounding box
    ink = np.clip(255 * ink / np.percentile(ink[ink > 0], 99), 0, 255)
    h, w = ink.shape
    scale = 20 / max(h, w)
    box = _resized(ink, (max(1, round(w * scale)), max(1, round(h * scale)))).astype(np.float64)
    ys, xs = np.indices(box.shape)
    centre = (ys * box).sum() / box.sum(), (xs * box).sum() / box.sum()
    top = int(np.clip(round(13.5 - centre[0]), 0, 28 - box.shape[0]))
    left = int(np.clip(round(13.5 - centre[1]), 0, 28 - box.shape[1]))
    field = np.zeros((28, 28))
    field[top:top + box.shape[0], left:left + box.shape[1]] = box
    return np.clip(field, 0, 255).astype(np.uint8)


def _page(gray):
    """The plane a + b*x + c*y that fits the border pixels of gray (H, W) best, fitted
    twice, the second time without the border pixels it missed by more than 3 sigma."""
    h, w = gray.shape
    ys, xs = np.indices(gray.shape)
    on_border = np.zeros(gray.shape, bool)
    on_border[[0, -1]], on_border[:, [0, -1]] = True, True
    terms = np.stack([np.ones(on_border.sum()), xs[on_border] / w, ys[on_border] / h], axis=1)
    values, keep = gray[on_border], np.ones(on_border.sum(), bool)
    for _ in range(2):
        coef = np.linalg.lstsq(terms[keep], values[keep], rcond=None)[0]
        missed = np.abs(terms @ coef - values)
        keep = missed <= max(3 * 1.4826 * np.median(missed), 1.0)
    return coef[0] + coef[1] * xs / w + coef[2] * ys / h


def prepare_like_fashion(picture):
    """A product photo -> uint8 (28, 28) made the way Fashion-MNIST's were (its README):
    edges within 5 % of the corner colour trimmed, the longer side scaled to 28 pixels
    (aspect ratio kept, antialiased), the shorter side centred on a 28 x 28 canvas of
    the corner colour, negated where the background is light, greyscale.  A 28 x 28
    picture that is already light on black comes back unchanged."""
    rgb = np.asarray(picture.convert("RGB"), np.float64)
    gray = np.asarray(picture.convert("L"))
    if gray.shape == (28, 28) and np.median(_border(gray)) < 128:
        return gray
    corners = np.median(np.stack([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]]), axis=0)
    differs = np.sqrt(((rgb - corners) ** 2).sum(axis=2)) > 0.05 * np.sqrt(3) * 255
    if np.any(differs):
        rows, cols = np.nonzero(differs)
        rgb = rgb[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = rgb.shape[:2]
    scale = 28 / max(h, w)
    item = _resized(rgb, (max(1, round(w * scale)), max(1, round(h * scale))))
    canvas = np.empty((28, 28, 3), np.uint8)
    canvas[:] = corners.astype(np.uint8)
    top, left = (28 - item.shape[0]) // 2, (28 - item.shape[1]) // 2
    canvas[top:top + item.shape[0], left:left + item.shape[1]] = item
    gray = np.asarray(_to_image(canvas).convert("L"))
    return 255 - gray if corners.mean() > 127 else gray


def prepare_like_cifar(picture):
    """A photo -> uint8 (32, 32, 3) like CIFAR-10's: the centre square (no squashing),
    downscaled to 32 x 32, antialiased, in colour.  A 32 x 32 picture comes back
    unchanged."""
    rgb = np.asarray(picture.convert("RGB"))
    h, w = rgb.shape[:2]
    side = min(h, w)
    square = rgb[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    return square if side == 32 else _resized(square, (32, 32))


PREPARE = {"mnist": prepare_like_mnist, "fashion-mnist": prepare_like_fashion, "cifar10": prepare_like_cifar}


def _to_image(pixels):
    from PIL import Image
    return Image.fromarray(np.asarray(pixels, np.uint8))


def image_to_input(path, dataset):
    """(the picture as given, uint8 (1, C, H, W) prepared like the dataset's images)."""
    picture = open_picture(path)
    pixels = PREPARE[dataset](picture)
    return picture, (pixels[None, None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)[None])


# --- what the network learned: saliency, feature maps, filters -----------------------------

def saliency(model, x, label):
    """|dL/dx| for one normalized image x (C, H, W), L the cross-entropy of the model's
    output against `label`, as (H, W): the largest over the channels (Simonyan et al.,
    2014).  Where it is bright, a small change of the pixel changes the loss most: the
    pixels the decision rests on.  It is the input gradient of the library's own
    backward pass (check_gradients verifies it), taken on a copy that computes as in
    evaluation (BatchNorm with its running statistics) and shares the model's
    parameters: the model itself does not change."""
    net = model.evaluation_copy()
    for layer in net.layers:
        layer.training = True
        if isinstance(layer, BatchNorm2D):
            layer.use_running_stats = True
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(net.forward(np.asarray(x)[None]), np.array([label]))
    return np.abs(net.backward(loss_fn.backward())[0]).max(axis=0)


def feature_maps(model, x):
    """[(name, maps (C, H, W))] for one normalized image x (C, H, W), in evaluation
    mode: the output of each convolution block, a convolution and the layers after it
    up to the next convolution or the end of the convolutional part."""
    blocks, block, x = [], None, np.asarray(x)[None]
    for layer in model.evaluation_copy().layers:
        if isinstance(layer, Conv2D) and block is not None:
            blocks.append((block, x[0]))
        y = layer.forward(x)
        block = f"{layer!r}" if isinstance(layer, Conv2D) else block
        if y.ndim != 4:
            break
        x = y
    if block is not None:
        blocks.append((block, x[0]))
    return [(f"after block {i + 1}, {name}", maps) for i, (name, maps) in enumerate(blocks)]


HOT = np.array([[0, 0, 0], [120, 0, 40], [230, 40, 0], [255, 200, 0], [255, 255, 255]], np.float64)


def heat(values):
    """Values in [0, 1] -> uint8 RGB, black through red and yellow to white."""
    at = np.clip(values, 0, 1) * (len(HOT) - 1)
    low = np.minimum(at.astype(int), len(HOT) - 2)
    frac = (at - low)[..., None]
    return ((1 - frac) * HOT[low] + frac * HOT[low + 1]).astype(np.uint8)


def _as_picture(image, size):
    """uint8 (C, H, W) with C 1 or 3 -> an RGB Pillow image of about size pixels on its
    longer side, enlarged with sharp pixels."""
    from PIL import Image
    pixels = np.asarray(image).transpose(1, 2, 0)
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).convert("RGB")
    scale = max(1, size // max(picture.size))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _grid(maps, tile, columns, signed=False):
    """maps (K, H, W) -> a grid image of K tiles, each scaled to its own range: black
    its lowest value, white its highest; signed: grey 0, white its largest |value|,
    black its negative."""
    from PIL import Image
    rows = math.ceil(len(maps) / columns)
    grid = Image.new("RGB", (columns * (tile + 4) + 4, rows * (tile + 4) + 4), (235, 235, 235))
    for k, m in enumerate(maps):
        low, high = (-np.abs(m).max(), np.abs(m).max()) if signed else (float(m.min()), float(m.max()))
        pixels = ((m - low) / (high - low) * 255 if high > low else np.full(m.shape, 128 if signed else 0)
                  ).astype(np.uint8)
        cell = Image.fromarray(pixels).resize((tile, tile), Image.NEAREST)
        grid.paste(cell, (4 + (k % columns) * (tile + 4), 4 + (k // columns) * (tile + 4)))
    return grid


def _heat_legend(draw, x, y, width, font, text="|dL/dx|: low to high"):
    for i in range(width):
        draw.line([(x + i, y), (x + i, y + 10)], fill=tuple(int(v) for v in heat(np.array([i / (width - 1)]))[0]))
    draw.rectangle([x, y, x + width - 1, y + 10], outline=(120, 120, 120))
    draw.text((x, y + 14), text, fill="black", font=font)


def _overlay(image, sal, size):
    """The saliency map sal (H, W) over the greyscale of image (C, H, W), enlarged."""
    gray = np.asarray(image, np.float64).mean(axis=0) / 255
    hot = heat(sal / sal.max() if sal.max() > 0 else sal).astype(np.float64)
    mixed = (0.35 * gray[..., None] * 255 + 0.65 * hot).astype(np.uint8)
    return _as_picture(mixed.transpose(2, 0, 1), size)


def _map_tile(width, channels):
    """The side of one feature-map tile when a row of `channels` tiles fills width."""
    return max(24, min(56, (width - 20) // channels - 4))


def _map_rows(canvas, draw, maps, top, width, font, most=16):
    """Each block's feature maps (at most `most` channels) as a labelled row of tiles."""
    for name, block in maps:
        shown = block[:most]
        draw.text((10, top), f"feature maps {name}: {len(shown)} of {len(block)} channels "
                             f"(each tile scaled to its own range)", fill="black", font=font)
        grid = _grid(shown, tile=_map_tile(width, len(shown)), columns=len(shown))
        canvas.paste(grid, (10, top + 18))
        top += 18 + grid.height + 10
    return top


def _maps_height(maps, width, most=16):
    """The height _map_rows takes: per block a label, a one-row grid and a gap."""
    return sum(18 + _map_tile(width, len(block[:most])) + 8 + 10 for _, block in maps)


def draw_prediction(picture, image, probs, classes, sal, maps, title, path, width=900):
    """One picture that shows a prediction: the picture as given, the input as the
    network sees it, the top five probabilities, the saliency map over the input, and
    the feature maps of each convolution block."""
    from PIL import Image, ImageDraw
    font, small = _font(15), _font(12)
    panel = 200
    height = 60 + panel + 70 + _maps_height(maps, width)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width / 2, 20), title, fill="black", font=font, anchor="mm")
    given = picture.copy()
    given.thumbnail((panel, panel))
    x0 = [10, 10 + panel + 20, 10 + 2 * (panel + 20) + 180]
    for x, label, shown in ((x0[0], "the picture as given", given),
                            (x0[1], "what the network sees", _as_picture(image, panel)),
                            (x0[2], "saliency: where it looked", _overlay(image, sal, panel))):
        draw.text((x, 44), label, fill="black", font=small)
        canvas.paste(shown, (x, 60))
    bars_x = 10 + 2 * (panel + 20)
    draw.text((bars_x, 44), "top 5", fill="black", font=small)
    for rank, k in enumerate(np.argsort(-probs)[:5]):
        y = 64 + rank * 26
        draw.text((bars_x, y + 9), str(classes[k])[:11], fill="black", font=small, anchor="lm")
        draw.rectangle([bars_x + 74, y + 2, bars_x + 74 + int(64 * probs[k]), y + 16],
                       fill=(40, 90, 200) if rank == 0 else (150, 170, 210))
        draw.text((bars_x + 142, y + 9), f"{probs[k]:.2f}", fill="black", font=small, anchor="lm")
    _heat_legend(draw, x0[2], 60 + panel + 8, 150, small)
    _map_rows(canvas, draw, maps, 60 + panel + 50, width, small)
    _save_png(canvas, path)


def draw_feature_maps(image, label, prediction, classes, sal, maps, title, path, width=900):
    """One test image through every convolution block of the network, with its
    saliency map."""
    from PIL import Image, ImageDraw
    font, small = _font(15), _font(12)
    panel = 160
    canvas = Image.new("RGB", (width, 60 + panel + 60 + _maps_height(maps, width)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((width / 2, 20), title, fill="black", font=font, anchor="mm")
    draw.text((10, 44), f"test image: {classes[label]}, predicted {classes[prediction]}", fill="black", font=small)
    canvas.paste(_as_picture(image, panel), (10, 60))
    draw.text((10 + panel + 30, 44), "saliency: where it looked", fill="black", font=small)
    canvas.paste(_overlay(image, sal, panel), (10 + panel + 30, 60))
    _heat_legend(draw, 10 + panel + 30, 60 + panel + 8, 150, small)
    _map_rows(canvas, draw, maps, 60 + panel + 50, width, small)
    _save_png(canvas, path)


def draw_filters(model, title, path, tile=40):
    """The first convolution's filters as an enlarged grid (colour for RGB filters);
    where that layer is not trained (network 4's whitening), also the first trained
    convolution's filters seen through it: composed with it into pixel-space filters,
    the activation between them left out."""
    from PIL import Image, ImageDraw
    convs = [layer for layer in model.layers if isinstance(layer, Conv2D)]
    panels = [(f"the first convolution's {convs[0].out_channels} filters, {convs[0].kh} x {convs[0].kw}",
               convs[0].params["W"])]
    if not convs[0].trainable and len(convs) > 1:
        first, second = convs[0].params["W"], convs[1].params["W"]       # (F1, C, k1, k1), (F2, F1, k2, k2)
        k = first.shape[2] + second.shape[2] - 1
        composed = np.zeros((second.shape[0], first.shape[1], k, k))
        for u, v in np.ndindex(second.shape[2:]):
            composed[:, :, u:u + first.shape[2], v:v + first.shape[3]] += np.einsum(
                "fc,cdij->fdij", second[:, :, u, v], first)
        panels.append((f"the first trained convolution's {len(composed)} filters seen through it, {k} x {k} "
                       f"(the activation between them left out)", composed))
    font, small = _font(15), _font(12)
    columns = 16
    images = []
    for label, weights in panels:
        if weights.shape[1] == 3:                                   # RGB: one colour tile per filter
            scaled = weights / (2 * np.abs(weights).max(axis=(1, 2, 3), keepdims=True)) + 0.5
            tiles = [Image.fromarray((f.transpose(1, 2, 0) * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
                     for f in scaled]
            grid = Image.new("RGB", (columns * (tile + 4) + 4, math.ceil(len(tiles) / columns) * (tile + 4) + 4),
                             (235, 235, 235))
            for i, t in enumerate(tiles):
                grid.paste(t, (4 + (i % columns) * (tile + 4), 4 + (i // columns) * (tile + 4)))
        else:
            grid = _grid(weights.sum(axis=1), tile, columns, signed=True)
        images.append((label, grid))
    width = max(g.width for _, g in images) + 20
    canvas = Image.new("RGB", (max(width, 700), 50 + sum(30 + g.height for _, g in images) + 45), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width / 2, 20), title, fill="black", font=font, anchor="mm")
    top = 45
    for label, grid in images:
        draw.text((10, top), label, fill="black", font=small)
        canvas.paste(grid, (10, top + 18))
        top += 30 + grid.height
    draw.text((10, top), "grey: weight 0, lighter: positive, darker: negative; each filter scaled to its",
              fill="black", font=small)
    draw.text((10, top + 16), "largest weight (colour filters: the weight of each colour channel)",
              fill="black", font=small)
    _save_png(canvas, path)


# --- command line: the steps of the training scripts ---------------------------------------
# Each train_*.py script defines its networks and recipes and calls these steps in order:
# parse_options, load_data, build_model, train, test, write_outputs (or predict_files,
# or bench_network).  They end the program with one line and exit code 2 on bad input.

def fail(message, code=2):
    """One line on stderr, no traceback, a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _positive(kind, zero=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'zero or more' if zero else 'positive'}, got {text}")
        return value
    return parse


# What a recipe may say, and the values a key takes where it has a fixed set.
RECIPE_KEYS = {
    "epochs": None, "batch_size": None, "lr": None, "weight_decay": None, "val": None,
    "optimizer": ("sgd", "adam"), "momentum": None, "nesterov": (True, False),
    "schedule": ("constant", "cosine", "warmup_linear"), "warmup": None, "initial_fraction": None,
    "final_fraction": None, "label_smoothing": None, "lookahead": (True, False),
    "crop": None, "pad_mode": ("reflect", "constant"), "flip": (None, "random", "alternate"), "tta": (0, 1, 2),
}


def check_recipe(recipe):
    """A ValueError naming the first unknown key or value, so that a typo such as
    "nestrov" is not silently ignored."""
    for key, value in recipe.items():
        if key not in RECIPE_KEYS:
            raise ValueError(f"recipe: unknown key {key!r}; the known keys are {', '.join(RECIPE_KEYS)}")
        if RECIPE_KEYS[key] is not None and value not in RECIPE_KEYS[key]:
            raise ValueError(f"recipe: {key} must be one of {RECIPE_KEYS[key]}, got {value!r}")


def parse_options(description, recipes, argv=None, out="runs/net{net}"):
    """The options every training script shares.  recipes maps a network number to
    its recipe (defaults and training settings); with several, --net picks one, and
    the other defaults follow it.  out: the default output folder, {net} standing
    for the network.  Returns (args, recipe)."""
    for recipe in recipes.values():
        check_recipe(recipe)
    nets = list(recipes)
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line "error: ...", exit code 2
    if nets != [None]:  # {None: recipe}: a script with a single network and no --net
        parser.add_argument("--net", type=int, choices=nets, default=nets[0])
    first = argparse.ArgumentParser(add_help=False)  # --net alone, for the other defaults
    first.error = fail
    first.add_argument("--net", type=int, choices=nets, default=nets[0])
    net = first.parse_known_args(argv)[0].net
    recipe = recipes[net]
    parser.add_argument("--epochs", type=_positive(int), default=recipe["epochs"])
    parser.add_argument("--batch-size", type=_positive(int), default=recipe["batch_size"])
    parser.add_argument("--lr", type=_positive(float), default=recipe["lr"], help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=recipe.get("weight_decay", 0.0))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val", type=_positive(int, zero=True), default=recipe.get("val", 5000),
                        help="training images held out for validation (at most a tenth; "
                             "0: train on all)")
    parser.add_argument("--data-dir", help="folder (or archive) holding the dataset; default: "
                        "./data/<dataset>, a system folder, else download")
    parser.add_argument("--out", default=out.format(net=net), help="output folder (default: %(default)s)")
    parser.add_argument("--limit", type=_positive(int), help="use only the first N training images")
    parser.add_argument("--impl", choices=Sequential.impls[::-1], default="fast",
                        help="the engine, the textbook's im2col, or the textbook's loops")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/model.npz where it stopped")
    parser.add_argument("--predict", nargs="+", metavar="FILE",
                        help="classify pictures with the trained OUT/model.npz, prepared like the "
                             "dataset's images; draws OUT/predictions/<name>.png")
    parser.add_argument("--bench", action="store_true",
                        help="time this network's training and inference steps on random images")
    return parser.parse_args(argv), recipe


CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}


def load_split(dataset, folder, split):
    """(images, labels, class names) of one split of "mnist", "fashion-mnist" or "cifar10"."""
    if dataset == "cifar10":
        return load_cifar10(folder, split)
    images, labels = load_mnist(folder, split)
    return images, labels, CLASS_NAMES[dataset]


class Data:
    """What a training run reads: the training, validation and test sets as
    (uint8 images, labels), the training set's per-channel mean and std, the class
    names and the folder they came from."""

    def __init__(self, dataset, train, val, test, classes, folder):
        self.dataset, self.train, self.val, self.test = dataset, train, val, test
        self.classes, self.folder = classes, folder
        self.mean, self.std = channel_stats(train[0])

    def normalized(self, images):
        return normalize(np.asarray(images), self.mean, self.std)


def load_data(dataset, args):
    """The dataset for a run: --out checked first (so a bad one fails before any
    loading), the data found (locate_dataset), --limit applied, the last --val
    training images (at most a tenth) held out for validation."""
    try:
        check_output_folder(args.out)
        folder = locate_dataset(dataset, args.data_dir)
        train_images, train_labels, classes = load_split(dataset, folder, "train")
        test_images, test_labels, _ = load_split(dataset, folder, "test")
    except DataError as e:
        fail(str(e))
    if args.limit:
        train_images, train_labels = train_images[:args.limit], train_labels[:args.limit]
    val_size = min(args.val, len(train_images) // 10)
    train_size = len(train_images) - val_size
    return Data(dataset, (train_images[:train_size], train_labels[:train_size]),
                (train_images[train_size:], train_labels[train_size:]),
                (test_images, test_labels), classes, folder)


def build_model(network, data, args):
    """network(rng) with the run's seed, in the form --impl names, checked against
    the data's image size."""
    model = network(np.random.default_rng(args.seed)).to(args.impl)
    shape = data.test[0].shape[1:]
    try:
        model.evaluation_copy().forward(np.zeros((1,) + shape, np.float32))
    except ValueError as e:
        fail(f"{data.folder}: images of shape {shape} do not fit this network ({e})")
    return model


def make_optimizer(model, recipe, args, total_steps):
    """The recipe's optimizer (SGD or Adam, inside Lookahead if it says so) and its
    learning-rate schedule over total_steps."""
    if recipe.get("optimizer", "sgd") == "adam":
        optimizer = Adam(model.parameters(), args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = SGD(model.parameters(), args.lr, momentum=recipe.get("momentum", 0.9),
                        nesterov=recipe.get("nesterov", False), weight_decay=args.weight_decay)
    if recipe.get("lookahead"):
        optimizer = Lookahead(optimizer, model, total_steps)
    kind, lr, final = recipe.get("schedule", "constant"), args.lr, recipe.get("final_fraction", 0.0)
    if kind == "cosine":
        schedule = cosine_lr(lr, total_steps, lr * final)
    elif kind == "warmup_linear":
        schedule = warmup_linear_lr(lr, total_steps, recipe.get("warmup", 0.2), final,
                                    recipe.get("initial_fraction", 0.0))
    else:
        schedule = constant_lr(lr)
    return optimizer, schedule


# Options that decide the batches and the data: a run resumes only with the same ones.
RESUME_OPTIONS = ("net", "batch_size", "seed", "val", "limit", "lr", "weight_decay", "impl")


def resume_from(checkpoint, model, optimizer, options):
    """(position, history) where the run saved in checkpoint stopped, its weights and
    optimizer state loaded; exits with one line if it cannot be resumed."""
    try:
        stored = load_checkpoint(checkpoint, model, optimizer)
    except DataError as e:
        fail(str(e))
    before = stored.get("options", {})
    changed = [f"--{k.replace('_', '-')} {before[k]}" for k in RESUME_OPTIONS
               if k in before and before[k] != options.get(k)]
    if changed:
        fail(f"{checkpoint}: trained with {', '.join(changed)}; resume with the same options")
    position, history = stored.get("position"), stored.get("history", [])
    if not isinstance(position, dict) or not isinstance(history, list):
        fail(f"{checkpoint}: damaged checkpoint (no training position)")
    where = f", step {position['batch']} of epoch {position['epoch'] + 1}" if position["batch"] else ""
    print(f"resuming from {checkpoint} after epoch {position['epoch']}{where}", file=sys.stderr)
    return position, history


def run_options(args):
    """The options a run was started with, as saved with it."""
    return {k: v for k, v in vars(args).items() if k not in ("predict", "bench")}


def train(model, data, recipe, args, title):
    """Train model on data as the recipe and options say, from the start or, with
    --resume, from OUT/model.npz: fit with a checkpoint after every epoch.  Returns
    the history.  Ctrl-C saves and exits with 130, divergence with 1."""
    steps = args.epochs * math.ceil(len(data.train[0]) / args.batch_size)
    optimizer, schedule = make_optimizer(model, recipe, args, steps)
    loss_fn = SoftmaxCrossEntropy(recipe.get("label_smoothing", 0.0))
    checkpoint = os.path.join(args.out, "model.npz")
    meta = dict(options=run_options(args), mean=data.mean.tolist(), std=data.std.tolist(),
                classes=data.classes, input_shape=list(data.test[0].shape[1:]), dataset=data.dataset)
    position, history = resume_from(checkpoint, model, optimizer, meta["options"]) if args.resume else (None, [])
    print(f"{title}: {len(data.train[0])} training, {len(data.val[0])} validation, {len(data.test[0])} "
          f"test images from {data.folder}", file=sys.stderr)
    augment = {k: recipe[k] for k in ("crop", "flip", "pad_mode") if k in recipe}
    os.makedirs(args.out, exist_ok=True)
    try:
        return fit(model, loss_fn, optimizer, schedule, data.train, data.val, data.mean, data.std,
                   epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, augment=augment,
                   checkpoint=checkpoint, meta=meta, position=position, history=history)
    except TrainingDiverged as e:
        fail(f"{e}; try a smaller learning rate (--lr {args.lr / 3:.3g}); "
             f"the last good checkpoint is {checkpoint}", code=1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: saved {checkpoint}; run the same command with --resume to continue",
              file=sys.stderr)
        sys.exit(130)


def test(model, data, tta=0):
    """The trained model on the test set: loss, accuracy, macro F1, per-class F1, the
    confusion matrix and the predicted classes; with test-time augmentation (tta, see
    predict_logits) also the figures without it."""
    images, labels = data.test[0], np.asarray(data.test[1]).astype(np.int64)
    plain_logits = predict_logits(model, images, data.mean, data.std)
    test_loss, test_acc, predictions = score(plain_logits, labels)
    results = dict(test_loss=test_loss, test_accuracy=test_acc)
    if tta:
        logits = predict_logits(model, images, data.mean, data.std, tta=tta, plain=plain_logits)
        without_tta, (test_loss, test_acc, predictions) = results, score(logits, labels)
        results = dict(test_loss=test_loss, test_accuracy=test_acc, without_tta=without_tta)
    cm = confusion_matrix(labels, predictions, len(data.classes))
    results.update(macro_f1=macro_f1(cm), f1_per_class=f1_scores(cm).tolist(), confusion_matrix=cm.tolist())
    return results, predictions


def write_outputs(args, recipe, title, data, model, history, results, predictions, started):
    """OUT/learning_curve.png, confusion_matrix.png, mistakes.png, filters.png,
    feature_maps.png (the first test image through every block) and metrics.json
    (options, recipe, history and results), and the summary line.  started: the
    run's start (time.time()), for its wall time."""
    out, labels = args.out, np.asarray(data.test[1]).astype(np.int64)
    results = dict(results, epochs=len(history), train_seconds=sum(h["seconds"] for h in history),
                   wall_seconds=time.time() - started, peak_memory_mb=peak_memory_mb())
    accuracy = results["test_accuracy"]
    draw_learning_curve(history, results["test_loss"], f"{title}: test accuracy {100 * accuracy:.2f} %",
                        os.path.join(out, "learning_curve.png"))
    draw_confusion_matrix(np.array(results["confusion_matrix"]), data.classes,
                          f"{title}: confusion matrix (test set)", os.path.join(out, "confusion_matrix.png"))
    draw_mistakes(data.test[0], labels, predictions, data.classes, f"{title}: misclassified test images",
                  os.path.join(out, "mistakes.png"))
    draw_filters(model, f"{title}: the filters it learned", os.path.join(out, "filters.png"))
    x = data.normalized(data.test[0][:1])[0]
    draw_feature_maps(data.test[0][0], labels[0], predictions[0], data.classes, saliency(model, x, predictions[0]),
                      feature_maps(model, x), f"{title}: one test image through the network",
                      os.path.join(out, "feature_maps.png"))
    metrics = dict(network=title, options=run_options(args), recipe=recipe, history=history, **results)
    with atomic_write(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    without = results.get("without_tta")
    print(f"test loss {results['test_loss']:.4f}  accuracy {accuracy:.4f}  macro F1 {results['macro_f1']:.4f}"
          + (f"  (without TTA: accuracy {without['test_accuracy']:.4f})" if without else "")
          + f"  wall time {results['wall_seconds']:.0f}s  outputs in {out}")
    return metrics


def dataset_of(meta):
    """The dataset a checkpoint's model was trained on (older checkpoints do not say:
    from its input shape and class names)."""
    if meta.get("dataset") in PREPARE:
        return meta["dataset"]
    if list(meta["input_shape"]) == [3, 32, 32]:
        return "cifar10"
    return "fashion-mnist" if list(meta["classes"]) == CLASS_NAMES["fashion-mnist"] else "mnist"


def predict_files(files, out, network):
    """Print the top three classes of each picture with the model trained in out
    (network(rng) builds it), the picture prepared like the dataset's images (PREPARE),
    and draw OUT/predictions/<name>.png (draw_prediction).  The files that cannot be
    read get one error line each after the others' predictions, and exit code 2."""
    checkpoint = os.path.join(out, "model.npz")
    model = network(np.random.default_rng(0))
    try:
        meta = load_checkpoint(checkpoint, model)
        mean, std = np.array(meta["mean"], np.float32), np.array(meta["std"], np.float32)
        classes, dataset = list(meta["classes"]), dataset_of(meta)
    except DataError as e:
        fail(str(e))
    except (KeyError, TypeError, ValueError):
        fail(f"{checkpoint}: damaged checkpoint (its metadata lacks the normalization, classes or input shape)")
    folder, errors, names = os.path.join(out, "predictions"), [], set()
    os.makedirs(folder, exist_ok=True)
    for path in files:
        try:
            picture, pixels = image_to_input(path, dataset)
        except DataError as e:
            errors.append(str(e))
            continue
        x = normalize(pixels, mean, std)
        probs = np.exp(log_softmax(model.predict(x).astype(np.float64)))[0]
        print(f"{path}: " + ", ".join(f"{classes[k]} {probs[k]:.3f}" for k in np.argsort(-probs)[:3]))
        name = stem = os.path.splitext(os.path.basename(path))[0]
        while name in names:  # two files of the same name from different folders
            name = f"{stem}-{len(names)}"
        names.add(name)
        top = int(np.argmax(probs))
        draw_prediction(picture, pixels[0], probs, classes, saliency(model, x[0], top), feature_maps(model, x[0]),
                        f"{os.path.basename(path)}: {classes[top]} ({probs[top]:.0%})",
                        os.path.join(folder, f"{name}.png"))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if errors:
        sys.exit(2)


def check_output_folder(out):
    """Say now, before any data is loaded, if the output folder cannot be used (it is
    made only when training starts)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out}: is a file, not a folder")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: {existing} is not writable")


def peak_memory_mb():
    """Peak resident memory of this process (a TwinProcess has its own, mostly pages
    it shares with this one)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# --- bench ------------------------------------------------------------------------------------

def _best_time(fn, repeats=3, budget=2.0):
    """Smallest wall time of fn() over a few runs (fewer if one run is slow)."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget:
            break
    return best


def cpu_times():
    """(stolen, total) CPU time since boot, in ticks, from Linux's /proc/stat, or None
    elsewhere.  "Stolen" is time a virtual machine's cores waited for the host: when
    it is high, every timing here is slower than the machine can do."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return ticks[7], sum(ticks)


def cpu_steal_since(start):
    """The share of CPU time stolen by the host since cpu_times() returned start."""
    now = cpu_times()
    if start is None or now is None or now[1] == start[1]:
        return None
    return (now[0] - start[0]) / (now[1] - start[1])


def matmul_gflops(n=2048):
    """The machine's float32 matrix-multiply speed, OpenBLAS on all its threads."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return 2 * n ** 3 / _best_time(lambda: a @ a, 5) / 1e9


def _conv_flops(layer, y_shape, input_grad):
    """Multiply-adds x 2 of the forward pass, and of the backward (dW, plus dx)."""
    forward = 2 * np.prod(y_shape) * layer.in_channels * layer.kh * layer.kw
    return forward, forward * (2 if input_grad else 1)


def _forward_backward_times(forward, backward, repeats):
    """Best times of forward() and of backward(), the latter after a last forward()
    (backward needs that call's cache)."""
    t_fwd = _best_time(forward, repeats)
    forward()
    return t_fwd, _best_time(backward, repeats)


def bench_layers(name, model, x, repeats=5, loop_images=1):
    """Time every convolution and pooling layer of model on batch x, fast and loop,
    each convolution with the pooling it runs in the network (fused_pools), and
    all the convolutions together as training runs them (with their fused pools)."""
    model.train()
    pools = model.fused_pools()
    stop = model.first_trained()
    inputs = []
    for layer in model.layers:
        inputs.append(x)
        x = layer.forward(x)
    rows, conv_flops, conv_seconds = [], 0.0, 0.0
    for i, layer in enumerate(model.layers):
        xi = inputs[i]
        y = layer.forward(xi)
        g = nchw_view(np.ones(y.shape[:1] + y.shape[2:] + y.shape[1:2], y.dtype))
        input_grad = i != stop
        t_fwd, t_bwd = _forward_backward_times(lambda: layer.forward(xi),
                                               lambda: layer.backward(g, input_grad=input_grad), repeats)
        loop = copy.deepcopy(layer).to("loop")
        small = np.ascontiguousarray(xi[:loop_images])
        start = time.perf_counter()
        ys = loop.forward(small)
        loop.backward(np.ones_like(ys), input_grad=input_grad)
        t_loop = (time.perf_counter() - start) * len(xi) / loop_images
        row = f"  {name:<11}{layer!r:<44}{t_fwd * 1e3:8.1f}{t_bwd * 1e3:8.1f}"
        rate = None
        if isinstance(layer, Conv2D):
            f_fwd, f_bwd = _conv_flops(layer, y.shape, input_grad)
            rate = (f_fwd + f_bwd) / (t_fwd + t_bwd) / 1e9
            conv_flops += f_fwd + f_bwd
            conv_seconds += 0 if i in pools else t_fwd + t_bwd
        rows.append((row + (f"{rate:9.1f}" if rate else f"{'':9}"), rate, t_loop, t_fwd + t_bwd))
        if i - 1 in pools:
            conv, xc = model.layers[i - 1], inputs[i - 1]
            t_fwd, t_bwd = _forward_backward_times(lambda: conv.forward_pooled(xc, layer),
                                                   lambda: conv.backward(g, input_grad=i - 1 != stop), repeats)
            rows.append((f"  {name:<11}{'  the two above as one (as in training)':<44}"
                         f"{t_fwd * 1e3:8.1f}{t_bwd * 1e3:8.1f}", None, None, None))
            conv_seconds += t_fwd + t_bwd
    rate = conv_flops / conv_seconds / 1e9
    rows.append((f"  {name:<11}{'all its convolutions, as in training':<44}{'':16}{rate:9.1f}", rate, None, None))
    return rows


def bench_network(model, shape, batch_size, epoch_images, steps=20, repeats=3):
    """Print and return training images/s (batch in, SGD step out, as train_epoch
    runs it), inference images/s, and seconds per epoch of epoch_images at that
    training speed, on random images of shape (C, H, W).  The scripts' --bench."""
    keep_freed_memory()
    loss_fn = SoftmaxCrossEntropy()
    optimizer = SGD(model.parameters(), 0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size,) + shape).astype(np.uint8)
    labels = rng.integers(0, 10, batch_size)
    mean, std = np.full(shape[0], 120, np.float32), np.full(shape[0], 60, np.float32)

    def train_steps(twin):
        model.train()
        for _ in range(steps):
            train_step(model, loss_fn, normalize(images, mean, std), labels, twin)
            optimizer.step()
    with twin_process(model, loss_fn) as twin, one_blas_thread():  # as fit
        train_rate = steps * batch_size / _best_time(lambda: train_steps(twin), repeats)
    test_images = rng.integers(0, 256, (8 * batch_size,) + shape).astype(np.uint8)
    infer_rate = len(test_images) / _best_time(lambda: predict_logits(model, test_images, mean, std), repeats)
    print(f"batch {batch_size}: training {train_rate:,.0f} images/s ({epoch_images / train_rate:.1f} s per epoch "
          f"of {epoch_images:,} images), inference {infer_rate:,.0f} images/s")
    return train_rate, infer_rate, epoch_images / train_rate


# The convolutions and poolings of the documented networks, for the bench: name, batch,
# input (C, H, W), then per convolution (out channels, kernel, padding, pooling after it).
# Their activations and normalizations are left out: they do not change these layers'
# shapes or memory layouts.  The networks themselves are in the train_*.py scripts.
BENCH_SHAPES = [
    ("net2", 64, (1, 28, 28), [(16, 3, 0, 2), (16, 3, 0, 2)]),
    ("net3", 64, (3, 32, 32), [(8, 3, 0, 2), (16, 3, 0, 0), (32, 3, 0, 2)]),
    ("net4", 256, (3, 32, 32), [(24, 2, 0, 0), (64, 3, 1, 2), (64, 3, 1, 0), (128, 3, 1, 2), (128, 3, 1, 0),
                                (128, 3, 1, 2), (128, 3, 1, 0)]),
]


def bench_model(channels, convolutions, rng, net4=False):
    """A Sequential of the convolutions (and poolings) of a BENCH_SHAPES entry;
    network 4's have no bias and its first is not trained."""
    layers = []
    for out, kernel, padding, pool in convolutions:
        layers.append(Conv2D(channels, out, kernel, padding=padding, bias=not net4, rng=rng))
        layers += [MaxPool2D(pool)] if pool else []
        channels = out
    layers[0].trainable = not net4
    return Sequential(*layers)


def bench(argv):
    """Print the machine's matmul ceiling and the speed of the documented networks'
    convolutions and poolings, fast against the loops.  The ceiling is the faster of
    two measurements, before and after the layers: a VM's speed drifts, and a slow
    moment would make the layers look closer to it than they are.  --quick: tiny
    batches, to check that it runs."""
    quick = "--quick" in argv
    started, steal_start = time.time(), cpu_times()
    keep_freed_memory()
    rng = np.random.default_rng(0)
    size = 256 if quick else 2048
    before = matmul_gflops(size)
    rows = []
    for name, batch, shape, convolutions in BENCH_SHAPES:
        batch = 4 if quick else batch
        model = bench_model(shape[0], convolutions, rng, net4=name == "net4")
        x = rng.standard_normal((batch,) + shape).astype(np.float32)
        with one_blas_thread():  # as in training: the engine's threads, OpenBLAS on one
            rows += bench_layers(f"{name} N={batch}", model, x, 1 if quick else 5)
    after = matmul_gflops(size)
    peak = max(before, after)
    print(f"machine: {os.cpu_count()} cores ({CORES} used), NumPy {np.__version__}; float32 matmul "
          f"{size}x{size}: {peak:.0f} GFLOP/s (the ceiling below; {before:.0f} before the layers, "
          f"{after:.0f} after)\n")
    print(f"  {'network':<11}{'layer (fast; loop on 1 image, scaled)':<44}{'fwd ms':>8}{'bwd ms':>8}"
          f"{'GFLOP/s':>9}{'% peak':>8}{'loop ms':>10}{'speed-up':>9}")
    for row, rate, t_loop, t_fast in rows:
        percent = f"{100 * rate / peak:7.0f}%" if rate else f"{'':8}"
        print(f"{row}{percent}{t_loop * 1e3:10.0f}{t_loop / t_fast:8.0f}x" if t_loop else row + percent.rstrip())
    stolen = cpu_steal_since(steal_start)
    print("\nwhole networks: python train_mnist.py --net 2 --bench, train_cifar.py --net 4 --bench, ...")
    print(f"bench took {time.time() - started:.0f} s" +
          (f"; the host took {stolen:.0%} of this VM's CPU time meanwhile (steal)" if stolen is not None else ""))
    return 0


def gradcheck():
    """Print check_gradients for every layer in each of its forms, and the loss's
    gradient: backward against central differences.  Returns 0 if all agree."""
    rng = np.random.default_rng(0)
    images, rows = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((2, 12))
    cases = [(lambda impl: Conv2D(3, 4, 3, padding=1, impl=impl, rng=rng), images),
             (lambda impl: Conv2D(3, 2, (3, 2), stride=2, impl=impl, rng=rng), images),
             (lambda impl: MaxPool2D(2, impl=impl), images),
             (lambda impl: MaxPool2D(3, stride=2, impl=impl), images),
             (lambda impl: GlobalMaxPool2D(impl=impl), images),
             (lambda impl: ReLU(impl=impl), images),
             (lambda impl: GELU(impl=impl), images),
             (lambda impl: Flatten(impl=impl), images),
             (lambda impl: Dense(12, 5, rng=rng, impl=impl), rows),
             (lambda impl: Scale(0.5, impl=impl), rows),
             (lambda impl: BatchNorm2D(3, impl=impl), images)]
    print(f"{'layer':<44}{'impl':<7}relative error of each gradient (x: the input's)")
    worst = 0.0
    for make, x in cases:
        for impl in make("plain").impls:
            layer = make(impl)
            if layer.impl != impl:  # no version of its own: the row above
                continue
            errors = check_gradients(layer, x)
            worst = max(worst, *errors.values())
            print(f"{layer!r:<44}{impl:<7}" + "  ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    loss_fn, labels = SoftmaxCrossEntropy(label_smoothing=0.1), np.array([1, 4])
    logits = rng.standard_normal((2, 5))
    loss_fn.forward(logits, labels)
    error = relative_error(loss_fn.backward(), numerical_gradient(lambda: loss_fn.forward(logits, labels), logits))
    worst = max(worst, error)
    print(f"{loss_fn!r:<51}logits {error:.1e}")
    print(f"\nlargest: {worst:.1e} ({'all agree' if worst < 1e-7 else 'A GRADIENT IS WRONG'}: "
          f"float64 central differences, relative error max|a - b| / max(|a| + |b|))")
    return 0 if worst < 1e-7 else 1


USAGE = """usage: python cnn.py gradcheck         every layer's backward against central differences
       python cnn.py bench [--quick]   the speed of the documented networks' layers on this machine
       (training: python train_mnist.py --net 1|2, train_fashion.py, train_cifar.py --net 3|4)"""


def main(argv):
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    if argv == ["gradcheck"]:
        return gradcheck()
    print(USAGE)
    return 0 if not argv else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
