"""Train the CIFAR-10 networks.

    python train_cifar.py --net 3   the documented network: Conv(8)-ReLU-MaxPool-Conv(16)-ReLU-
                                    Conv(32)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 25 epochs
    python train_cifar.py --net 4   ours, after the airbench recipe: a fixed whitening convolution,
                                    three blocks of conv-pool-BatchNorm-GELU-conv-BatchNorm-GELU
                                    (64, 128, 128 channels), global max pooling, Dense(10)
"""
import math

from cnn import (GELU, BatchNorm2D, Conv2D, Dense, Flatten, GlobalMaxPool2D, MaxPool2D, ReLU, Scale,
                 Sequential, dirac_init, parse_options, run_script, whitening_filters)

RECIPES = {
    3: dict(epochs=25, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine", crop=2, flip="random"),
    # airbench's hyperparameters for a mean (not summed) loss over batches of 512: peak
    # lr 0.75 with Nesterov momentum 0.85, a decay of lr * 1.33e-3 per step, 64x larger
    # steps for the BatchNorm shifts, label smoothing 0.2, Lookahead weight averaging, and
    # test-time augmentation over the mirror image and one-pixel shifts.
    4: dict(epochs=18, val=0, batch_size=512, lr=0.75, momentum=0.85, nesterov=True, weight_decay=1.33e-3,
            schedule="warmup_linear", warmup=0.23, initial_fraction=0.2, final_fraction=0.07,
            label_smoothing=0.2, crop=2, pad_mode="reflect", flip="alternate", tta=2, lookahead=True),
}


def network3(impl, rng):  # ReLU after MaxPool: the same function, see train_mnist.py
    return Sequential(
        Conv2D(3, 8, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),       # 8 x 15 x 15
        Conv2D(8, 16, 3, impl=impl, rng=rng), ReLU(),                               # 16 x 13 x 13
        Conv2D(16, 32, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),     # 32 x 5 x 5
        Flatten(), Dense(800, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


def network4(impl, rng, widths=(64, 128, 128)):
    whiten = Conv2D(3, 24, 2, bias=False, impl=impl, rng=rng)                      # 24 x 31 x 31
    whiten.trainable = False  # its weights come from whitening_filters, see init4
    layers, channels = [whiten, GELU()], 24
    for width in widths:                                # 31 -> 15 -> 7 -> 3 pixels
        first = Conv2D(channels, width, 3, padding=1, bias=False, impl=impl, rng=rng)
        second = Conv2D(width, width, 3, padding=1, bias=False, impl=impl, rng=rng)
        norms = [BatchNorm2D(width, momentum=0.4, eps=1e-12, scale=False) for _ in range(2)]
        for conv in (first, second):  # PyTorch's default init, then identity on the first filters
            bound = 1 / math.sqrt(conv.in_channels * 9)
            conv.params["W"][:] = rng.uniform(-bound, bound, conv.params["W"].shape)
            dirac_init(conv)
        for norm in norms:
            norm.lr_scale = 64.0
        layers += [first, MaxPool2D(2, impl=impl), norms[0], GELU(), second, norms[1], GELU()]
        channels = width
    head = Dense(channels, 10, bias=False, rng=rng)
    head.params["W"][:] = rng.uniform(-1, 1, head.params["W"].shape) / math.sqrt(channels)
    return Sequential(*layers, GlobalMaxPool2D(), head, Scale(1 / 9))


def init4(model, images):
    """Whitening weights from (normalized) training images."""
    model.layers[0].params["W"][:] = whitening_filters(images)


RECIPES[4]["init"] = init4


def main(argv=None):
    args, recipe = parse_options(__doc__, RECIPES, argv)
    build = network3 if args.net == 3 else network4
    run_script(args, name=f"net{args.net}", title=f"Network {args.net} (CIFAR-10)", dataset="cifar10",
               build=build, recipe=recipe)


if __name__ == "__main__":
    main()
