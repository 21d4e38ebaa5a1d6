"""Train the CIFAR-10 networks.

    python train_cifar.py --net 3   Conv(8)-ReLU-MaxPool-Conv(16)-ReLU-Conv(32)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10)
"""
from cnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, parse_options, run_script

RECIPES = {
    3: dict(epochs=25, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine", crop=2, flip="random"),
}


def network3(impl, rng):
    return Sequential(
        Conv2D(3, 8, 3, impl=impl, rng=rng), ReLU(), MaxPool2D(2, impl=impl),       # 8 x 15 x 15
        Conv2D(8, 16, 3, impl=impl, rng=rng), ReLU(),                               # 16 x 13 x 13
        Conv2D(16, 32, 3, impl=impl, rng=rng), ReLU(), MaxPool2D(2, impl=impl),     # 32 x 5 x 5
        Flatten(), Dense(800, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


def main(argv=None):
    args, recipe = parse_options(__doc__, RECIPES, argv)
    run_script(args, name=f"net{args.net}", title=f"Network {args.net} (CIFAR-10)", dataset="cifar10",
               build=network3, recipe=recipe)


if __name__ == "__main__":
    main()
