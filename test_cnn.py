"""Tests for cnn.py: gradients against finite differences, loop vs fast agreement,
readers and downloader on generated files, and the training scripts end to end.
No network (the downloader talks to a local http.server) and no real dataset."""
import gzip
import http.server
import io
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

import cnn

HERE = os.path.dirname(os.path.abspath(__file__))


def mnist_network(net, rng=None):
    """Network 1 or 2 as train_mnist.py defines it."""
    import train_mnist
    return train_mnist.NETWORKS[net](rng)


def rel_error(a, b):
    """||a - b|| / (||a|| + ||b||): scale-free, and 0 only for equal arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-30)


def check_layer_gradients(layer, x, tolerance=1e-6, seed=0):
    """Compare backward() with central differences of f = sum(forward(x) * G) for
    the input and every parameter; returns the largest relative error."""
    x = x.astype(np.float64, copy=False)  # keeps the memory layout
    upstream = np.random.default_rng(seed).standard_normal(layer.forward(x).shape)
    layer.forward(x)
    dx = layer.backward(upstream)
    grads = {k: v.copy() for k, v in layer.grads.items()}

    def f():
        return float(np.sum(layer.forward(x) * upstream))

    errors = {"x": rel_error(dx, cnn.numerical_gradient(f, x))}
    for key, param in layer.params.items():
        errors[key] = rel_error(grads[key], cnn.numerical_gradient(f, param))
    assert set(grads) == set(layer.params)
    worst = max(errors.values())
    assert worst < tolerance, errors
    return worst


def away_from_zero(shape, seed=0):
    """Random values with |x| >= 0.1, so that ReLU's kink is out of reach of eps."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.5, shape) * rng.choice([-1, 1], shape)
    return x


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("impl", ["loop", "plain", "fast"])
@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 0), (2, 1)])
@pytest.mark.parametrize("channels", [(1, 4), (3, 4), (4, 3), (9, 2)])  # fast: dx as a sum of taps for (1, 4), (3, 4), else as a convolution
def test_conv_gradients(monkeypatch, impl, stride, padding, channels):
    rng = np.random.default_rng(1)
    c, f = channels
    layer = cnn.Conv2D(c, f, 3, stride=stride, padding=padding, impl=impl, dtype=np.float64, rng=rng)
    layer.params["b"][:] = rng.standard_normal(f)
    x = rng.standard_normal((2 if impl == "loop" else 3, c, 7, 6))  # 7 x 6: odd, non-square
    check_layer_gradients(layer, x)
    if impl == "fast":  # channels-last memory input: the other im2col layout
        check_layer_gradients(layer, cnn.nchw_view(cnn.nhwc(x)))
        monkeypatch.setattr(cnn, "CHUNK_BYTES", 1)  # its im2col_matmul one image at a time, on 2 cores
        check_layer_gradients(layer, cnn.nchw_view(cnn.nhwc(x)))


@pytest.mark.parametrize("impl", ["loop", "plain", "fast"])
def test_conv_gradients_rectangular_kernel_without_bias(impl):
    rng = np.random.default_rng(2)
    layer = cnn.Conv2D(2, 3, (2, 3), stride=2, impl=impl, bias=False, dtype=np.float64, rng=rng)
    check_layer_gradients(layer, rng.standard_normal((3, 2, 6, 9)))


@pytest.mark.parametrize("impl", ["loop", "plain", "fast"])
@pytest.mark.parametrize("kernel,stride,size", [(2, None, (6, 8)), (2, None, (7, 9)),
                                                 (3, 2, (7, 8)), (3, 1, (5, 6)), (2, 1, (4, 5))])
def test_maxpool_gradients(impl, kernel, stride, size):
    rng = np.random.default_rng(3)
    check_layer_gradients(cnn.MaxPool2D(kernel, stride, impl=impl), rng.standard_normal((2, 3) + size))


def test_maxpool_first_maximum_gets_the_gradient_and_overlaps_accumulate():
    for impl in ("loop", "plain", "fast"):
        x = np.zeros((1, 1, 3, 3))
        x[0, 0, 1, 1] = 5.0                       # the centre is the max of all 4 windows
        pool = cnn.MaxPool2D(2, 1, impl=impl)
        assert np.array_equal(pool.forward(x), np.full((1, 1, 2, 2), 5.0))
        dx = pool.backward(np.ones((1, 1, 2, 2)))
        expected = np.zeros((1, 1, 3, 3))
        expected[0, 0, 1, 1] = 4.0                # accumulated, not assigned
        assert np.array_equal(dx, expected), impl
        ties = np.ones((1, 1, 2, 2))              # all equal: the first (top-left) wins
        pool = cnn.MaxPool2D(2, impl=impl)
        pool.forward(ties)
        assert np.array_equal(pool.backward(np.ones((1, 1, 1, 1)))[0, 0], [[1, 0], [0, 0]]), impl
        diagonal = np.array([[[[1.0, 5.0], [5.0, 1.0]]]])  # first in row-major order: top right
        pool.forward(diagonal)
        assert np.array_equal(pool.backward(np.ones((1, 1, 1, 1)))[0, 0], [[0, 1], [0, 0]]), impl


@pytest.mark.parametrize("stride,padding,size", [(1, 0, (8, 7)), (2, 1, (9, 10)), (1, 1, (5, 5))])
def test_conv_loop_plain_and_fast_agree(stride, padding, size):
    rng = np.random.default_rng(4)
    layers = [cnn.Conv2D(3, 5, 3, stride=stride, padding=padding, impl=impl, dtype=np.float64, rng=rng)
              for impl in ("loop", "plain", "fast")]
    layers[0].params["b"][:] = rng.standard_normal(5)
    for layer in layers[1:]:
        for key in layers[0].params:
            layer.params[key] = layers[0].params[key].copy()
    x = rng.standard_normal((4, 3) + size)
    ys = [layer.forward(x) for layer in layers]
    g = rng.standard_normal(ys[0].shape)
    dxs = [layer.backward(g) for layer in layers]
    for other in (1, 2):
        assert rel_error(ys[0], ys[other]) < 1e-10 and rel_error(dxs[0], dxs[other]) < 1e-10
        for key in layers[0].params:
            assert rel_error(layers[0].grads[key], layers[other].grads[key]) < 1e-10


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), (2, 1)])
def test_pool_loop_plain_and_fast_agree(kernel, stride):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 9, 7))
    x[0, 0, :2, :2] = 1.0  # a tie
    pools = [cnn.MaxPool2D(kernel, stride, impl=impl) for impl in ("loop", "plain", "fast")]
    ys = [pool.forward(x) for pool in pools]
    g = rng.standard_normal(ys[0].shape)
    dxs = [pool.backward(g) for pool in pools]
    for other in (1, 2):
        assert np.array_equal(ys[0], ys[other]) and rel_error(dxs[0], dxs[other]) < 1e-12


def test_impl_picks_the_textbook_or_the_engine():
    import copy
    assert type(cnn.Conv2D(1, 2, 3)) is cnn.FastConv2D and type(cnn.Conv2D(1, 2, 3, impl="plain")) is cnn.Conv2D
    assert type(cnn.Sequential()) is cnn.FastSequential and type(cnn.ReLU(impl="plain")) is cnn.ReLU
    assert type(cnn.Conv2D(1, 2, 3, impl="loop")) is cnn.Conv2D and cnn.Conv2D(1, 2, 3, impl="loop").impl == "loop"
    layer = cnn.Conv2D(1, 2, 3, impl="plain")
    assert type(copy.deepcopy(layer)) is cnn.Conv2D and type(copy.copy(cnn.ReLU())) is cnn.FastReLU
    assert type(pickle.loads(pickle.dumps(cnn.Sequential(cnn.ReLU())))) is cnn.FastSequential
    # the model puts every layer in its form, in place: the layers you hold are the model's
    relu, conv = cnn.ReLU(impl="plain"), cnn.Conv2D(1, 2, 3, impl="plain")
    model = cnn.Sequential(conv, relu)
    assert model.layers == [conv, relu] and type(conv) is cnn.FastConv2D and type(relu) is cnn.FastReLU
    model.to("loop")
    assert type(model) is cnn.Sequential and conv.impl == "loop" and relu.impl == "plain"
    assert model.to("fast") is model and type(model) is cnn.FastSequential and conv.impl == "fast"
    assert type(cnn.Scale(2.0)) is cnn.Scale and cnn.Scale(2.0).impl == "plain"  # no fast version: plain
    assert cnn.Sequential(cnn.Conv2D(1, 2, 3)).parameters()[0][0] == "0.Conv2D.W"
    with pytest.raises(ValueError, match=r"ReLU: impl must be one of \('plain', 'fast'\), got 'loop'"):
        cnn.ReLU(impl="loop")
    with pytest.raises(ValueError, match=r"Sequential: impl must be one of \('loop', 'plain', 'fast'\), got 'fsat'"):
        cnn.Sequential(cnn.ReLU(), impl="fsat")
    with pytest.raises(ValueError, match=r"Conv2D: impl must be one of \('loop', 'plain', 'fast'\), got 'fsat'"):
        cnn.Conv2D(1, 2, 3, impl="fsat")
    with pytest.raises(ValueError, match=r"ReLU: impl must be one of"):
        cnn.Sequential(cnn.ReLU()).layers[0].to("Fast")


def test_a_layer_of_your_own_keeps_its_class_in_a_fast_model():
    class Twice(cnn.Conv2D):  # a user's subclass: no fast version is registered for it
        def _forward(self, x):
            return 2 * super()._forward(x)

        def _backward(self, grad, input_grad=True):
            return super()._backward(2 * grad, input_grad)
    rng = np.random.default_rng(3)
    layer = Twice(2, 3, 3, dtype=np.float64, rng=rng)
    model = cnn.Sequential(layer, cnn.ReLU())
    assert type(layer) is Twice and layer.impl == "plain" and type(model) is cnn.FastSequential
    x = away_from_zero((2, 2, 5, 5), seed=4)
    plain = cnn.Conv2D(2, 3, 3, dtype=np.float64, impl="plain")
    plain.params = {k: v.copy() for k, v in layer.params.items()}
    assert rel_error(model(x), np.maximum(2 * plain(x), 0)) < 1e-15
    assert max(cnn.check_gradients(model, x).values()) < 1e-7


@pytest.mark.parametrize("make", [lambda rng, impl: cnn.ReLU(impl=impl), lambda rng, impl: cnn.GELU(impl=impl),
                                  lambda rng, impl: cnn.Flatten(impl=impl),
                                  lambda rng, impl: cnn.GlobalMaxPool2D(impl=impl),
                                  lambda rng, impl: cnn.Dense(60, 3, dtype=np.float64, rng=rng, impl=impl),
                                  lambda rng, impl: cnn.BatchNorm2D(3, dtype=np.float64, impl=impl)],
                         ids=["relu", "gelu", "flatten", "globalmax", "dense", "batchnorm"])
def test_every_plain_layer_equals_its_fast_version(make):
    rng = np.random.default_rng(40)
    plain, fast = make(np.random.default_rng(1), "plain"), make(np.random.default_rng(1), "fast")
    assert type(fast).__base__ is type(plain) or (type(fast) is type(plain) and fast.impl == "plain")
    x = away_from_zero((4, 3, 4, 5), seed=41)
    if isinstance(plain, cnn.Dense):
        x = x.reshape(4, 60)
    if isinstance(plain, cnn.BatchNorm2D):
        plain.params["gamma"][:] = fast.params["gamma"][:] = rng.uniform(0.5, 1.5, 3)
    y_plain, y_fast = plain.forward(x), fast.forward(x)
    g = rng.standard_normal(y_plain.shape)
    assert rel_error(y_plain, y_fast) < 1e-12
    assert rel_error(plain.backward(g), fast.backward(g)) < 1e-12
    for key in plain.grads:
        assert rel_error(plain.grads[key], fast.grads[key]) < 1e-12, key
    if isinstance(plain, cnn.BatchNorm2D):
        assert rel_error(plain.running_var, fast.running_var) < 1e-12


# c, f, channels-last input, padding, stride, input size, pool: every im2col layout
# (channel-major, cols^T, channels-last), both dx routes (sum of taps for c < f, else
# a convolution), conv outputs that pooling covers and ones whose last row or column
# it leaves out, and 3 x 3 pooling.
FUSED_CASES = [(1, 4, False, 0, 1, (9, 8), 2), (3, 8, False, 1, 1, (7, 6), 2),
               (4, 9, True, 1, 2, (9, 10), 2), (2, 3, True, 0, 1, (8, 8), 3), (9, 2, True, 1, 1, (7, 7), 2),
               (3, 9, False, 0, 2, (15, 13), 3), (2, 5, False, 2, 1, (8, 9), 3)]


@pytest.mark.parametrize("c,f,channels_last,padding,stride,size,k", FUSED_CASES)
def test_conv_with_its_max_pool_fused_matches_the_two_layers(c, f, channels_last, padding, stride, size, k):
    rng = np.random.default_rng(11)
    conv = cnn.Conv2D(c, f, 3, stride=stride, padding=padding, dtype=np.float64, rng=rng)
    conv.params["b"][:] = rng.standard_normal(f)
    pool = cnn.MaxPool2D(k)
    x = rng.standard_normal((3, c) + size)
    if channels_last:
        x = cnn.nchw_view(cnn.nhwc(x))
    y = pool.forward(conv.forward(x))
    g = rng.standard_normal(y.shape)
    dx = conv.backward(pool.backward(g))
    grads = {key: value.copy() for key, value in conv.grads.items()}
    y_fused = conv.forward_pooled(x, pool)
    assert y_fused.shape == y.shape and rel_error(y_fused, y) < 1e-14
    assert rel_error(conv.backward(g), dx) < 1e-14
    for key in grads:
        assert rel_error(conv.grads[key], grads[key]) < 1e-14, key
    conv.training = pool.training = False
    assert rel_error(conv.forward_pooled(x, pool), y) < 1e-14


@pytest.mark.parametrize("c,f,channels_last,padding,stride,size,k", FUSED_CASES)
def test_network_with_fused_conv_and_pool_gradient(monkeypatch, c, f, channels_last, padding, stride, size, k):
    monkeypatch.setattr(cnn, "CHUNK_BYTES", 1)  # channels-last: im2col_matmul image by image, on 2 cores
    rng = np.random.default_rng(12)
    conv = cnn.Conv2D(c, f, 3, stride=stride, padding=padding, dtype=np.float64, rng=rng)
    conv.params["b"][:] = rng.standard_normal(f)
    x = rng.standard_normal((2, c) + size)
    if channels_last:
        x = cnn.nchw_view(cnn.nhwc(x))
    features = cnn.Sequential(conv, cnn.MaxPool2D(k)).forward(x)[0].size
    model = cnn.Sequential(conv, cnn.MaxPool2D(k), cnn.Flatten(), cnn.Dense(features, 3, dtype=np.float64, rng=rng))
    assert list(model.fused_pools()) == [0]
    upstream = rng.standard_normal((2, 3))
    model.forward(x)
    dx = model.backward(upstream, input_grad=True)

    def f_():
        return float(np.sum(model.forward(x) * upstream))

    assert rel_error(dx, cnn.numerical_gradient(f_, x)) < 1e-7
    for name, layer, key in model.parameters():
        analytic = layer.grads[key].copy()
        assert rel_error(analytic, cnn.numerical_gradient(f_, layer.params[key])) < 1e-7, name


def test_which_pools_a_convolution_runs():
    conv = cnn.Conv2D(1, 2, 3)
    model = cnn.Sequential(conv, cnn.MaxPool2D(2), cnn.ReLU(),                  # fused
                           cnn.Conv2D(2, 2, 3), cnn.ReLU(), cnn.MaxPool2D(2),   # not adjacent
                           cnn.Conv2D(2, 2, 3), cnn.MaxPool2D(2),               # loop (below)
                           cnn.Conv2D(2, 2, 3), cnn.MaxPool2D(3, 2))            # overlapping windows
    model.layers[6].to("loop")
    assert list(model.fused_pools()) == [0]
    with pytest.raises(ValueError, match="cannot run MaxPool2D"):
        conv.forward_pooled(np.zeros((1, 1, 8, 8), np.float32), cnn.MaxPool2D(3, 2))
    with pytest.raises(ValueError, match="smaller than the window"):
        conv.forward_pooled(np.zeros((1, 1, 4, 4), np.float32), cnn.MaxPool2D(3))


def test_conv_known_output():
    conv = cnn.Conv2D(1, 1, 2, dtype=np.float64)
    conv.params["W"][:] = [[[[1, 2], [3, 4]]]]
    conv.params["b"][:] = 10
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    # cross-correlation (no kernel flip): 0*1 + 1*2 + 3*3 + 4*4 + 10 = 37
    for impl in ("loop", "plain", "fast"):
        layer = cnn.Conv2D(1, 1, 2, dtype=np.float64, impl=impl)
        layer.params = conv.params
        assert np.array_equal(layer.forward(x)[0, 0], [[37, 47], [67, 77]])


def test_dense_relu_flatten_scale_gelu_gradients():
    rng = np.random.default_rng(6)
    dense = cnn.Dense(5, 3, dtype=np.float64, rng=rng)
    dense.params["b"][:] = rng.standard_normal(3)
    check_layer_gradients(dense, rng.standard_normal((4, 5)))
    check_layer_gradients(cnn.Dense(5, 3, bias=False, dtype=np.float64, rng=rng), rng.standard_normal((4, 5)))
    check_layer_gradients(cnn.ReLU(), away_from_zero((2, 3, 4, 5)))
    check_layer_gradients(cnn.GELU(), rng.standard_normal((2, 3, 4, 5)) * 2)
    check_layer_gradients(cnn.Flatten(), rng.standard_normal((2, 3, 4, 5)))
    check_layer_gradients(cnn.Flatten(), cnn.nchw_view(rng.standard_normal((2, 4, 5, 3))))  # channels-last memory
    check_layer_gradients(cnn.Scale(1 / 9), rng.standard_normal((3, 7)))
    check_layer_gradients(cnn.GlobalMaxPool2D(), rng.standard_normal((2, 3, 4, 5)))


def test_gelu_values():
    gelu = cnn.GELU()
    y = gelu.forward(np.array([-3.0, 0.0, 1.0, 3.0]))
    # exact GELU: -0.00405, 0, 0.84134, 2.99595; the tanh form is within 1e-3
    assert np.allclose(y, [-0.00405, 0.0, 0.84134, 2.99595], atol=1e-3)


@pytest.mark.parametrize("scale", [True, False])
def test_batchnorm_gradients_training_mode(scale):
    rng = np.random.default_rng(7)
    bn = cnn.BatchNorm2D(3, scale=scale, dtype=np.float64)
    if scale:
        bn.params["gamma"][:] = rng.uniform(0.5, 1.5, 3)
    bn.params["beta"][:] = rng.standard_normal(3)
    check_layer_gradients(bn, rng.standard_normal((4, 3, 3, 5)) * 2 + 1)


def test_batchnorm_statistics_and_eval_mode():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 2, 3, 4)) * 3 + 5
    bn = cnn.BatchNorm2D(2, momentum=0.1, dtype=np.float64)
    bn.params["gamma"][:] = [2.0, 0.5]
    bn.params["beta"][:] = [1.0, -1.0]
    y = bn.forward(x)
    # training: batch statistics, biased variance inside the normalization
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    expected = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    expected = expected * np.array([2.0, 0.5])[None, :, None, None] + np.array([1.0, -1.0])[None, :, None, None]
    assert rel_error(y, expected) < 1e-12
    # running statistics: momentum 0.1 from (0, 1), variance unbiased (n / (n - 1))
    n = x.size // 2
    assert np.allclose(bn.running_mean, 0.1 * mean)
    assert np.allclose(bn.running_var, 0.9 + 0.1 * var * n / (n - 1))
    bn.training = False
    x2 = rng.standard_normal((2, 2, 3, 4))
    expected = (x2 - bn.running_mean[None, :, None, None]) / np.sqrt(bn.running_var[None, :, None, None] + 1e-5)
    expected = expected * np.array([2.0, 0.5])[None, :, None, None] + np.array([1.0, -1.0])[None, :, None, None]
    assert rel_error(bn.forward(x2), expected) < 1e-12


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_cross_entropy(smoothing):
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    loss_fn = cnn.SoftmaxCrossEntropy(smoothing)
    loss_fn.forward(logits, labels)
    grad = loss_fn.backward()
    numeric = cnn.numerical_gradient(lambda: loss_fn.forward(logits, labels), logits)
    assert rel_error(grad, numeric) < 1e-7
    # known values: uniform logits give log(K) whatever the smoothing
    assert loss_fn.forward(np.zeros((3, 4)), np.array([0, 1, 2])) == pytest.approx(np.log(4))
    # stable for huge logits: log-sum-exp, no overflow
    big = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    value = cnn.SoftmaxCrossEntropy().forward(big, np.array([0, 0]))
    assert value == pytest.approx(500.0)


def test_numerical_gradient_of_a_known_function():
    x = np.array([1.0, -2.0, 3.0])
    assert np.allclose(cnn.numerical_gradient(lambda: float(np.sum(x ** 3)), x), 3 * x ** 2, atol=1e-8)


def small_network(dtype=np.float64, impl="fast", seed=0):
    """Every layer type with trained parameters; impl "loop" or "plain": Part I alone."""
    rng = np.random.default_rng(seed)
    rest = "fast" if impl == "fast" else "plain"
    return cnn.Sequential(
        cnn.Conv2D(2, 4, 3, padding=1, impl=impl, bias=False, dtype=dtype, rng=rng),
        cnn.BatchNorm2D(4, dtype=dtype, impl=rest),  # no conv bias before BatchNorm: its gradient is 0
        cnn.ReLU(impl=rest), cnn.MaxPool2D(2, impl=impl),
        cnn.Conv2D(4, 3, 3, stride=1, impl=impl, dtype=dtype, rng=rng), cnn.GELU(impl=rest),
        cnn.Flatten(impl=rest), cnn.Dense(6, 5, dtype=dtype, rng=rng, impl=rest), cnn.ReLU(impl=rest),
        cnn.Dense(5, 3, dtype=dtype, rng=rng, impl=rest), impl=rest)


@pytest.mark.parametrize("impl", ["loop", "plain", "fast"])
def test_whole_network_gradient_with_batchnorm_in_training_mode(impl):
    rng = np.random.default_rng(10)
    model = small_network(impl=impl)
    x = rng.standard_normal((3, 2, 6, 8))
    labels = np.array([0, 2, 1])
    loss_fn = cnn.SoftmaxCrossEntropy(0.1)
    model.train()
    loss_fn.forward(model.forward(x), labels)
    dx = model.backward(loss_fn.backward(), input_grad=True)

    def f():
        return loss_fn.forward(model.forward(x), labels)

    assert rel_error(dx, cnn.numerical_gradient(f, x)) < 1e-6
    for name, layer, key in model.parameters():
        analytic = layer.grads[key].copy()
        assert rel_error(analytic, cnn.numerical_gradient(f, layer.params[key])) < 1e-6, name


def test_float32_stays_float32():
    model = small_network(dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 8)).astype(np.float32)
    y = model.forward(x)
    assert y.dtype == np.float32
    model.backward(np.ones_like(y))
    assert all(layer.grads[key].dtype == np.float32 for _, layer, key in model.parameters())


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Conv2D\(3, 8.*expected input of shape \(N, 3, H, W\), got \(2, 1, 28, 28\)"):
        cnn.Conv2D(3, 8, 3).forward(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C, H, W\), got \(28, 28\)"):
        cnn.MaxPool2D().forward(np.zeros((28, 28)))
    with pytest.raises(ValueError, match=r"Dense\(400, 64\).*\(N, 400\), got \(2, 676\)"):
        cnn.Dense(400, 64).forward(np.zeros((2, 676), np.float32))


def test_summary_shapes_and_counts(capsys):
    model = cnn.Sequential(cnn.Conv2D(1, 16, 3), cnn.ReLU(), cnn.MaxPool2D(2), cnn.Conv2D(16, 16, 3),
                           cnn.ReLU(), cnn.MaxPool2D(2), cnn.Flatten(), cnn.Dense(400, 64))
    text = model.summary((1, 28, 28))
    assert "(16, 26, 26)" in text and "(16, 5, 5)" in text and "(400,)" in text
    assert f"{16 * 9 + 16 + 16 * 16 * 9 + 16 + 400 * 64 + 64:,}" in text.splitlines()[-1]


def test_save_load_bit_identical_and_shape_check(tmp_path):
    model = small_network(dtype=np.float32, seed=1)
    x = np.random.default_rng(0).standard_normal((4, 2, 6, 8)).astype(np.float32)
    model.forward(x)  # moves the BatchNorm running statistics away from their start
    path = str(tmp_path / "m.npz")
    model.save(path)
    assert not os.path.exists(path + ".tmp")
    other = small_network(dtype=np.float32, seed=2)
    other.load(path)
    assert np.array_equal(model.predict(x), other.predict(x))
    wrong = cnn.Sequential(cnn.Conv2D(2, 5, 3, padding=1, bias=False), *small_network(dtype=np.float32).layers[1:])
    with pytest.raises(ValueError, match=r"0\.Conv2D\.W has shape \(4, 2, 3, 3\), the model expects \(5, 2, 3, 3\)"):
        wrong.load(path)


def test_sgd_and_adam_match_their_formulas():
    layer = cnn.Dense(1, 1, bias=False, dtype=np.float64)
    layer.params["W"][:] = 1.0
    params = [("w", layer, "W")]
    sgd = cnn.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    layer.grads["W"] = np.array([[0.5]])
    sgd.step()  # v = 0.5 + 0.01 = 0.51;  w = 1 - 0.051
    assert layer.params["W"][0, 0] == pytest.approx(0.949)
    sgd.step()  # v = 0.9 * 0.51 + 0.5 + 0.00949 = 0.96849
    assert layer.params["W"][0, 0] == pytest.approx(0.949 - 0.096849)
    layer.params["W"][:] = 1.0
    nesterov = cnn.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    nesterov.step()  # v = 0.5; step uses g + 0.9 v = 0.95
    assert layer.params["W"][0, 0] == pytest.approx(1 - 0.095)
    layer.params["W"][:] = 1.0
    layer.lr_scale = 64.0
    cnn.SGD(params, lr=0.001).step()
    assert layer.params["W"][0, 0] == pytest.approx(1 - 0.064 * 0.5)
    del layer.lr_scale
    layer.params["W"][:] = 1.0
    adam = cnn.Adam(params, lr=0.01)
    adam.step()  # first bias-corrected step is lr * g / |g|
    assert layer.params["W"][0, 0] == pytest.approx(0.99, abs=1e-7)


def test_schedules():
    s = cnn.warmup_linear_lr(1.0, total_steps=101, warmup=0.2, final_fraction=0.1)
    assert s(0) == pytest.approx(1 / 20) and s(19) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.1) and s(60) == pytest.approx(1 - 0.9 * 40 / 80)
    c = cnn.cosine_lr(2.0, 100, 0.0)
    assert c(0) == pytest.approx(2.0) and c(50) == pytest.approx(1.0) and c(100) == pytest.approx(0.0)
    assert cnn.step_lr(1.0, 10, 0.5)(25) == pytest.approx(0.25)
    assert cnn.constant_lr(0.3)(1000) == 0.3


def test_tiny_network_overfits_tiny_dataset():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = np.arange(16) % 4
    model = cnn.Sequential(cnn.Conv2D(1, 8, 3, padding=1, rng=rng), cnn.ReLU(), cnn.MaxPool2D(2),
                           cnn.Flatten(), cnn.Dense(128, 4, rng=rng))
    loss_fn, opt = cnn.SoftmaxCrossEntropy(), cnn.SGD(model.parameters(), 0.05, momentum=0.9)
    first = loss_fn.forward(model.forward(x), y)
    for _ in range(150):
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()
    assert first > 1.0 and loss < 0.02


# --------------------------------------------------------------------------- data


def write_mnist(folder, n_train=120, n_test=40, gz=True, spelling="-", seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for k in range(n):  # a learnable signal: a bright bar whose place is the label
            images[k, 2 + 2 * labels[k]:4 + 2 * labels[k], 4:24] = 250
        cnn.write_idx(os.path.join(folder, f"{prefix}-images{spelling}idx3-ubyte{ext}"), images)
        cnn.write_idx(os.path.join(folder, f"{prefix}-labels{spelling}idx1-ubyte{ext}"), labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz,spelling", [(True, "-"), (False, "-"), (False, ".")])
def test_idx_round_trip(tmp_path, gz, spelling):
    arrays = write_mnist(str(tmp_path), gz=gz, spelling=spelling)
    images, labels = cnn.load_mnist(str(tmp_path), "train")
    assert images.shape == (120, 1, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images[:, 0], arrays["train"][0]) and np.array_equal(labels, arrays["train"][1])
    assert isinstance(images.base, np.memmap) or isinstance(images, np.memmap)
    if gz:  # the .gz was decompressed once, beside it; the second read uses that file
        raw = tmp_path / "train-images-idx3-ubyte"
        assert raw.exists()
        mtime = raw.stat().st_mtime_ns
        cnn.load_mnist(str(tmp_path), "train")
        assert raw.stat().st_mtime_ns == mtime


def test_idx_other_types_round_trip(tmp_path):
    for array in (np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5, np.linspace(0, 1, 6).astype(np.float32)):
        path = str(tmp_path / "a.idx")
        cnn.write_idx(path, array)
        assert np.array_equal(cnn.read_idx(path), array)


def test_idx_errors(tmp_path):
    good = str(tmp_path / "good")
    cnn.write_idx(good, np.zeros((3, 2, 2), np.uint8))
    data = open(good, "rb").read()
    cases = {"magic": (b"\x01\x00" + data[2:], r"bad magic bytes"),
             "type": (data[:2] + b"\x07" + data[3:], r"unknown IDX type code 0x07"),
             "short": (data[:-3], r"truncated: header says 28 bytes, file has 25")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(cnn.DataError, match=str(path) + ".*" + message):
            cnn.read_idx(str(path))
    with pytest.raises(cnn.DataError, match="file not found"):
        cnn.read_idx(str(tmp_path / "missing"))


def test_mnist_count_mismatch_and_label_out_of_range(tmp_path):
    write_mnist(str(tmp_path), gz=False)
    cnn.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.zeros(39, np.uint8))
    with pytest.raises(cnn.DataError, match=r"count mismatch: 39 labels for 40 images"):
        cnn.load_mnist(str(tmp_path), "test")
    cnn.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.full(40, 10, np.uint8))
    with pytest.raises(cnn.DataError, match=r"t10k-labels-idx1-ubyte: label out of range: 10"):
        cnn.load_mnist(str(tmp_path), "test")
    with pytest.raises(cnn.DataError, match="none of"):
        cnn.load_mnist(str(tmp_path / "nowhere"), "test")


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(folder, per_batch=20, seed=0, archive=False):
    """Tiny batches in the official layout: pickled dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    batches_dir = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(batches_dir, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
        for k, label in enumerate(labels):  # learnable: a bright stripe per class
            data[k, 32 * 3 * label:32 * 3 * label + 64] = 255
        with open(os.path.join(batches_dir, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f, protocol=2)
        written[name] = (data, labels)
    with open(os.path.join(batches_dir, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}, f, protocol=2)
    if archive:
        path = os.path.join(folder, "cifar-10-python.tar.gz")
        with tarfile.open(path, "w:gz") as tar:
            tar.add(batches_dir, arcname="cifar-10-batches-py")
        import shutil
        shutil.rmtree(batches_dir)
    return written


@pytest.mark.parametrize("form", ["batches folder", "parent folder", "archive", "folder with archive"])
def test_cifar_round_trip(tmp_path, form):
    written = write_cifar(str(tmp_path), archive=form in ("archive", "folder with archive"))
    path = {"batches folder": tmp_path / "cifar-10-batches-py", "parent folder": tmp_path,
            "archive": tmp_path / "cifar-10-python.tar.gz", "folder with archive": tmp_path}[form]
    images, labels, classes = cnn.load_cifar10(str(path), "train")
    assert images.shape == (100, 3, 32, 32) and images.dtype == np.uint8 and classes == CIFAR_CLASSES
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(images, expected)
    test_images, test_labels, _ = cnn.load_cifar10(str(path), "test")
    assert np.array_equal(test_labels, written["test_batch"][1])


def test_cifar_bad_batches(tmp_path):
    write_cifar(str(tmp_path))
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f, protocol=2)
    with pytest.raises(cnn.DataError, match=r"test_batch: not a CIFAR-10 batch \(needs b'data' and b'labels'"):
        cnn.load_cifar10(str(tmp_path), "test")
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(cnn.DataError, match=r"not a CIFAR-10 batch \(data should be uint8 \(N, 3072\), got \(2, 100\)"):
        cnn.load_cifar10(str(tmp_path), "test")


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_and_nothing_runs(tmp_path):
    write_cifar(str(tmp_path))
    marker = tmp_path / "it-ran"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": RunsACommand(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(cnn.DataError, match=r"test_batch: unsafe or corrupt pickle: refused to load (posix|os)\.system"):
        cnn.load_cifar10(str(tmp_path), "test")
    assert not marker.exists()


def test_tar_member_escaping_the_folder_is_refused(tmp_path):
    archive = tmp_path / "evil" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"gotcha"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(cnn.DataError, match=r"unsafe member '\.\./escaped\.txt' escapes the target folder"):
        cnn.load_cifar10(str(archive), "train")
    assert not (tmp_path / "escaped.txt").exists()


# ---- downloader against a local server


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/cut/"):  # promises 100,000 bytes, sends 1,000, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            lambda *a: Handler(*a, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def sha256(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


def test_download_good_file_and_gzip_on_the_fly(server, tmp_path):
    root, url = server
    payload = os.urandom(300_000)
    (root / "file.bin").write_bytes(payload)
    (root / "file.idx.gz").write_bytes(gzip.compress(payload))
    dest = tmp_path / "file.bin"
    cnn.download(url + "file.bin", str(dest), sha256(payload))
    assert dest.read_bytes() == payload
    dest2 = tmp_path / "file.idx"  # the checksum is that of the decompressed content
    cnn.download(url + "file.idx.gz", str(dest2), sha256(payload))
    assert dest2.read_bytes() == payload


@pytest.mark.parametrize("case", ["wrong checksum", "404", "cut halfway"])
def test_download_failures_leave_no_file(server, tmp_path, case):
    root, url = server
    (root / "file.bin").write_bytes(b"a" * 5000)
    path, message = {"wrong checksum": ("file.bin", "checksum mismatch"),
                     "404": ("missing.bin", "download failed"),
                     "cut halfway": ("cut/file.bin", "connection closed|download failed")}[case]
    dest = tmp_path / "out.bin"
    with pytest.raises(cnn.DataError, match=message):
        checksum = "0" * 64 if case == "wrong checksum" else sha256(b"a" * 5000)
        cnn.download(url + path, str(dest), checksum, timeout=5)
    assert not dest.exists() and not (tmp_path / "out.bin.part").exists()


def test_fetch_dataset_tries_mirrors_in_order(server, tmp_path, monkeypatch):
    root, url = server
    files = {}
    (root / "good").mkdir()
    for name in ("a-idx1-ubyte", "b-idx1-ubyte"):
        content = os.urandom(1000)
        (root / "good" / (name + ".gz")).write_bytes(gzip.compress(content))
        files[name] = sha256(content)
    monkeypatch.setitem(cnn.DATASETS, "toy", ([url + "broken/", url + "good/"], files))
    folder = cnn.fetch_dataset("toy", str(tmp_path / "toy"))
    assert sorted(os.listdir(folder)) == sorted(files)
    monkeypatch.setitem(cnn.DATASETS, "toy2", ([url + "broken/"], files))
    with pytest.raises(cnn.DataError, match=r"could not download toy2 .* put a-idx1-ubyte, b-idx1-ubyte .* --data-dir"):
        cnn.fetch_dataset("toy2", str(tmp_path / "toy2"))


# ---- streaming batches


def test_batches_cover_every_index_once_and_are_reproducible():
    n = 103
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 4, 5)).astype(np.uint8)
    labels = np.arange(n)
    mean, std = cnn.channel_stats(images)
    def epoch_labels(seed, epoch):
        return np.concatenate([y for _, y in cnn.iterate_batches(images, labels, 10, mean, std, seed=seed, epoch=epoch)])
    first = epoch_labels(1, 0)
    assert sorted(first) == list(range(n))
    assert np.array_equal(first, epoch_labels(1, 0))
    assert not np.array_equal(first, epoch_labels(1, 1))
    xs = np.concatenate([x for x, _ in cnn.iterate_batches(images, labels, 10, mean, std)])
    assert xs.dtype == np.float32 and xs.shape == (n, 3, 4, 5)
    assert np.allclose(xs.mean(axis=(0, 2, 3)), 0, atol=1e-5) and np.allclose(xs.std(axis=(0, 2, 3)), 1, atol=1e-4)
    expected_mean = images.astype(np.float64).mean(axis=(0, 2, 3))
    assert np.allclose(mean, expected_mean, rtol=1e-6)


def test_augmentation_only_moves_pixels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 3, 8, 8)).astype(np.uint8)
    cropped = cnn.crop_at(images, 2, rng.integers(0, 5, 16), rng.integers(0, 5, 16), "reflect")
    assert cropped.shape == images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    for k in range(16):  # each output is one of the 25 shifted windows of its own image
        assert any(np.array_equal(cropped[k], padded[k, :, dy:dy + 8, dx:dx + 8])
                   for dy in range(5) for dx in range(5))
    zero = cnn.crop_at(images, 3, rng.integers(0, 7, 16), rng.integers(0, 7, 16), "zero")
    assert zero.shape == images.shape
    for pad, mode in [(1, "reflect"), (2, "reflect"), (9, "reflect"), (2, "zero"), (0, "reflect")]:
        want = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect" if mode == "reflect" else "constant")
        assert np.array_equal(cnn.pad_images(images, pad, mode), want)
    flip = np.arange(16) % 2 == 0
    flipped = cnn.flip_some(images.copy(), flip)
    assert np.array_equal(flipped[flip], images[flip][..., ::-1]) and np.array_equal(flipped[~flip], images[~flip])
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    a = np.concatenate([x for x, _ in cnn.iterate_batches(images, np.arange(16), 16, mean, std, shuffle=False,
                                                          epoch=0, flip="alternate")])
    b = np.concatenate([x for x, _ in cnn.iterate_batches(images, np.arange(16), 16, mean, std, shuffle=False,
                                                          epoch=1, flip="alternate")])
    assert np.array_equal(a, b[..., ::-1])  # alternate flip: every image mirrored on the other epoch


def test_metrics():
    cm = cnn.confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # F1: class 0: 2*1/(2+1+1) = 0.5; class 1: 4/(4+1) = 0.8; class 2: never right -> 0
    assert np.allclose(cnn.f1_scores(cm), [0.5, 0.8, 0.0])
    assert cnn.macro_f1(cm) == pytest.approx(1.3 / 3)


# --------------------------------------------------------------------------- scripts


def run(script, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def check_outputs(out):
    for name in ("learning_curve.png", "confusion_matrix.png", "mistakes.png", "metrics.json", "model.npz"):
        assert (out / name).stat().st_size > 0, name
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("script,args", [("train_mnist.py", ["--net", "1"]), ("train_mnist.py", ["--net", "2"]),
                                         ("train_fashion.py", [])])
def test_mnist_scripts_end_to_end(tmp_path, script, args):
    data = tmp_path / "data"
    write_mnist(str(data), n_train=300, n_test=60)
    out = tmp_path / "out"
    result = run(script, *args, "--data-dir", str(data), "--epochs", "1", "--limit", "200", "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = check_outputs(out)
    assert len(metrics["history"]) == 1 and 0 <= metrics["test_accuracy"] <= 1
    assert len(metrics["confusion_matrix"]) == 10 and sum(map(sum, metrics["confusion_matrix"])) == 60
    assert "epoch   1/1" in result.stdout


def test_resume_and_predict(tmp_path):
    data = tmp_path / "data"
    write_mnist(str(data), n_train=300, n_test=60)
    out = tmp_path / "out"
    common = ["--net", "2", "--data-dir", str(data), "--limit", "200", "--out", str(out)]
    assert run("train_mnist.py", *common, "--epochs", "1").returncode == 0
    first = json.loads((out / "metrics.json").read_text())["history"][0]
    result = run("train_mnist.py", *common, "--epochs", "2", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr and "after epoch 1" in result.stderr
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 2 and history[0] == first
    from PIL import Image
    picture = np.full((60, 50), 255, np.uint8)  # a dark digit-like bar on white: gets inverted
    picture[20:30, 5:45] = 0
    Image.fromarray(picture).save(tmp_path / "digit.png")
    result = run("train_mnist.py", "--net", "2", "--out", str(out), "--predict", str(tmp_path / "digit.png"))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(str(tmp_path / "digit.png") + ": ")
    probs = [float(part.split()[-1]) for part in line.split(": ", 1)[1].split(", ")]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_bad_options_and_data_exit_2_with_one_line(tmp_path):
    result = run("train_mnist.py", "--data-dir", str(tmp_path / "nope"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: --data-dir") and "no such folder" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("train_fashion.py", "--data-dir", str(empty))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "\n" not in result.stderr.strip()
    result = run("train_mnist.py", "--net", "7")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "\n" not in result.stderr.strip()
    result = run("train_mnist.py", "--lr", "-1")
    assert result.returncode == 2 and "must be positive" in result.stderr
    result = run("train_cifar.py", "--net", "4", "--help")  # every option, with network 4's defaults
    assert result.returncode == 0 and all(f"--{o}" in result.stdout for o in ("epochs", "resume", "predict", "impl"))
    result = run("train_mnist.py", "--out", str(tmp_path / "none"), "--predict", "x.png")
    assert result.returncode == 2 and "no checkpoint here" in result.stderr


def test_divergence_stops_with_advice(tmp_path):
    data = tmp_path / "data"
    write_mnist(str(data), n_train=300, n_test=60)
    result = run("train_mnist.py", "--net", "1", "--data-dir", str(data), "--limit", "200",
                 "--out", str(tmp_path / "out"), "--lr", "1e12", "--epochs", "1")
    assert result.returncode == 1 and "try a smaller learning rate" in result.stderr


def test_cifar_net3_end_to_end(tmp_path):
    data = tmp_path / "data"
    write_cifar(str(data), per_batch=30, archive=True)
    out = tmp_path / "out"
    result = run("train_cifar.py", "--net", "3", "--data-dir", str(data / "cifar-10-python.tar.gz"),
                 "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = check_outputs(out)
    assert sum(map(sum, metrics["confusion_matrix"])) == 30


def test_cnn_py_alone_imports_with_numpy_only(tmp_path):
    import shutil
    shutil.copy(os.path.join(HERE, "cnn.py"), tmp_path)
    code = "import sys, cnn; assert 'PIL' not in sys.modules; print(cnn.Conv2D(1, 2, 3))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "Conv2D(1, 2" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "cnn.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.startswith("usage: python cnn.py")


# --------------------------------------------------------------------------- network 4 pieces


def test_whitening_filters_whiten_the_patches():
    rng = np.random.default_rng(12)
    mixing = rng.standard_normal((3, 3))  # correlated channels, and neighbouring pixels via blur
    x = np.einsum("ij,njhw->nihw", mixing, rng.standard_normal((40, 3, 12, 12)))
    x = x + np.roll(x, 1, axis=3)
    import train_cifar
    filters = train_cifar.whitening_filters(x, 2, eps=0.0)
    assert filters.shape == (24, 3, 2, 2)
    assert np.array_equal(filters[12:], -filters[:12])
    conv = cnn.Conv2D(3, 12, 2, bias=False, dtype=np.float64)
    conv.params["W"][:] = filters[:12]
    out = cnn.nhwc(conv.forward(x)).reshape(-1, 12)
    covariance = out.T @ out / len(out)
    assert np.allclose(covariance, np.eye(12), atol=1e-8)


def test_dirac_init_passes_channels_through():
    conv = cnn.Conv2D(3, 5, 3, padding=1, bias=False, dtype=np.float64)
    import train_cifar
    train_cifar.dirac_init(conv)
    x = np.random.default_rng(13).standard_normal((2, 3, 6, 7))
    y = conv.forward(x)
    assert np.array_equal(y[:, :3], x)


def test_frozen_first_layer_gets_no_gradient_and_is_not_updated():
    rng = np.random.default_rng(14)
    whiten = cnn.Conv2D(2, 4, 2, bias=False, dtype=np.float64, rng=rng)
    whiten.trainable = False
    model = cnn.Sequential(whiten, cnn.GELU(), cnn.Conv2D(4, 3, 3, dtype=np.float64, rng=rng),
                           cnn.GlobalMaxPool2D(), cnn.Dense(3, 2, dtype=np.float64, rng=rng))
    assert [name for name, _, _ in model.parameters()] == ["2.Conv2D.W", "2.Conv2D.b", "4.Dense.W", "4.Dense.b"]
    x = rng.standard_normal((2, 2, 7, 7))
    before = whiten.params["W"].copy()
    loss_fn = cnn.SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), np.array([0, 1]))
    # input_grad=False, as training passes it: stops at the first trained layer
    assert model.backward(loss_fn.backward(), input_grad=False) is None
    assert whiten.grads == {}
    grads = {name: layer.grads[key].copy() for name, layer, key in model.parameters()}
    cnn.SGD(model.parameters(), 0.1).step()
    assert np.array_equal(whiten.params["W"], before)
    model.forward(x)  # the same weights as above for the other path
    whiten.params["W"][:] = before
    for name, layer, key in model.parameters():
        layer.params[key] += 0.1 * grads[name]
    model.forward(x)
    dx = model.backward(loss_fn.backward())  # by default, dL/dx too, and the same parameter gradients
    assert dx.shape == x.shape and whiten.grads == {}
    for name, layer, key in model.parameters():
        assert np.allclose(layer.grads[key], grads[name], rtol=1e-12, atol=0), name


def test_lr_scale_does_not_scale_weight_decay():
    layer = cnn.Dense(1, 1, bias=False, dtype=np.float64)
    layer.params["W"][:] = 2.0
    layer.grads["W"] = np.array([[0.5]])
    layer.lr_scale = 10.0
    cnn.SGD([("w", layer, "W")], lr=0.01, weight_decay=0.1).step()
    # step = lr * scale * g + lr * wd * p = 0.01 * 10 * 0.5 + 0.01 * 0.1 * 2
    assert layer.params["W"][0, 0] == pytest.approx(2.0 - 0.05 - 0.002)


def test_warmup_starts_at_initial_fraction():
    s = cnn.warmup_linear_lr(1.0, total_steps=100, warmup=0.2, final_fraction=0.07, initial_fraction=0.2)
    assert s(0) == pytest.approx(0.2 + 0.8 / 20) and s(19) == pytest.approx(1.0) and s(99) == pytest.approx(0.07)


def test_test_time_augmentation_averages_the_mirror_image():
    rng = np.random.default_rng(15)
    model = cnn.Sequential(cnn.Conv2D(3, 4, 3, rng=rng), cnn.ReLU(), cnn.Flatten(), cnn.Dense(4 * 4 * 2, 3, rng=rng))
    images = rng.integers(0, 256, (5, 3, 6, 4)).astype(np.uint8)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    plain = cnn.predict_logits(model, images, mean, std)
    mirrored = cnn.predict_logits(model, images[..., ::-1], mean, std)
    assert np.allclose(cnn.predict_logits(model, images, mean, std, tta=True), (plain + mirrored) / 2, atol=1e-5)


def test_test_time_augmentation_level_2_adds_the_shifted_pairs():
    rng = np.random.default_rng(16)
    model = cnn.Sequential(cnn.Conv2D(3, 4, 3, rng=rng), cnn.ReLU(), cnn.Flatten(), cnn.Dense(4 * 4 * 2, 3, rng=rng))
    images = rng.integers(0, 256, (5, 3, 6, 4)).astype(np.uint8)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    up_left, down_right = padded[:, :, :6, :4], padded[:, :, 2:, 2:]
    assert np.array_equal(up_left[:, :, 1:, 1:], images[:, :, :-1, :-1])  # content moved by one pixel
    pair = [cnn.predict_logits(model, v, mean, std, tta=1) for v in (images, up_left, down_right)]
    expected = 0.5 * pair[0] + 0.25 * (pair[1] + pair[2])
    assert np.allclose(cnn.predict_logits(model, images, mean, std, tta=2), expected, atol=1e-5)
    plain = cnn.predict_logits(model, images, mean, std)  # reused, not recomputed: same numbers
    plain_again = cnn.predict_logits(model, images, mean, std, batch_size=2, tta=2, plain=plain)
    assert np.allclose(plain_again, expected, atol=1e-5)
    assert np.allclose(cnn.predict_logits(model, images, mean, std, tta=2, plain=plain + 4), expected + 1, atol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "loop"])
def test_relu_and_max_pool_commute_with_their_gradients(impl):
    # the scripts apply ReLU after pooling; it must be the very same function and gradient
    rng = np.random.default_rng(17)
    x = rng.integers(-3, 3, (2, 3, 6, 5)).astype(np.float64)  # many ties, all-negative windows
    g = rng.standard_normal((2, 3, 3, 2))
    relu_first = cnn.Sequential(cnn.ReLU(), cnn.MaxPool2D(2, impl=impl))
    pool_first = cnn.Sequential(cnn.MaxPool2D(2, impl=impl), cnn.ReLU())
    assert np.array_equal(relu_first(x), pool_first(x))
    assert np.array_equal(relu_first.backward(g, input_grad=True), pool_first.backward(g, input_grad=True))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc")
def test_keep_freed_memory_lets_a_new_array_reuse_freed_pages():
    import resource

    def page_faults_of_a_fresh_64_mb_array():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(64 << 20, np.uint8)  # every page written
        del a
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    cnn.keep_freed_memory()
    page_faults_of_a_fresh_64_mb_array()  # may still have to grow the heap
    # Without the setting each such array is a fresh mapping: 32 huge or 16,384 small pages.
    assert page_faults_of_a_fresh_64_mb_array() <= 4


@pytest.mark.parametrize("training", [True, False])
def test_split_batch_over_threads_changes_no_number(monkeypatch, training):
    # Real batches are split over the cores; these tiny ones only when SPLIT_MIN is 0.
    # Three uneven parts (1, 2 and 2 images), every layer that splits, and both
    # im2col layouts and both input-gradient routes of Conv2D.  One image per
    # im2col_matmul group, so that its groups are dealt out to the cores as well.
    monkeypatch.setattr(cnn, "CHUNK_BYTES", 1)
    rng = np.random.default_rng(23)
    model = cnn.Sequential(
        cnn.Conv2D(3, 8, 3, padding=1, rng=rng), cnn.MaxPool2D(2), cnn.ReLU(),       # NCHW im2col
        cnn.Conv2D(8, 8, 3, padding=1, bias=False, rng=rng), cnn.BatchNorm2D(8), cnn.GELU(),
        cnn.Conv2D(8, 32, 3, rng=rng), cnn.BatchNorm2D(32, scale=False),              # dx as a sum of taps
        cnn.GlobalMaxPool2D(), cnn.Dense(32, 3, rng=rng))
    x = rng.standard_normal((5, 3, 10, 10)).astype(np.float32)
    g = rng.standard_normal((5, 3)).astype(np.float32)

    def run():
        for layer in model.layers:
            layer.training = training
        y = model(x)
        if not training:
            return [y]
        dx = model.backward(g, input_grad=True)
        return [y, dx] + [a.copy() for layer in model.layers for a in layer.grads.values()]

    one_core = run()
    monkeypatch.setattr(cnn, "SPLIT_MIN", 0)
    monkeypatch.setattr(cnn, "CORES", 3)
    split = run()
    assert len(split) == len(one_core) == (12 if training else 1)
    for a, b in zip(one_core, split):
        assert np.array_equal(a, b)


def lookahead_setup(total_steps):
    layer = cnn.Dense(1, 1, bias=False, dtype=np.float64)
    layer.params["W"][:] = 1.0
    layer.grads["W"] = np.array([[1.0]])
    model = cnn.Sequential(layer)
    return layer, cnn.Lookahead(cnn.SGD(model.parameters(), lr=0.1), model, total_steps, every=2, decay=0.5)


def test_lookahead_pulls_the_weights_to_the_slow_copy():
    layer, opt = lookahead_setup(total_steps=4)
    opt.lr = 0.1
    assert opt.optimizer.lr == 0.1
    opt.step()                                  # fast 0.9, slow 1.0
    assert layer.params["W"][0, 0] == pytest.approx(0.9)
    opt.step()                                  # fast 0.8; d = 0.5 * (2/4)^3 = 1/16
    slow = 1.0 + (1 - 1 / 16) * (0.8 - 1.0)
    assert layer.params["W"][0, 0] == pytest.approx(slow)
    assert opt.state["slow/0.Dense.W"][0, 0] == pytest.approx(slow)
    opt.step()
    opt.step()                                  # last step: d = 0.5, then the model keeps slow
    expected = slow + 0.5 * ((slow - 0.2) - slow)
    assert layer.params["W"][0, 0] == pytest.approx(expected)
    assert opt.state["slow/0.Dense.W"][0, 0] == pytest.approx(expected)


def test_lookahead_state_survives_a_checkpoint(tmp_path):
    layer, opt = lookahead_setup(total_steps=10)
    for _ in range(3):
        opt.step()
    path = str(tmp_path / "m.npz")
    cnn.save_checkpoint(path, cnn.Sequential(layer), opt, {"optimizer_t": opt.t})
    layer2, opt2 = lookahead_setup(total_steps=10)
    cnn.load_checkpoint(path, cnn.Sequential(layer2), opt2)
    assert opt2.t == 3 and opt2.state["slow/0.Dense.W"] == pytest.approx(opt.state["slow/0.Dense.W"])
    assert layer2.params["W"] == pytest.approx(layer.params["W"])


def test_cifar_net4_smoke(tmp_path):
    data = tmp_path / "data"
    write_cifar(str(data), per_batch=30)
    out = tmp_path / "out"
    result = run("train_cifar.py", "--net", "4", "--data-dir", str(data), "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = check_outputs(out)
    assert "without_tta" in metrics and metrics["wall_seconds"] > 0 and metrics["peak_memory_mb"] > 0


def test_val_zero_trains_on_every_image(tmp_path):
    data = tmp_path / "data"
    write_cifar(str(data), per_batch=30)
    out = tmp_path / "out"
    result = run("train_cifar.py", "--net", "3", "--data-dir", str(data), "--epochs", "1", "--val", "0",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "150 training, 0 validation" in result.stderr and "val loss" not in result.stdout + result.stderr
    assert (out / "learning_curve.png").is_file()
    bad = run("train_cifar.py", "--val", "-1", "--data-dir", str(data))
    assert bad.returncode == 2 and "--val: must be zero or more, got -1" in bad.stderr


LAYOUTS = {"NCHW": (0, 1, 2, 3), "channels-last": (0, 2, 3, 1), "channel-major": (1, 0, 2, 3)}


def in_layout(x, layout):
    """The same (N, C, H, W) values with memory in the given axis order."""
    out = cnn.empty_in_order(x.shape, LAYOUTS[layout], x.dtype)
    out[...] = x
    assert cnn.memory_order(out) == LAYOUTS[layout]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("make", [
    lambda rng: cnn.Flatten(), lambda rng: cnn.ReLU(), lambda rng: cnn.MaxPool2D(2),
    lambda rng: cnn.MaxPool2D(3, stride=2),
    lambda rng: cnn.Conv2D(3, 4, 3, padding=1, rng=rng),    # channel-major output, dx as a sum of taps
    lambda rng: cnn.Conv2D(3, 12, 3, rng=rng),              # channels-last output from image rows
    lambda rng: cnn.Conv2D(3, 2, 3, stride=2, rng=rng)],    # dx as a convolution
    ids=["flatten", "relu", "pool2", "pool3s2", "conv3-4", "conv3-12", "conv3-2"])
def test_layers_give_the_same_numbers_in_every_memory_order_and_return_dx_in_the_inputs(make, layout):
    rng = np.random.default_rng(31)
    layer = make(rng)
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    y_ref = layer.forward(x)
    g = rng.standard_normal(y_ref.shape).astype(np.float32)
    dx_ref = layer.backward(g)
    xl = in_layout(x, layout)
    y = layer.forward(xl)
    dx = layer.backward(g)
    assert np.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    assert np.allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
    assert cnn.memory_order(dx) == cnn.memory_order(xl)


def test_conv_with_few_channels_writes_channel_major_memory_and_pooling_keeps_it():
    rng = np.random.default_rng(32)
    conv, pool = cnn.Conv2D(1, 4, 3, rng=rng), cnn.MaxPool2D(2)
    y = conv.forward(rng.standard_normal((2, 1, 8, 8)).astype(np.float32))
    assert cnn.memory_order(y) == LAYOUTS["channel-major"]
    assert cnn.memory_order(pool.forward(y)) == LAYOUTS["channel-major"]
    wide = cnn.Conv2D(1, 16, 3, rng=rng).forward(rng.standard_normal((2, 1, 8, 8)).astype(np.float32))
    assert cnn.memory_order(wide) == LAYOUTS["channels-last"]
    assert cnn.memory_order(pool.forward(wide)) == LAYOUTS["channels-last"]


def test_blas_threads_sets_the_count_and_returns_the_previous_one():
    before = cnn.blas_threads(1)
    if before is None:
        pytest.skip("NumPy here is not built on OpenBLAS")
    try:
        assert cnn.blas_threads(2) == 1
        assert cnn.blas_threads(before) == 2
    finally:
        cnn.blas_threads(before)


def spy_on_in_parallel(monkeypatch):
    """Record the `parts` of every in_parallel call (split_model and split_batch)."""
    calls, real = [], cnn.in_parallel

    def spy(fn, arrays, parts):
        calls.append(parts)
        return real(fn, arrays, parts)
    monkeypatch.setattr(cnn, "in_parallel", spy)
    return calls


def test_train_step_and_predict_split_over_threads_give_the_whole_batchs_numbers(monkeypatch):
    # 7 images in 3 uneven slices (2, 2, 3) on the model and two twins, against
    # one pass over the whole batch: same loss, logits, gradients and predictions.
    if cnn.blas_threads(cnn.blas_threads(1)) is None:
        pytest.skip("NumPy here is not built on OpenBLAS: split_model runs in one piece")
    rng = np.random.default_rng(5)
    model = cnn.Sequential(
        cnn.Conv2D(3, 4, 3, padding=1, rng=rng), cnn.MaxPool2D(2), cnn.ReLU(),
        cnn.Conv2D(4, 6, 3, rng=rng), cnn.ReLU(), cnn.Flatten(),
        cnn.Dense(24, 5, rng=rng), cnn.ReLU(), cnn.Dense(5, 3, rng=rng))
    x = rng.standard_normal((7, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    loss_fn = cnn.SoftmaxCrossEntropy(label_smoothing=0.1)
    blas_before = cnn.blas_threads(1)
    cnn.blas_threads(blas_before)

    meanwhile = []

    def run():
        model.train()
        loss, logits = cnn.train_step(model, loss_fn, x, y, meanwhile=lambda: meanwhile.append(len(calls)))
        grads = [a.copy() for layer in model.layers for a in layer.grads.values()]
        return [loss, logits] + grads + [model.predict(x)]

    calls = spy_on_in_parallel(monkeypatch)
    monkeypatch.setattr(cnn, "CORES", 3)
    split = run()
    assert calls == [3, 3]  # one training step, one prediction batch
    assert meanwhile == [1]  # called once, after the slices ran
    assert cnn.blas_threads(blas_before) == blas_before  # restored after each
    monkeypatch.setattr(cnn, "blas_threads", lambda count: None)  # as without OpenBLAS
    whole = run()
    assert calls == [3, 3] and meanwhile == [1, 2]
    assert len(split) == len(whole) == 2 + 8 + 1
    assert split[0] == pytest.approx(whole[0], rel=1e-6)
    for a, b in zip(split[1:], whole[1:]):
        assert a.shape == b.shape
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_model_with_batchnorm_trains_in_one_piece(monkeypatch):
    # Its statistics are those of the whole batch, so train_step does not split it.
    rng = np.random.default_rng(6)
    model = cnn.Sequential(cnn.Conv2D(1, 2, 3, rng=rng), cnn.BatchNorm2D(2), cnn.Flatten(),
                           cnn.Dense(8, 2, rng=rng))
    x = rng.standard_normal((6, 1, 4, 4)).astype(np.float32)
    calls = spy_on_in_parallel(monkeypatch)
    monkeypatch.setattr(cnn, "CORES", 2)
    cnn.train_step(model, cnn.SoftmaxCrossEntropy(), x, np.array([0, 1, 0, 1, 1, 0]))
    assert calls == []
    # One update (momentum 0.1) with the mean of all six images, not of a slice.
    batch_mean = model.layers[0].forward(x).mean(axis=(0, 2, 3))
    assert np.allclose(model.layers[1].running_mean, 0.1 * batch_mean, rtol=1e-5, atol=1e-8)


def small_model(rng):
    return cnn.Sequential(
        cnn.Conv2D(3, 4, 3, padding=1, rng=rng), cnn.MaxPool2D(2), cnn.ReLU(),
        cnn.Conv2D(4, 6, 3, rng=rng), cnn.ReLU(), cnn.Flatten(),
        cnn.Dense(24, 5, rng=rng), cnn.ReLU(), cnn.Dense(5, 3, rng=rng))


needs_twin = pytest.mark.skipif(not cnn.twin_process_usable(cnn.Sequential()),
                                reason="a TwinProcess needs Linux, 2 cores and OpenBLAS")


@needs_twin
def test_twin_process_gives_the_thread_splits_numbers_with_the_current_weights(monkeypatch):
    # Both split 7 images into 3 + 4 and run each half on one BLAS thread, so the
    # numbers are equal bit for bit.  An SGD step between steps must reach the twin.
    monkeypatch.setattr(cnn, "CORES", 2)
    rng = np.random.default_rng(7)
    model, loss_fn = small_model(rng), cnn.SoftmaxCrossEntropy()
    optimizer = cnn.SGD(model.parameters(), 0.5, momentum=0.9)
    x = rng.standard_normal((9, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 9)
    twin = cnn.TwinProcess(model, loss_fn)
    steps = []
    try:
        for batch in (7, 7, 5, 9):  # 9 > 7: more than the twin's buffers hold, threads take it
            results = []
            for helper in (twin, None):
                loss, logits = cnn.train_step(model, loss_fn, x[:batch], y[:batch], helper)
                results.append([loss, logits] + [a.copy() for layer in model.layers for a in layer.grads.values()])
            steps.append(twin.process)
            with_twin, with_threads = results
            assert len(with_twin) == 2 + 8
            assert with_twin[0] == with_threads[0]
            for a, b in zip(with_twin[1:], with_threads[1:]):
                assert a.shape == b.shape and np.array_equal(a, b)
            optimizer.step()
        assert len(set(steps)) == 1  # one process all along
    finally:
        twin.close()
    assert steps[0].returncode == 0 and twin.exit_code == 0  # it ended when its stdin closed


@needs_twin
def test_twin_process_failure_and_death_are_reported(monkeypatch):
    monkeypatch.setattr(cnn, "CORES", 2)
    rng = np.random.default_rng(8)
    model, loss_fn = small_model(rng), cnn.SoftmaxCrossEntropy()
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    twin = cnn.TwinProcess(model, loss_fn)
    try:
        with pytest.raises(RuntimeError, match="twin training process failed: ValueError: .*label 7 out of range"):
            cnn.train_step(model, loss_fn, x, np.array([0, 1, 2, 0, 1, 7]), twin)  # 7: no such class
        with pytest.raises(ValueError, match="label 7 out of range"):  # this time in this process's half
            cnn.train_step(model, loss_fn, x, np.array([7, 1, 2, 0, 1, 2]), twin)

        def bad_batch():
            raise cnn.DataError("batch.bin: truncated")
        with pytest.raises(cnn.DataError, match="truncated"):  # in what runs meanwhile
            cnn.train_step(model, loss_fn, x, np.array([0, 1, 2, 0, 1, 0]), twin, meanwhile=bad_batch)
        # Both carry on, and the next step reads its own answer, not the failed step's.
        good = np.array([0, 1, 2, 2, 0, 1])  # the twin's half differs from the failed step's
        loss, logits = cnn.train_step(model, loss_fn, x, good, twin)
        grads = [a.copy() for layer in model.layers for a in layer.grads.values()]
        loss_threads, logits_threads = cnn.train_step(model, loss_fn, x, good)
        assert loss == loss_threads and np.array_equal(logits, logits_threads)
        for a, b in zip(grads, (a for layer in model.layers for a in layer.grads.values())):
            assert np.array_equal(a, b)
        twin.process.kill()
        twin.process.wait()
        with pytest.raises(RuntimeError, match="twin training process died"):
            cnn.train_step(model, loss_fn, x, np.array([0, 1, 2, 0, 1, 2]), twin)
    finally:
        twin.close()


@needs_twin
def test_train_epoch_runs_every_step_with_one_twin_and_ends_it(monkeypatch):
    monkeypatch.setattr(cnn, "CORES", 2)
    started, steps = [], []
    real_start, real_step = cnn.TwinProcess._start, cnn.TwinProcess.step

    def start(twin, x, y):
        real_start(twin, x, y)
        started.append(twin)

    def step(twin, x, y, meanwhile):
        steps.append(len(x))
        events.append(f"step of {len(x)}")
        result = real_step(twin, x, y, meanwhile)
        events.append("step done")
        return result

    def logged(batches):
        for i, batch in enumerate(batches):
            events.append(f"batch {i}")
            yield batch
        events.append("no more batches")
    monkeypatch.setattr(cnn.TwinProcess, "_start", start)
    monkeypatch.setattr(cnn.TwinProcess, "step", step)
    rng = np.random.default_rng(9)
    model, loss_fn = small_model(rng), cnn.SoftmaxCrossEntropy()
    images = rng.integers(0, 256, (20, 3, 8, 8)).astype(np.uint8)
    labels = rng.integers(0, 3, 20)
    batches = cnn.iterate_batches(images, labels, 8, np.full(3, 120.0, np.float32), np.full(3, 60.0, np.float32))
    events = []
    at = cnn.new_position()
    with cnn.twin_process(model, loss_fn) as twin:
        ended = cnn.train_epoch(model, loss_fn, cnn.SGD(model.parameters(), 0.1), cnn.constant_lr(0.1),
                                logged(batches), at, 3, cnn.Progress(1, 1, 20), twin=twin)
    assert ended and steps == [8, 8, 4] and at["batch"] == 3 and at["seen"] == 20
    assert math.isfinite(at["loss_sum"]) and 0 <= at["correct"] <= 20
    assert len(started) == 1 and started[0].process is None and started[0].exit_code == 0
    # Each batch is prepared during the step before it, while the twin finishes.
    assert events == ["batch 0", "step of 8", "batch 1", "step done", "step of 8", "batch 2", "step done",
                      "step of 4", "no more batches", "step done"]


def test_cpu_steal_share(monkeypatch):
    monkeypatch.setattr(cnn, "cpu_times", lambda: (30, 1000))
    assert cnn.cpu_steal_since((10, 800)) == pytest.approx(0.1)  # 20 of 200 ticks stolen
    assert cnn.cpu_steal_since(None) is None
    assert cnn.cpu_steal_since((30, 1000)) is None  # no time passed
    monkeypatch.setattr(cnn, "cpu_times", lambda: None)
    assert cnn.cpu_steal_since((10, 800)) is None


@pytest.mark.parametrize("shapes", [((5000, 9), (9, 6)), ((6, 9), (9, 5000)), ((9, 5000), (5000, 6)),
                                    ((7, 3), (3, 2)), ((300, 40), (40, 30))])
def test_thin_matmul_equals_the_plain_product(monkeypatch, shapes):
    # Blocks of at most 1,000 multiply-adds: 18 rows, columns or inner indices at a
    # time for the first three; the last two are too small or too wide to cut.
    monkeypatch.setattr(cnn, "SMALL_MATMUL", 1000)
    rng = np.random.default_rng(12)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    product = cnn.thin_matmul(a, b)
    assert product.shape == (a.shape[0], b.shape[1]) and product.dtype == np.float32
    assert np.allclose(product, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- the three parts


def part_of_each_top_level_name():
    """{name: part number} for everything cnn.py defines at module level, and
    [(part, node)] of its top-level statements, from the 'Part I/II/III' headings."""
    import ast
    source = open(os.path.join(HERE, "cnn.py")).read()
    lines = source.splitlines()
    starts = {part: next(i + 1 for i, line in enumerate(lines) if line.startswith(f"# Part {part},"))
              for part in ("I", "II", "III")}
    number = {"I": 1, "II": 2, "III": 3}

    def part_at(line):
        return max((number[p] for p, start in starts.items() if line >= start), default=0)

    tree = ast.parse(source)
    defined, statements = {}, []
    for node in tree.body:
        part = part_at(node.lineno)
        statements.append((part, node))
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            getattr(node, "targets", []) + ([node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            for name in ([target.name] if hasattr(target, "name") else
                         [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]):
                defined.setdefault(name, part)
    return defined, statements, starts, len(lines)


def test_each_part_uses_only_the_parts_before_it():
    import ast
    defined, statements, starts, total = part_of_each_top_level_name()
    assert starts["I"] < starts["II"] < starts["III"]
    wrong = []
    for part, node in statements:
        for name in ast.walk(node):
            used = name.id if isinstance(name, ast.Name) else None
            if used in defined and defined[used] > part and part > 0:
                wrong.append(f"line {name.lineno}: Part {part} uses {used} (Part {defined[used]})")
    assert wrong == []
    part_one = [node for part, node in statements if part == 1]
    # Part I: no threads, no ctypes, no module-level state beyond constants and definitions
    text = open(os.path.join(HERE, "cnn.py")).read().splitlines()[starts["I"]:starts["II"]]
    assert not any(word in line for line in text for word in ("threading", "ctypes", "multiprocessing", "global "))
    assert all(isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Expr)) for node in part_one)
    # the first part is a textbook: about 1,000 lines, no class over about 100
    assert starts["II"] - starts["I"] < 1050
    assert max(node.end_lineno - node.lineno for node in part_one if isinstance(node, ast.ClassDef)) < 130


def test_part_one_alone_trains_a_small_network(tmp_path):
    # cnn.py cut before Part II: the textbook runs on its own (impl="fast" gives the plain layers)
    source = open(os.path.join(HERE, "cnn.py")).read()
    cut = source.index("# ======================================================================================\n# Part II,")
    (tmp_path / "textbook.py").write_text(source[:cut])
    code = """
import numpy as np, textbook as t
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 1, 8, 8)); y = np.arange(16) % 4
model = t.Sequential(t.Conv2D(1, 6, 3, padding=1, dtype=np.float64, rng=rng), t.BatchNorm2D(6, dtype=np.float64),
                     t.GELU(), t.MaxPool2D(2), t.Flatten(), t.Dense(96, 4, dtype=np.float64, rng=rng))
assert type(model.layers[0]) is t.Conv2D and model.layers[0].impl == "plain" and model.impl == "plain"
loss_fn, opt = t.SoftmaxCrossEntropy(), t.Adam(model.parameters(), 0.01)
first = loss_fn.forward(model(x), y)
for _ in range(100):
    loss = loss_fn.forward(model(x), y); model.backward(loss_fn.backward()); opt.step()
print(first, loss)
assert first > 1.0 and loss < 0.05
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def reference_conv(fast):
    """A Part I (plain) copy of a fast Conv2D, sharing its parameters."""
    plain = cnn.Conv2D(fast.in_channels, fast.out_channels, (fast.kh, fast.kw), fast.stride, fast.padding,
                       impl="plain", dtype=fast.params["W"].dtype)
    plain.params = {k: v.copy() for k, v in fast.params.items()}
    return plain


# (C, F, channels-last input, pool): every layout and dx route, with and without fused pooling
VARIANTS = [(1, 4, False, None, "channel-major", "sum of taps"), (3, 12, False, None, "rows", "sum of taps"),
            (4, 3, True, None, "channels-last", "convolution"), (6, 9, True, None, "channels-last", "sum of taps"),
            (2, 5, False, 2, "channel-major", "sum of taps"), (3, 9, False, 2, "rows", "sum of taps"),
            (9, 4, True, 2, "channels-last", "convolution"), (10, 2, False, 3, "channels-last", "convolution")]


@pytest.mark.parametrize("c,f,channels_last,k,layout,route", VARIANTS)
def test_fast_conv_variants(c, f, channels_last, k, layout, route):
    """Each variant of the fast convolution named at the top of Part II gives Part I's
    numbers: forward, dW, db and dx, alone or with the max pooling fused into it."""
    rng = np.random.default_rng(50)
    fast = cnn.Conv2D(c, f, 3, stride=1, padding=1, dtype=np.float64, rng=rng)
    fast.params["b"][:] = rng.standard_normal(f)
    plain = reference_conv(fast)
    x = rng.standard_normal((3, c, 9, 8))
    if channels_last:
        x = cnn.nchw_view(cnn.nhwc(x))
    assert fast.layout(x) == layout and fast.dx_route() == route
    pool_fast, pool_plain = (cnn.MaxPool2D(k), cnn.MaxPool2D(k, impl="plain")) if k else (None, None)
    net_fast = cnn.Sequential(*[layer for layer in (fast, pool_fast) if layer])
    net_plain = cnn.Sequential(*[layer for layer in (plain, pool_plain) if layer], impl="plain")
    assert list(net_fast.fused_pools()) == ([0] if k else [])
    y_fast, y_plain = net_fast(x), net_plain(x)
    g = rng.standard_normal(y_plain.shape)
    dx_fast, dx_plain = net_fast.backward(g, input_grad=True), net_plain.backward(g, input_grad=True)
    assert rel_error(y_fast, y_plain) < 1e-12 and rel_error(dx_fast, dx_plain) < 1e-12
    for key in plain.grads:
        assert rel_error(fast.grads[key], plain.grads[key]) < 1e-12, key


# --------------------------------------------------------------------------- safe to embed


def test_importing_cnn_changes_nothing_outside_the_module():
    code = """
import os, sys, threading
env, threads = dict(os.environ), threading.active_count()
import cnn
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert threading.active_count() == threads
assert "PIL" not in sys.modules
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_THREAD")}
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def embedding_models():
    """A split model, a model with BatchNorm (run whole), and their input and labels."""
    rng = np.random.default_rng(60)
    split = small_model(rng)
    whole = cnn.Sequential(cnn.Conv2D(3, 16, 3, padding=1, bias=False, rng=rng), cnn.BatchNorm2D(16), cnn.GELU(),
                           cnn.MaxPool2D(2), cnn.Conv2D(16, 8, 3, rng=rng), cnn.ReLU(), cnn.Flatten(),
                           cnn.Dense(8 * 2 * 2, 3, rng=rng))
    x = rng.standard_normal((24, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    return [split, whole], x, y


def run_model(model, x, y, steps=3):
    """Training steps (SGD) then a prediction: every number they produce."""
    loss_fn = cnn.SoftmaxCrossEntropy()
    optimizer = cnn.SGD(model.parameters(), 0.05, momentum=0.9)
    out = []
    for _ in range(steps):
        model.train()
        loss, logits = cnn.train_step(model, loss_fn, x, y)
        optimizer.step()
        out += [loss, logits.copy()]
    return out + [model.predict(x)] + [a.copy() for a in model.state_arrays().values()]


def test_models_in_several_threads_at_once_give_each_ones_numbers_alone():
    import copy
    models, x, y = embedding_models()
    alone = [run_model(copy.deepcopy(m), x, y) for m in models]
    blas_before = cnn.blas_threads(None)
    for attempt in range(3):
        copies = [copy.deepcopy(m) for m in models for _ in range(2)]  # two of each, four threads
        results, errors = [None] * len(copies), []
        barrier = threading.Barrier(len(copies))

        def work(i):
            try:
                barrier.wait()
                results[i] = run_model(copies[i], x, y)
            except BaseException as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(copies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a thread hangs"
        assert errors == []
        for i, result in enumerate(results):
            expected = alone[i // 2]
            assert len(result) == len(expected)
            for a, b in zip(result, expected):
                assert np.array_equal(a, b)
    assert cnn.blas_threads(None) == blas_before


def test_a_process_forked_after_a_layer_ran_can_run_layers():
    import multiprocessing
    models, x, y = embedding_models()
    for model in models:
        run_model(model, x, y, steps=1)  # the helper threads and OpenBLAS settings now exist
    expected = [m.predict(x) for m in models]
    queue = multiprocessing.get_context("fork").Queue()

    def child():
        queue.put([m.predict(x) for m in models] + [run_model(models[0], x, y, steps=1)[0]])
    process = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    process.start()
    process.join(60)
    if process.is_alive():
        process.kill()
    assert process.exitcode == 0, "the child hung or failed"
    got = queue.get(timeout=5)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected)) and math.isfinite(got[-1])


def test_openblas_thread_count_is_restored_after_every_call():
    before = cnn.blas_threads(None)
    if before is None:
        pytest.skip("NumPy here is not built on OpenBLAS")
    models, x, y = embedding_models()
    for model in models:
        run_model(model, x, y, steps=1)
        assert cnn.blas_threads(None) == before
        with pytest.raises(ValueError, match="out of range"):
            cnn.train_step(model, cnn.SoftmaxCrossEntropy(), x, np.full(24, 9))
        assert cnn.blas_threads(None) == before
    cnn.blas_threads(1)  # whatever the caller chose is what it finds afterwards
    try:
        models[0].predict(x)
        assert cnn.blas_threads(None) == 1
    finally:
        cnn.blas_threads(before)


def test_work_arrays_do_not_grow_with_the_number_of_caller_threads():
    import tracemalloc
    model = cnn.Sequential(cnn.Conv2D(16, 32, 3, padding=1), cnn.ReLU(), cnn.Flatten(),
                           cnn.Dense(32 * 16 * 16, 2))
    x = np.random.default_rng(61).standard_normal((8, 16, 16, 16)).astype(np.float32)
    x = cnn.nchw_view(cnn.nhwc(x))  # channels-last: the conv uses this thread's work arrays

    def in_new_thread():
        t = threading.Thread(target=lambda: model.predict(x))
        t.start()
        t.join()
    for _ in range(5):  # every helper thread (an earlier test may have started more) has its work arrays
        in_new_thread()
    tracemalloc.start()
    try:
        in_new_thread()
        after_one = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            in_new_thread()
        after_many = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after_many - after_one < 200_000  # one im2col piece alone is about 1 MB


def test_cores_1_turns_the_engines_own_parallelism_off(monkeypatch):
    calls = spy_on_in_parallel(monkeypatch)
    monkeypatch.setattr(cnn, "CORES", 1)
    monkeypatch.setattr(cnn, "SPLIT_MIN", 0)
    monkeypatch.setattr(cnn, "CHUNK_BYTES", 1)
    threads = threading.active_count()
    models, x, y = embedding_models()
    for model in models:
        run_model(model, x, y, steps=1)
        assert not cnn.twin_process_usable(model)
    assert all(parts == 1 for parts in calls) and threading.active_count() == threads


def test_only_the_training_loop_starts_a_twin_process(monkeypatch, tmp_path):
    import multiprocessing
    starts = []
    real_start = cnn.TwinProcess._start
    monkeypatch.setattr(cnn.TwinProcess, "_start", lambda twin, x, y: (starts.append(1), real_start(twin, x, y)))
    models, x, y = embedding_models()
    for model in models:
        run_model(model, x, y, steps=2)  # layers, Sequential, train_step and predict
    assert starts == [] and multiprocessing.active_children() == []
    if cnn.twin_process_usable(models[0]):
        images = np.random.default_rng(62).integers(0, 256, (40, 3, 8, 8)).astype(np.uint8)
        labels = np.arange(40) % 3
        mean, std = np.full(3, 120, np.float32), np.full(3, 60, np.float32)
        cnn.fit(models[0], cnn.SoftmaxCrossEntropy(), cnn.SGD(models[0].parameters(), 0.05), cnn.constant_lr(0.05),
                (images, labels), (images[:0], labels[:0]), mean, std, epochs=2, batch_size=16, log=lambda s: None)
        assert starts == [1]  # one for the whole fit, ended with it
        assert multiprocessing.active_children() == []


def test_bench_and_gradcheck_run_with_cnn_py_alone(tmp_path):
    import shutil
    shutil.copy(os.path.join(HERE, "cnn.py"), tmp_path)
    result = subprocess.run([sys.executable, "cnn.py", "bench", "--quick"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("net2", "net3", "net4"):
        assert f"  {name} N=4 " in result.stdout
        total = re.search(rf"  {name} N=4 +all its convolutions, as in training +([0-9.]+) +([0-9]+)%", result.stdout)
        assert total and float(total[1]) > 0 and int(total[2]) > 0, result.stdout
    assert "Conv2D(24, 64, (3, 3)" in result.stdout and "bench took" in result.stdout
    result = subprocess.run([sys.executable, "cnn.py", "gradcheck"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "Conv2D(3, 4, (3, 3)" in line]
    assert [row.split()[6] for row in rows] == ["loop", "plain", "fast"]
    errors = [float(word) for line in result.stdout.splitlines()[1:-2] for word in line.split()
              if word[:1].isdigit() and "e-" in word]
    assert len(errors) > 40 and max(errors) < 1e-7 and "all agree" in result.stdout


def test_gradcheck_finds_a_wrong_backward():
    class WrongReLU(cnn.ReLU):
        def _backward(self, grad):
            return grad * (self.y > 0) * 1.01  # 1 % off
    x = away_from_zero((2, 3, 4, 4), seed=5)
    assert cnn.check_gradients(cnn.ReLU(), x)["x"] < 1e-8
    assert 0.004 < cnn.check_gradients(WrongReLU(impl="plain"), x)["x"] < 0.006
    layer = cnn.Dense(12, 3)  # float32 layer: checked in float64, the layer itself unchanged
    before = layer.params["W"].copy()
    errors = cnn.check_gradients(layer, away_from_zero((4, 12), seed=6))
    assert set(errors) == {"x", "W", "b"} and max(errors.values()) < 1e-8
    assert layer.params["W"].dtype == np.float32 and np.array_equal(layer.params["W"], before)


def conv_shapes(model):
    """(out channels, kernel, padding, pooling after it) of each convolution of model."""
    layers = model.layers
    return [(conv.out_channels, conv.kh, conv.padding,
             layers[i + 1].k if i + 1 < len(layers) and isinstance(layers[i + 1], cnn.MaxPool2D) else 0)
            for i, conv in enumerate(layers) if isinstance(conv, cnn.Conv2D)]


def test_the_bench_times_the_scripts_networks_shapes():
    import train_cifar
    import train_mnist
    rng = np.random.default_rng(0)
    networks = {"net2": train_mnist.network2(rng), "net3": train_cifar.network3(rng),
                "net4": train_cifar.network4(rng)}
    for name, batch, shape, convolutions in cnn.BENCH_SHAPES:
        assert conv_shapes(networks[name]) == convolutions, name


@pytest.mark.parametrize("script,args", [("train_mnist.py", ["--net", "2"]), ("train_cifar.py", ["--net", "4"])])
def test_scripts_bench_their_own_network(script, args):
    result = run(script, *args, "--bench", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert re.search(r"batch 4: training [\d,]+ images/s \([\d.]+ s per epoch of [\d,]+ images\), "
                     r"inference [\d,]+ images/s", result.stdout), result.stdout


def test_readme_example_runs(tmp_path):
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme[readme.index("## Use the layers in your own code"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    assert 12 <= len(code.strip().splitlines()) <= 25
    write_mnist(str(tmp_path / "data" / "mnist"), n_train=640, n_test=100)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=HERE), timeout=120)
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.8  # the generated digits are bars whose place is the label


# --------------------------------------------------------------------------- every input checked


def test_the_loss_checks_its_labels():
    loss_fn, logits = cnn.SoftmaxCrossEntropy(), np.zeros((3, 4), np.float32)
    for labels, message in [(np.array([[0], [1], [2]]), r"labels must be 1-D integers, got int64 \(3, 1\)"),
                            (np.array([0.0, 1.0, 2.0]), "labels must be 1-D integers, got float64"),
                            (np.array([0, 1]), "2 labels for 3 rows of logits"),
                            (np.array([0, -1, 2]), r"label -1 out of range for 4 classes \(0..3\)"),
                            (np.array([0, 4, 2]), "label 4 out of range for 4 classes")]:
        with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy\(label_smoothing=0.0\): " + message):
            loss_fn.forward(logits, labels)
    assert loss_fn.forward(logits, np.array([0, 3, 2], np.uint8)) == pytest.approx(math.log(4))


@pytest.mark.parametrize("impl", ["plain", "fast"])
def test_backward_needs_a_training_forward_and_a_gradient_of_the_output_shape(impl):
    rng = np.random.default_rng(70)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    for layer in [cnn.Conv2D(3, 4, 3, impl=impl), cnn.MaxPool2D(2, impl=impl), cnn.ReLU(impl=impl),
                  cnn.GELU(impl=impl), cnn.BatchNorm2D(3, impl=impl), cnn.Flatten(impl=impl)]:
        with pytest.raises(RuntimeError, match=rf"{re_escape(layer)}: backward\(\) needs a forward\(\) in training mode first"):
            layer.backward(np.zeros((2, 3, 6, 6), np.float32))
        y = layer.forward(x)
        layer.training = False
        layer.forward(x)  # evaluation mode keeps nothing: backward would use an older batch
        with pytest.raises(RuntimeError, match="needs a forward"):
            layer.backward(np.zeros_like(y))
        layer.training = True
        layer.forward(x)
        with pytest.raises(ValueError, match=rf"{re_escape(layer)}: gradient of shape \(1, 2\), but the last output "
                                             rf"had shape {re_escape(y.shape)}"):
            layer.backward(np.zeros((1, 2), np.float32))
        assert layer.backward(np.ones_like(y)).shape == x.shape


def re_escape(value):
    import re
    return re.escape(repr(value) if not isinstance(value, tuple) else str(value))


def test_integer_input_is_refused_by_every_layer():
    x = np.zeros((2, 3, 6, 6), np.uint8)
    layers = [cnn.Conv2D(3, 4, 3), cnn.Conv2D(3, 16, 3, impl="plain"), cnn.Conv2D(3, 4, 3, impl="loop"),
              cnn.MaxPool2D(2), cnn.MaxPool2D(2, impl="loop"), cnn.ReLU(), cnn.GELU(), cnn.BatchNorm2D(3),
              cnn.Flatten(), cnn.GlobalMaxPool2D(), cnn.Scale(2.0), cnn.Dense(108, 2)]
    for layer in layers:
        given = x.reshape(2, -1) if isinstance(layer, cnn.Dense) else x
        with pytest.raises(TypeError, match=rf"{re_escape(layer)}: input must be floating-point, got uint8 "
                                            r"\(convert integer images to float first"):
            layer.forward(given)
    with pytest.raises(TypeError, match="got int64"):
        cnn.Sequential(cnn.Conv2D(1, 2, 3)).predict(np.zeros((1, 1, 5, 5), np.int64))


def test_optimizers_take_model_parameters():
    model = cnn.Sequential(cnn.Dense(3, 2))
    for make in (lambda p: cnn.SGD(p, 0.1), lambda p: cnn.Adam(p)):
        make(model.parameters())
        for wrong, kind in [([model.layers[0].params["W"]], "an item of type ndarray"), (model, "Sequential"),
                            ([("W", 1)], "an item of type tuple")]:
            with pytest.raises(TypeError, match=r"(SGD|Adam): expects model.parameters\(\), a list of "
                                                rf"\(name, layer, key\); got {kind}$"):
                make(wrong)


def make_checkpoint(folder, net=2):
    """A model.npz for train_mnist.py --net NET, as training writes it."""
    os.makedirs(folder, exist_ok=True)
    model = mnist_network(net, np.random.default_rng(0))
    meta = dict(mean=[33.0], std=[60.0], classes=[str(i) for i in range(10)], input_shape=[1, 28, 28],
                position=cnn.new_position(1), history=[], options={})
    cnn.save_checkpoint(os.path.join(folder, "model.npz"), model,
                        cnn.SGD(model.parameters(), 0.1, momentum=0.9), meta)
    return os.path.join(folder, "model.npz")


def one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_damaged_or_foreign_model_files_are_one_line_for_predict_and_resume(tmp_path):
    data = tmp_path / "data"
    write_mnist(str(data), n_train=120, n_test=20)
    good = make_checkpoint(str(tmp_path / "good"))
    content = open(good, "rb").read()
    cases = {"truncated": content[:len(content) // 2], "not a zip": b"this is not a model file\n"}
    for name, data_bytes in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.npz").write_bytes(data_bytes)
    (tmp_path / "pickled").mkdir()
    np.savez(tmp_path / "pickled" / "model.npz", **{"model/0.Conv2D.W": np.array([{"x": 1}], dtype=object)})
    (tmp_path / "text").mkdir()
    np.savez(tmp_path / "text" / "model.npz", **{"model/0.Conv2D.W": np.array(["abc"])})
    make_checkpoint(str(tmp_path / "net1"), net=1)
    (tmp_path / "digit.png").write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    expected = {"truncated": "not a model file (not an .npz archive: cut short, or another kind of file)",
                "not a zip": "not a model file (not an .npz archive",
                "pickled": "not a model file of ours (it holds pickled objects, which are never loaded)",
                "text": "not a model file of ours (model/0.Conv2D.W holds <U3, not numbers)",
                "net1": "made for another network", "missing": "no checkpoint here"}
    for name, words in expected.items():
        path = str(tmp_path / name / "model.npz")
        common = ["--net", "2", "--out", str(tmp_path / name)]
        one_line_error(run("train_mnist.py", *common, "--predict", str(tmp_path / "digit.png")), path, words)
        one_line_error(run("train_mnist.py", *common, "--resume", "--data-dir", str(data), "--limit", "100"),
                       path, words)


def png_bytes(pixels):
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_reports_each_bad_image_after_the_good_ones(tmp_path):
    import struct
    import zlib
    out = tmp_path / "out"
    make_checkpoint(str(out))
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(np.full((40, 30), 255, np.uint8)))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    huge = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))  # a header claiming 6000 x 6000 pixels
    huge[16:24] = struct.pack(">II", 6000, 6000)
    huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])))
    (tmp_path / "huge.png").write_bytes(bytes(huge))
    files = [str(tmp_path / "missing.png"), str(good), str(garbage), str(tmp_path / "huge.png")]
    result = run("train_mnist.py", "--net", "2", "--out", str(out), "--predict", *files)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines()[0].startswith(str(good) + ": ")  # the good one is printed
    errors = result.stderr.strip().splitlines()
    assert errors[0] == f"error: {tmp_path / 'missing.png'}: file not found"
    assert errors[1].startswith(f"error: {garbage}: cannot read this image")
    assert errors[2] == f"error: {tmp_path / 'huge.png'}: 6000 x 6000 pixels, too large to decode (at most 33,554,432 pixels)"
    assert len(errors) == 3


def test_the_output_folder_is_checked_before_any_data_is_loaded(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    result = run("train_mnist.py", "--out", str(taken), "--data-dir", str(tmp_path / "no-data-here"))
    one_line_error(result, f"--out {taken}: is a file, not a folder")
    result = run("train_mnist.py", "--out", str(taken / "below"), "--data-dir", str(tmp_path / "no-data-here"))
    one_line_error(result, f"--out {taken / 'below'}: {taken} is a file, not a folder")
    result = run("train_mnist.py", "--out", str(tmp_path / "new" / "out"), "--data-dir", str(tmp_path / "no-data"))
    one_line_error(result, "--data-dir")
    assert not (tmp_path / "new").exists()  # a run that fails leaves no empty folder behind


def test_images_of_the_wrong_size_are_refused_when_they_load(tmp_path):
    data = tmp_path / "data"
    write_mnist(str(data), n_train=50, n_test=10)
    cnn.write_idx(str(data / "train-images-idx3-ubyte.gz"), np.zeros((50, 32, 32), np.uint8))
    with pytest.raises(cnn.DataError, match=r"train-images-idx3-ubyte.gz: expected 28 x 28 images \(MNIST format\), got 32 x 32"):
        cnn.load_mnist(str(data), "train")
    result = run("train_mnist.py", "--data-dir", str(data), "--out", str(tmp_path / "out"))
    one_line_error(result, "expected 28 x 28 images")


# --------------------------------------------------------------------------- exact resume

INTERRUPTING_RUN = """
import os, signal, sys
sys.path.insert(0, {here!r})
import cnn, train_mnist
at_step, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
real, count = cnn.train_step, [0]
def train_step(*args, **kwargs):  # a real signal to this process, in the middle of a step
    count[0] += 1
    if count[0] == at_step:
        os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
cnn.train_step = train_step
train_mnist.main(sys.argv[3:])
"""


def interrupted(at_step, signal_name, *args):
    code = INTERRUPTING_RUN.format(here=HERE)
    return subprocess.run([sys.executable, "-c", code, str(at_step), signal_name, *args],
                          capture_output=True, text=True, timeout=300)


def everything_saved(out):
    with np.load(out / "model.npz") as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
    metrics = json.loads((out / "metrics.json").read_text())
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in metrics["history"]]
    return arrays, history, metrics["test_loss"], metrics["test_accuracy"]


def assert_same_run(a, b):
    arrays_a, *rest_a = a
    arrays_b, *rest_b = b
    assert sorted(arrays_a) == sorted(arrays_b)
    for key in arrays_a:
        assert np.array_equal(arrays_a[key], arrays_b[key]), key
    assert rest_a == rest_b


@pytest.mark.parametrize("signal_name,at_step", [("SIGINT", 17), ("SIGKILL", 30)])
def test_an_interrupted_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, signal_name, at_step):
    # 180 training images in batches of 16: 12 steps an epoch.  Ctrl-C in step 17
    # (epoch 2) saves the exact position; SIGKILL in step 30 (epoch 3) leaves the
    # checkpoint of the end of epoch 2.
    data = tmp_path / "data"
    write_mnist(str(data), n_train=300, n_test=60)
    common = ["--net", "2", "--data-dir", str(data), "--limit", "200", "--batch-size", "16", "--epochs", "3"]
    whole = run("train_mnist.py", *common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = str(tmp_path / "cut")
    first = interrupted(at_step, signal_name, *common, "--out", out)
    if signal_name == "SIGINT":
        assert first.returncode == 130 and "interrupted: saved" in first.stderr, first.stderr
        position = cnn.load_checkpoint(os.path.join(out, "model.npz"), mnist_network(2))["position"]
        assert (position["epoch"], position["batch"], position["seen"]) == (1, 5, 80)
        expected = "after epoch 1, step 5 of epoch 2"
    else:
        assert first.returncode == -9 and "epoch   2/3" in first.stdout and "epoch   3/3" not in first.stdout
        expected = "after epoch 2"
    resumed = run("train_mnist.py", *common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out}/model.npz {expected}" in resumed.stderr
    assert_same_run(everything_saved(tmp_path / "whole"), everything_saved(tmp_path / "cut"))


def test_fit_with_adam_and_lookahead_resumes_exactly_after_ctrl_c(tmp_path):
    import signal
    rng = np.random.default_rng(80)
    images = rng.integers(0, 256, (60, 3, 8, 8)).astype(np.uint8)
    labels = np.arange(60) % 3
    mean, std = cnn.channel_stats(images)
    augment = dict(crop=2, flip="random")

    def setup():
        model = small_model(np.random.default_rng(81))
        optimizer = cnn.Lookahead(cnn.Adam(model.parameters(), 0.01), model, total_steps=3 * 4, every=2)
        return model, optimizer

    def train(model, optimizer, schedule, checkpoint, **kwargs):
        return cnn.fit(model, cnn.SoftmaxCrossEntropy(0.1), optimizer, schedule, (images, labels),
                       (images[:10], labels[:10]), mean, std, epochs=3, batch_size=16, seed=5, augment=augment,
                       checkpoint=str(checkpoint), log=lambda line: None, **kwargs)

    model, optimizer = setup()
    history = train(model, optimizer, cnn.cosine_lr(0.01, 12), tmp_path / "whole.npz")
    whole = [a.copy() for a in model.state_arrays().values()]

    def ctrl_c_in_step_6(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return cnn.cosine_lr(0.01, 12)(step)
    model, optimizer = setup()
    with pytest.raises(KeyboardInterrupt):
        train(model, optimizer, ctrl_c_in_step_6, tmp_path / "cut.npz")
    model, optimizer = setup()
    meta = cnn.load_checkpoint(str(tmp_path / "cut.npz"), model, optimizer)
    assert meta["position"]["epoch"] == 1 and meta["position"]["batch"] == 3 and optimizer.t == 7
    resumed = train(model, optimizer, cnn.cosine_lr(0.01, 12), tmp_path / "cut.npz",
                    position=meta["position"], history=meta["history"])
    assert [a for a in model.state_arrays().values()] and all(
        np.array_equal(a, b) for a, b in zip(model.state_arrays().values(), whole))
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed] == strip


def test_im2col_is_the_textbook_matrix_and_col2im_its_adjoint():
    x = np.arange(2 * 2 * 3 * 3, dtype=np.float64).reshape(2, 2, 3, 3)
    cols = cnn.im2col(x, 2, 2)
    assert cols.shape == (2 * 2 * 2, 2 * 2 * 2)
    # row (n=0, i=0, j=1): channel 0's window [[1, 2], [4, 5]], then channel 1's [[10, 11], [13, 14]]
    assert cols[1].tolist() == [1, 2, 4, 5, 10, 11, 13, 14]
    rng = np.random.default_rng(90)
    for stride, padding in [(1, 0), (2, 1), (1, 2)]:
        x = rng.standard_normal((2, 3, 7, 6))
        cols = cnn.im2col(x, 3, 2, stride, padding)
        c = rng.standard_normal(cols.shape)
        # <im2col(x), c> = <x, col2im(c)>: col2im is the adjoint (transpose) of im2col
        assert np.sum(cols * c) == pytest.approx(np.sum(x * cnn.col2im(c, x.shape, 3, 2, stride, padding)), rel=1e-12)


# --------------------------------------------------------------------------- the scripts and Part I as a textbook


def test_a_recipe_with_an_unknown_key_or_value_is_refused():
    recipe = dict(epochs=1, batch_size=8, lr=0.1, nestrov=True)
    with pytest.raises(ValueError, match=r"recipe: unknown key 'nestrov'; the known keys are epochs, .*nesterov"):
        cnn.parse_options("", {None: recipe}, [])
    with pytest.raises(ValueError, match=r"recipe: schedule must be one of \('constant', 'cosine', "
                                         r"'warmup_linear'\), got 'cosin'"):
        cnn.check_recipe(dict(schedule="cosin"))
    import train_cifar
    import train_fashion
    import train_mnist
    for recipe in list(train_mnist.RECIPES.values()) + list(train_cifar.RECIPES.values()) + [train_fashion.RECIPE]:
        cnn.check_recipe(recipe)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.npz"
    cnn.save_npz(str(path), {"a": np.arange(3)})
    before = path.read_bytes()

    class Unsavable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        cnn.save_npz(str(path), {"a": np.arange(5), "b": Unsavable()})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.npz"]
    with cnn.atomic_write(str(tmp_path / "new.json"), "w") as f:
        f.write("{}")
        assert not (tmp_path / "new.json").exists()  # only once the block ends
    assert (tmp_path / "new.json").read_text() == "{}"


def test_cores_follow_the_affinity_and_the_containers_quota(tmp_path, monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity here")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cnn.usable_cores(str(tmp_path)) == 4  # no quota files
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cnn.usable_cores(str(tmp_path)) == 4
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 cores
    assert cnn.usable_cores(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cnn.usable_cores(str(tmp_path)) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cnn.usable_cores(str(tmp_path)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cnn.usable_cores(str(tmp_path)) == 1


def test_the_scripts_define_their_networks_and_read_top_to_bottom():
    import ast
    for script in ("train_mnist.py", "train_fashion.py", "train_cifar.py"):
        source = open(os.path.join(HERE, script)).read()
        assert len(source.splitlines()) <= 150, script
        tree = ast.parse(source)
        calls = [node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                 and node.func.value.id == "cnn"]
        steps = ["parse_options", "load_data", "build_model", "train", "test", "write_outputs"]
        assert [call for call in calls if call in steps] == steps, script
        assert "Sequential(" in source and "Conv2D(" in source, script
    for name in ("mnist_network", "cifar_network4", "init4", "run_script", "random_crop", "HasFastVersion",
                 "twin_of", "whitening_filters", "FastDense"):
        assert not hasattr(cnn, name), name


def test_part_one_has_no_hooks_of_the_later_parts():
    defined, statements, starts, total = part_of_each_top_level_name()
    text = "\n".join(open(os.path.join(HERE, "cnn.py")).read().splitlines()[starts["I"]:starts["II"]])
    for word in ("airbench", "**options", "cnn.normalize", "train_step", "iterate_batches", "__new__",
                 "__subclasses__", 'getattr(layer, "'):
        assert word not in text, word
    for attribute in ("trainable", "lr_scale", "buffer_names", "training"):
        assert hasattr(cnn.Layer, attribute) and f"    {attribute} = " in text, attribute


# --------------------------------------------------------------------------- the engine inside real programs

def run_code(code, timeout=120):
    """Run code in a fresh Python that imports cnn from here; returns its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONPATH=HERE))
    assert result.returncode == 0, result.stderr
    return result.stdout


FIT_SMALL = """
import numpy as np, cnn
def fit_small(epochs=2, seed=0):
    rng = np.random.default_rng(seed)
    model = cnn.Sequential(cnn.Conv2D(3, 8, 3, padding=1, rng=rng), cnn.MaxPool2D(2), cnn.ReLU(),
                           cnn.Flatten(), cnn.Dense(8 * 4 * 4, 3, rng=rng))
    images = rng.integers(0, 256, (64, 3, 8, 8)).astype(np.uint8)
    labels = rng.integers(0, 3, 64)
    mean, std = np.full(3, 120, np.float32), np.full(3, 60, np.float32)
    history = cnn.fit(model, cnn.SoftmaxCrossEntropy(), cnn.SGD(model.parameters(), 0.05, momentum=0.9),
                      cnn.constant_lr(0.05), (images, labels), (images[:0], labels[:0]), mean, std,
                      epochs=epochs, batch_size=16, log=lambda line: None)
    return [h["train_loss"] for h in history] + [float(np.abs(model.predict(cnn.normalize(images, mean, std))).sum())]
"""


def test_fit_never_forks_and_does_not_hang_beside_a_thread_in_openblas():
    # A fork while another thread is inside OpenBLAS hangs in OpenBLAS's fork handler:
    # the twin process is started without os.fork, whatever the program's threads do.
    code = FIT_SMALL + """
import os, threading
def no_fork():
    raise AssertionError("os.fork called")
os.fork = no_fork
stop = threading.Event()
def multiply():
    a = np.ones((1024, 1024), np.float32)
    while not stop.is_set():
        a @ a
thread = threading.Thread(target=multiply)
thread.start()
try:
    print(fit_small())
finally:
    stop.set()
    thread.join()
"""
    busy = run_code(code, timeout=120)
    alone = run_code(FIT_SMALL + "print(fit_small())")
    assert busy == alone and len(eval(busy)) == 3


def test_a_child_forked_inside_one_blas_thread_starts_with_a_clean_engine():
    code = """
import os, numpy as np, cnn
rng = np.random.default_rng(1)
model = cnn.Sequential(cnn.Conv2D(3, 16, 3, padding=1, rng=rng), cnn.ReLU(), cnn.Flatten(), cnn.Dense(16 * 64, 4, rng=rng))
x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
before = cnn.blas_threads(None)
expected = model.predict(x)
with cnn.one_blas_thread():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        state = (cnn._local.blas_held, cnn.blas_threads(None), bool(np.array_equal(model.predict(x), expected)),
                 cnn.blas_threads(None))
        os.write(write, repr(state).encode())
        os._exit(0)
    os.close(write)
    child = eval(os.read(read, 1000).decode())
    os.waitpid(pid, 0)
print(before, child, cnn.blas_threads(None))
"""
    words = run_code(code).strip()
    before = int(words.split()[0])
    assert words == f"{before} (False, {before}, True, {before}) {before}"


CTRL_C_STORM = FIT_SMALL + """
import signal, threading
clean = fit_small()
rng = np.random.default_rng(2)
model = cnn.Sequential(cnn.Conv2D(3, 16, 3, padding=1, rng=rng), cnn.ReLU(), cnn.Flatten(), cnn.Dense(16 * 64, 4, rng=rng))
x = rng.standard_normal((256, 3, 8, 8)).astype(np.float32)
y = rng.integers(0, 4, 256)
before, caught = cnn.blas_threads(None), 0
def interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, interrupt)
import time
start = time.perf_counter()
cnn.train_step(model, cnn.SoftmaxCrossEntropy(), x, y)
model.predict(x)
delays = np.random.default_rng(3).uniform(0, 1.2 * (time.perf_counter() - start), 100000)
for delay in delays:  # a Ctrl-C at a random moment of a training step or a prediction
    try:
        signal.setitimer(signal.ITIMER_REAL, delay)
        cnn.train_step(model, cnn.SoftmaxCrossEntropy(), x, y)
        model.predict(x)
        signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        caught += 1
        if caught == 300:
            break
model.predict(x)  # the next call into the engine repairs what an interrupted one left
threads = set()
import time
cnn.in_parallel(lambda i, part: (time.sleep(0.05), threads.add(threading.get_ident())), [np.zeros(2)], 2)
print(caught, cnn.blas_threads(None) == before, len(threads), fit_small() == clean, cnn.blas_threads(None) == before)
"""


def test_after_a_storm_of_caught_ctrl_c_the_engine_runs_as_before():
    if not hasattr(signal_module(), "setitimer"):
        pytest.skip("no setitimer here")
    assert run_code(CTRL_C_STORM, timeout=240).split() == ["300", "True", "2", "True", "True"]


def signal_module():
    import signal
    return signal


def test_ctrl_c_while_waiting_for_a_helper_thread_loses_no_helper():
    code = """
import signal, threading, time, numpy as np, cnn
def interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, interrupt)
def slices(i, part):
    time.sleep(0.2 if i else 0.01)
    return threading.get_ident()
caught = 0
for _ in range(3):
    signal.setitimer(signal.ITIMER_REAL, 0.05)  # while this thread waits for the helper's slice
    try:
        cnn.in_parallel(slices, [np.zeros(2)], 2)
    except KeyboardInterrupt:
        caught += 1
print(caught, len(set(cnn.in_parallel(slices, [np.zeros(2)], 2))))
"""
    assert run_code(code).split() == ["3", "2"]


def test_predict_in_threads_writes_nothing_to_a_model_in_training():
    rng = np.random.default_rng(70)
    model = cnn.Sequential(cnn.Conv2D(3, 8, 3, padding=1, bias=False, rng=rng), cnn.BatchNorm2D(8), cnn.ReLU(),
                           cnn.Flatten(), cnn.Dense(8 * 64, 3, rng=rng))
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    model.forward(x)  # training mode: BatchNorm statistics and saved arrays
    state = {k: v.copy() for k, v in model.state_arrays().items()}
    saved = model.layers[1].xhat
    expected = model.predict(x)
    results = [None] * 6

    def predict(i):
        results[i] = [model.predict(x) for _ in range(5)]
    threads = [threading.Thread(target=predict, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(layer.training for layer in model.layers) and model.layers[1].xhat is saved
    assert all(np.array_equal(state[k], v) for k, v in model.state_arrays().items())
    assert all(np.array_equal(p, expected) for r in results for p in r)
    model.eval()
    assert np.allclose(model.forward(x), expected, rtol=1e-5, atol=1e-6)  # one piece, not split


def test_one_model_trained_from_two_threads_at_once_is_refused():
    rng = np.random.default_rng(71)
    model = small_model(rng)
    x, y = rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, 8)
    loss_fn = cnn.SoftmaxCrossEntropy()
    model.forward(x)  # this thread is between a forward and its backward
    errors = []

    def other():
        try:
            model.forward(x)
        except RuntimeError as e:
            errors.append(str(e))
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "another thread is in the middle of a training step" in errors[0]
    model.backward(np.ones((8, 3), np.float32))  # the step ends: another thread may train now
    t = threading.Thread(target=lambda: cnn.train_step(model, loss_fn, x, y))
    t.start()
    t.join()
    assert len(errors) == 1


def test_two_fits_in_two_threads_give_each_ones_numbers_alone():
    code = FIT_SMALL + """
import threading
alone = [fit_small(seed=s) for s in (0, 1)]
results = [None, None]
def run(i):
    results[i] = fit_small(seed=i)
threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
for t in threads: t.start()
for t in threads: t.join()
print(results == alone)
"""
    assert run_code(code).strip() == "True"


def test_the_engine_keeps_no_reference_to_a_deleted_model(tmp_path):
    import gc
    import weakref
    rng = np.random.default_rng(72)
    model = small_model(rng)
    x, y = rng.standard_normal((16, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, 16)
    cnn.train_step(model, cnn.SoftmaxCrossEntropy(), x, y)
    model.predict(x)
    images = rng.integers(0, 256, (32, 3, 8, 8)).astype(np.uint8)
    mean, std = np.full(3, 120, np.float32), np.full(3, 60, np.float32)
    cnn.fit(model, cnn.SoftmaxCrossEntropy(), cnn.SGD(model.parameters(), 0.01), cnn.constant_lr(0.01),
            (images, y[:16].repeat(2)), (images[:0], y[:0]), mean, std, epochs=1, batch_size=8,
            log=lambda line: None)
    refs = [weakref.ref(model)] + [weakref.ref(layer) for layer in model.layers] + [weakref.ref(x)]
    del model, x
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)


def npz_bytes(members):
    """An .npz (zip) archive of {name: bytes}."""
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_model_files_from_elsewhere_are_one_line_and_allocate_nothing(tmp_path):
    import tracemalloc
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 40,)})
    cases = {"huge": npz_bytes({"model/0.Conv2D.W.npy": header.getvalue() + b"\0" * 64}),
             "notnpy": npz_bytes({"model/0.Conv2D.W": b"just some bytes"}),
             "short": npz_bytes({"model/0.Conv2D.W.npy": _npy(np.zeros(100, np.float32))[:-40]})}
    expected = {"huge": "damaged model file (model/0.Conv2D.W declares (1099511627776,) float32, "
                        "4,398,046,511,104 bytes, but holds 64)",
                "notnpy": "not a model file of ours (model/0.Conv2D.W is not an .npy array)",
                "short": "damaged model file (model/0.Conv2D.W declares (100,) float32, 400 bytes, but holds 360)"}
    for name, data in cases.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / "model.npz"
        path.write_bytes(data)
        tracemalloc.start()
        with pytest.raises(cnn.DataError) as error:
            cnn.load_npz(str(path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert str(error.value) == f"{path}: {expected[name]}" and peak < 1_000_000
        one_line_error(run("train_mnist.py", "--net", "2", "--out", str(tmp_path / name), "--predict", "x.png"),
                       str(path), expected[name])


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_empty_batch_is_a_clear_error():
    model = small_model(np.random.default_rng(73))
    empty = np.zeros((0, 3, 8, 8), np.float32)
    for call in (lambda: model.forward(empty), lambda: model.predict(empty), lambda: model.layers[0].forward(empty),
                 lambda: cnn.Sequential(cnn.Conv2D(3, 2, 3), impl="plain").predict(empty)):
        with pytest.raises(ValueError, match=r"Conv2D\(3, \d+, \(3, 3\), stride=1, padding=\d\): empty batch, "
                                             r"input of shape \(0, 3, 8, 8\)"):
            call()
    with pytest.raises(ValueError, match="empty batch, logits of shape"):
        cnn.SoftmaxCrossEntropy().forward(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="fit: no training images"):
        cnn.fit(model, cnn.SoftmaxCrossEntropy(), cnn.SGD(model.parameters(), 0.1), cnn.constant_lr(0.1),
                (np.zeros((0, 3, 8, 8), np.uint8), np.zeros(0)), (np.zeros((0, 3, 8, 8), np.uint8), np.zeros(0)),
                np.zeros(3), np.ones(3), epochs=1, batch_size=4)


@pytest.mark.parametrize("impl", ["plain", "fast"])
def test_a_float64_layer_gives_float64_for_every_input_layout(impl):
    rng = np.random.default_rng(74)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    for make in (lambda: cnn.Conv2D(8, 16, 3, padding=1, dtype=np.float64, impl=impl, rng=rng),
                 lambda: cnn.Conv2D(3, 4, 3, dtype=np.float64, impl=impl, rng=rng)):
        layer = make()
        xi = x[:, :layer.in_channels]
        dtypes = {layout: layer.forward(arrange(xi)).dtype
                  for layout, arrange in [("C", np.ascontiguousarray), ("F", np.asfortranarray),
                                          ("channels-last", lambda a: cnn.nchw_view(cnn.nhwc(a)))]}
        assert set(dtypes.values()) == {np.dtype(np.float64)}, dtypes


def test_a_pickled_trained_model_carries_no_work_arrays():
    rng = np.random.default_rng(75)
    model = cnn.Sequential(cnn.Conv2D(3, 32, 3, padding=1, rng=rng), cnn.MaxPool2D(2), cnn.ReLU(),
                           cnn.Conv2D(32, 32, 3, padding=1, rng=rng), cnn.ReLU(), cnn.Flatten(),
                           cnn.Dense(32 * 16 * 16, 10, rng=rng))
    fresh = len(pickle.dumps(model))
    x, y = rng.standard_normal((64, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 64)
    loss_fn = cnn.SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    trained = pickle.dumps(model)
    assert len(trained) < fresh * 1.01
    copy_ = pickle.loads(trained)
    with pytest.raises(RuntimeError, match="needs a forward"):
        copy_.layers[-1].backward(np.ones((64, 10), np.float32))
    assert np.array_equal(copy_.predict(x), model.predict(x))


def test_a_model_that_cannot_be_pickled_trains_on_threads_with_the_same_numbers(monkeypatch):
    monkeypatch.setattr(cnn, "CORES", 2)
    rng = np.random.default_rng(77)
    model, loss_fn = small_model(rng), cnn.SoftmaxCrossEntropy()
    model.layers[0].note = lambda: "a lambda cannot be pickled"
    x, y = rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, 8)
    with cnn.twin_process(model, loss_fn) as twin:
        loss, logits = cnn.train_step(model, loss_fn, x, y, twin)
        assert twin.copy is False and twin.process is None
    assert (loss, logits.tolist()) == (lambda r: (r[0], r[1].tolist()))(cnn.train_step(model, loss_fn, x, y))


def test_a_layer_of_your_own_that_draws_random_numbers_runs_on_the_whole_batch():
    class Dropout(cnn.Layer):
        def __init__(self, p, seed):
            super().__init__()
            self.p, self.rng = p, np.random.default_rng(seed)

        def _forward(self, x):
            self.mask = (self.rng.random(x.shape) >= self.p) / (1 - self.p)
            return x * self.mask

        def _backward(self, grad):
            return grad * self.mask
    rng = np.random.default_rng(76)
    model = cnn.Sequential(cnn.Flatten(), Dropout(0.5, 1), cnn.Dense(16, 2, rng=rng))
    assert cnn.needs_whole_batch(model) and not cnn.twin_process_usable(model)
    x = np.ones((32, 1, 4, 4), np.float32)
    cnn.train_step(model, cnn.SoftmaxCrossEntropy(), x, np.zeros(32, np.int64))
    mask = model.layers[1].mask
    assert mask.shape == (32, 16) and not np.array_equal(mask[:16], mask[16:])


# --------------------------------------------------------------------------- your own pictures, and what the network learned

def a_picture(width, height, background, shapes, mode="L"):
    """A Pillow picture with rectangles [(x0, y0, x1, y1, colour)] drawn on it."""
    from PIL import Image, ImageDraw
    picture = Image.new(mode, (width, height), background)
    draw = ImageDraw.Draw(picture)
    for *box, colour in shapes:
        draw.rectangle(box, fill=colour)
    return picture


def ink_box(pixels, level=64):
    rows, cols = np.nonzero(pixels > level)
    return rows.min(), rows.max(), cols.min(), cols.max()


def centre_of_mass(pixels):
    ys, xs = np.indices(pixels.shape)
    total = pixels.astype(np.float64).sum()
    return (ys * pixels).sum() / total, (xs * pixels).sum() / total


def test_a_digit_on_a_page_is_prepared_like_mnist():
    # a tall dark stroke, off-centre on a large light page: light on black, its
    # longer side 20 pixels, its centre of mass at the centre of the 28 x 28 field
    page = a_picture(400, 300, 230, [(40, 30, 70, 150, 20), (70, 30, 100, 60, 20)])
    pixels = cnn.prepare_like_mnist(page)
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    top, bottom, left, right = ink_box(pixels)
    assert bottom - top + 1 in (20, 21) and 3 <= right - left + 1 <= 12  # aspect ratio kept (120 x 60)
    assert np.allclose(centre_of_mass(pixels), (13.5, 13.5), atol=0.6)
    assert pixels[0].max() == 0 and pixels.max() == 255
    # the same as a grey, noisy photo gives nearly the same input
    noisy = np.asarray(page, np.float64) * 0.6 + 50 + np.random.default_rng(0).normal(0, 8, (300, 400))
    from PIL import Image
    photo = cnn.prepare_like_mnist(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    assert np.abs(photo.astype(int) - pixels).mean() < 12
    # a picture already like MNIST's passes unchanged
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 12:16] = 255
    assert np.array_equal(cnn.prepare_like_mnist(Image.fromarray(digit)), digit)


def test_a_product_photo_is_prepared_like_fashion_mnist():
    photo = a_picture(300, 200, (255, 255, 255), [(150, 40, 209, 159, (60, 60, 60))], mode="RGB")
    pixels = cnn.prepare_like_fashion(photo)
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    top, bottom, left, right = ink_box(pixels)
    assert (top, bottom) == (0, 27) and 13 <= right - left + 1 <= 15  # 120 x 60: the longer side fills 28
    assert abs((left + right) / 2 - 13.5) <= 1 and pixels[:, 0].max() == 0  # centred, negated
    dataset_like = 255 - np.asarray(a_picture(28, 28, 255, [(8, 2, 19, 25, 60)]))
    from PIL import Image
    assert np.array_equal(cnn.prepare_like_fashion(Image.fromarray(dataset_like)), dataset_like)


def test_a_wide_photo_is_prepared_like_cifar_without_squashing():
    from PIL import Image
    photo = a_picture(300, 200, (0, 0, 255), [(50, 0, 249, 199, (0, 200, 0))], mode="RGB")  # green square
    pixels = cnn.prepare_like_cifar(photo)
    assert pixels.shape == (32, 32, 3) and pixels[..., 1].min() > 190 and pixels[..., 2].max() < 10
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert np.array_equal(cnn.prepare_like_cifar(Image.fromarray(image)), image)


def test_pictures_are_opened_upright_and_transparency_goes_over_white(tmp_path):
    from PIL import Image
    rgba = np.zeros((60, 40, 4), np.uint8)   # transparent everywhere but a dark bar
    rgba[10:50, 15:25] = (20, 20, 20, 255)
    Image.fromarray(rgba).save(tmp_path / "transparent.png")
    picture = cnn.open_picture(str(tmp_path / "transparent.png"))
    assert picture.mode == "RGB" and picture.getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    Image.fromarray(np.zeros((20, 60, 3), np.uint8)).save(tmp_path / "rotated.jpg", exif=exif)
    assert cnn.open_picture(str(tmp_path / "rotated.jpg")).size == (20, 60)


def saliency_model(batchnorm):
    rng = np.random.default_rng(80)
    layers = [cnn.Conv2D(1, 4, 3, padding=1, dtype=np.float64, rng=rng)]
    if batchnorm:
        norm = cnn.BatchNorm2D(4, dtype=np.float64)
        norm.running_mean[:], norm.running_var[:] = rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)
        norm.params["gamma"][:] = rng.uniform(0.5, 1.5, 4)
        layers.append(norm)
    layers += [cnn.GELU(), cnn.MaxPool2D(2), cnn.Flatten(), cnn.Dense(4 * 3 * 3, 3, dtype=np.float64, rng=rng)]
    return cnn.Sequential(*layers)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_saliency_is_the_input_gradient_of_the_loss(batchnorm):
    model = saliency_model(batchnorm)
    model.train()
    x = np.random.default_rng(81).standard_normal((1, 6, 6))
    state = {k: v.copy() for k, v in model.state_arrays().items()}
    sal = cnn.saliency(model, x, 2)
    evaluation = model.evaluation_copy()
    loss_fn = cnn.SoftmaxCrossEntropy()
    xx = x[None].copy()
    numeric = cnn.numerical_gradient(lambda: loss_fn.forward(evaluation.forward(xx), np.array([2])), xx)
    assert sal.shape == (6, 6) and cnn.relative_error(sal, np.abs(numeric[0, 0])) < 1e-7
    assert all(np.array_equal(v, state[k]) for k, v in model.state_arrays().items())  # the model unchanged
    assert all(layer.training for layer in model.layers)


def test_batchnorm_with_fixed_statistics_passes_the_gradient_check():
    for impl in ("plain", "fast"):
        norm = cnn.BatchNorm2D(3, impl=impl)
        norm.running_mean[:], norm.running_var[:] = [0.5, -1, 2], [1.5, 0.5, 3]
        norm.use_running_stats = True
        errors = cnn.check_gradients(norm, np.random.default_rng(82).standard_normal((2, 3, 4, 4)))
        assert max(errors.values()) < 1e-8, (impl, errors)
        before = norm.running_var.copy()
        norm.forward(np.ones((2, 3, 4, 4), np.float32))
        assert np.array_equal(norm.running_var, before)


def test_feature_maps_follow_each_convolution_block():
    import train_cifar
    model = train_cifar.network4(np.random.default_rng(83))
    maps = cnn.feature_maps(model, np.random.default_rng(84).standard_normal((3, 32, 32)).astype(np.float32))
    assert [m.shape for _, m in maps] == [(24, 31, 31), (64, 15, 15), (64, 15, 15), (128, 7, 7), (128, 7, 7),
                                         (128, 3, 3), (128, 3, 3)]
    assert maps[1][0].startswith("after block 2, Conv2D(24, 64")


def test_predict_draws_what_the_network_saw_and_training_draws_filters(tmp_path):
    from PIL import Image
    data = tmp_path / "data"
    write_mnist(str(data), n_train=300, n_test=60)
    out = tmp_path / "out"
    assert run("train_mnist.py", "--net", "2", "--data-dir", str(data), "--limit", "200", "--epochs", "1",
               "--out", str(out)).returncode == 0
    for name, size in (("filters.png", None), ("feature_maps.png", None)):
        with Image.open(out / name) as picture:
            assert picture.width >= 600 and (out / name).stat().st_size < 1_000_000
    a_picture(300, 220, 240, [(120, 40, 150, 180, 30)]).save(tmp_path / "seven.jpg")
    result = run("train_mnist.py", "--net", "2", "--out", str(out), "--predict", str(tmp_path / "seven.jpg"),
                 str(data / "t10k-images-idx3-ubyte.gz"))
    assert result.returncode == 2 and "cannot read this image" in result.stderr  # the .gz: not a picture
    with Image.open(out / "predictions" / "seven.png") as picture:
        assert picture.width == 900 and 350 < picture.height < 900
        assert (out / "predictions" / "seven.png").stat().st_size < 1_000_000


def test_draw_filters_shows_the_whitening_and_the_filters_behind_it(tmp_path):
    import train_cifar
    from PIL import Image
    model = train_cifar.network4(np.random.default_rng(85))
    cnn.draw_filters(model, "network 4", str(tmp_path / "filters4.png"))
    small = cnn.Sequential(cnn.Conv2D(1, 4, 3))
    cnn.draw_filters(small, "one layer", str(tmp_path / "filters1.png"))
    with Image.open(tmp_path / "filters4.png") as four, Image.open(tmp_path / "filters1.png") as one:
        assert four.height > one.height + 150  # two panels: 24 whitening filters, 64 composed ones
