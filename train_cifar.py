"""Train the CIFAR-10 networks, test them and draw what they learned.

    python train_cifar.py --net 3   the documented network: Conv(8)-ReLU-MaxPool-Conv(16)-ReLU-
                                    Conv(32)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 25 epochs
    python train_cifar.py --net 4   ours, after Keller Jordan's airbench: a fixed whitening convolution,
                                    three blocks of conv-pool-BatchNorm-GELU-conv-BatchNorm-GELU
                                    (64, 128, 128 channels), global max pooling, Dense(10)
"""
import math
import time

import numpy as np

import cnn
from cnn import (BatchNorm2D, Conv2D, Dense, Flatten, GELU, GlobalMaxPool2D, MaxPool2D, ReLU, Scale,
                 Sequential)


def network3(rng):  # ReLU after MaxPool: the same function (see train_mnist.py), less work
    return Sequential(
        Conv2D(3, 8, 3, rng=rng), MaxPool2D(2), ReLU(),               # 8 x 15 x 15
        Conv2D(8, 16, 3, rng=rng), ReLU(),                            # 16 x 13 x 13
        Conv2D(16, 32, 3, rng=rng), MaxPool2D(2), ReLU(),             # 32 x 5 x 5
        Flatten(), Dense(800, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


def whitening_filters(x, kernel_size=2, eps=5e-4):
    """Filters (2 * C*k*k, C, k, k) that whiten the k x k patches of images x
    (N, C, H, W): the eigenvectors of the patches' second-moment matrix (their
    covariance without subtracting the mean: the images are normalized to mean 0
    per channel), each scaled by 1 / sqrt(eigenvalue + eps), used with both signs
    (so an activation after them loses nothing).  A convolution with them
    decorrelates neighbouring pixels and channels, which makes the first epochs of
    training much more effective."""
    c = x.shape[1]
    patches = np.ascontiguousarray(cnn.im2col(np.asarray(x, np.float64), kernel_size, kernel_size).T)  # (C*k*k, M)
    second_moment = patches @ patches.T / patches.shape[1]
    eigenvalues, eigenvectors = np.linalg.eigh(second_moment)
    filters = (eigenvectors.T / np.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, kernel_size, kernel_size)
    return np.concatenate([filters, -filters])


def dirac_init(conv):
    """The first in_channels filters of conv pass their input channel through
    unchanged (a 1 at the kernel's centre): the block starts close to the identity."""
    W = conv.params["W"]
    n = min(conv.in_channels, conv.out_channels)
    W[:n] = 0
    W[np.arange(n), np.arange(n), conv.kh // 2, conv.kw // 2] = 1


def network4(rng, widths=(64, 128, 128)):
    """A fixed 2x2 whitening convolution (set from the data by whiten), then blocks
    that start close to the identity, global max pooling and Dense(10) scaled by 1/9."""
    whiten = Conv2D(3, 24, 2, bias=False, rng=rng)                    # 24 x 31 x 31
    whiten.trainable = False
    layers, channels = [whiten, GELU()], 24
    for width in widths:                                              # 31 -> 15 -> 7 -> 3 pixels
        first = Conv2D(channels, width, 3, padding=1, bias=False, rng=rng)
        second = Conv2D(width, width, 3, padding=1, bias=False, rng=rng)
        norms = [BatchNorm2D(width, momentum=0.4, eps=1e-12, scale=False) for _ in range(2)]
        for conv in (first, second):  # PyTorch's default init, then identity on the first filters
            bound = 1 / math.sqrt(conv.in_channels * 9)
            conv.params["W"][:] = rng.uniform(-bound, bound, conv.params["W"].shape)
            dirac_init(conv)
        for norm in norms:
            norm.lr_scale = 64.0  # the shifts learn 64x faster (their decay stays the same)
        layers += [first, MaxPool2D(2), norms[0], GELU(), second, norms[1], GELU()]
        channels = width
    head = Dense(channels, 10, bias=False, rng=rng)
    head.params["W"][:] = rng.uniform(-1, 1, head.params["W"].shape) / math.sqrt(channels)
    return Sequential(*layers, GlobalMaxPool2D(), head, Scale(1 / 9))


def whiten(model, data):
    """Network 4's first layer: filters that whiten the 2x2 patches of 5,000 training images."""
    model.layers[0].params["W"][:] = whitening_filters(data.normalized(data.train[0][:5000]))


NETWORKS = {3: network3, 4: network4}
RECIPES = {
    3: dict(epochs=25, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine", crop=2, flip="random"),
    # airbench's hyperparameters for a mean (not summed) loss over batches of 512: peak
    # lr 0.75 with Nesterov momentum 0.85, a decay of lr * 1.33e-3 per step, label
    # smoothing 0.2, random shifts and alternating flips, Lookahead weight averaging,
    # and test-time augmentation over the mirror image and one-pixel shifts.
    4: dict(epochs=14, val=0, batch_size=512, lr=0.75, momentum=0.85, nesterov=True, weight_decay=1.33e-3,
            schedule="warmup_linear", warmup=0.23, initial_fraction=0.2, final_fraction=0.07,
            label_smoothing=0.2, crop=2, pad_mode="reflect", flip="alternate", tta=2, lookahead=True),
}


def main(argv=None):
    started = time.time()
    args, recipe = cnn.parse_options(__doc__, RECIPES, argv)
    network, title = NETWORKS[args.net], f"Network {args.net} (CIFAR-10)"
    if args.predict:
        return cnn.predict_files(args.predict, args.out, network)
    if args.bench:
        return cnn.bench_network(network(np.random.default_rng(0)), (3, 32, 32), args.batch_size,
                                 epoch_images=50000)
    cnn.keep_freed_memory()  # process-wide: training steps reuse their memory

    data = cnn.load_data("cifar10", args)
    model = cnn.build_model(network, data, args)
    if args.net == 4:
        whiten(model, data)
    history = cnn.train(model, data, recipe, args, title)
    results, predictions = cnn.test(model, data, tta=recipe.get("tta", 0))
    return cnn.write_outputs(args, recipe, title, data, model, history, results, predictions, started)


if __name__ == "__main__":
    main()
