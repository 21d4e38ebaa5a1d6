"""Train the documented MNIST networks.

    python train_mnist.py --net 1   Conv(4)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 25 epochs
    python train_mnist.py --net 2   Conv(16)-ReLU-MaxPool-Conv(16)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 30 epochs
"""
from cnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, parse_options, run_script

RECIPES = {
    1: dict(epochs=25, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine"),
    2: dict(epochs=30, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine"),
}


# ReLU follows MaxPool in the code although the documents write Conv-ReLU-MaxPool: max
# pooling and ReLU commute (both are monotonic), so the function and its gradient are
# exactly the same, and the ReLU then runs on a quarter of the values.
def network(net, impl, rng):
    if net == 1:
        return Sequential(
            Conv2D(1, 4, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),    # 4 x 13 x 13
            Flatten(), Dense(676, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))
    return Sequential(
        Conv2D(1, 16, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),       # 16 x 13 x 13
        Conv2D(16, 16, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),      # 16 x 5 x 5
        Flatten(), Dense(400, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


def main(argv=None):
    args, recipe = parse_options(__doc__, RECIPES, argv)
    run_script(args, name=f"net{args.net}", title=f"Network {args.net} (MNIST)", dataset="mnist",
               build=lambda impl, rng: network(args.net, impl, rng), recipe=recipe)


if __name__ == "__main__":
    main()
