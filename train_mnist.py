"""Train the documented MNIST networks, test them and draw what they learned.

    python train_mnist.py --net 1   Conv(4)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 25 epochs
    python train_mnist.py --net 2   Conv(16)-ReLU-MaxPool-Conv(16)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 30 epochs
"""
import time

import numpy as np

import cnn
from cnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential

# ReLU comes after MaxPool although the documents write Conv-ReLU-MaxPool: max pooling
# and ReLU commute (both are monotonic), so the function and its gradient are the same,
# and the ReLU runs on a quarter of the values.


def network1(rng):
    return Sequential(
        Conv2D(1, 4, 3, rng=rng), MaxPool2D(2), ReLU(),               # 4 x 13 x 13
        Flatten(), Dense(676, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


def network2(rng):
    return Sequential(
        Conv2D(1, 16, 3, rng=rng), MaxPool2D(2), ReLU(),              # 16 x 13 x 13
        Conv2D(16, 16, 3, rng=rng), MaxPool2D(2), ReLU(),             # 16 x 5 x 5
        Flatten(), Dense(400, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


NETWORKS = {1: network1, 2: network2}
# Nesterov momentum with a little weight decay and a cosine decay of the learning rate.
RECIPES = {
    1: dict(epochs=25, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine"),
    2: dict(epochs=30, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine"),
}


def main(argv=None):
    started = time.time()
    args, recipe = cnn.parse_options(__doc__, RECIPES, argv)
    network, title = NETWORKS[args.net], f"Network {args.net} (MNIST)"
    if args.predict:
        return cnn.predict_files(args.predict, args.out, network)
    if args.bench:
        return cnn.bench_network(network(np.random.default_rng(0)), (1, 28, 28), args.batch_size, epoch_images=60000)
    cnn.keep_freed_memory()  # process-wide: training steps reuse their memory

    data = cnn.load_data("mnist", args)
    model = cnn.build_model(network, data, args)
    history = cnn.train(model, data, recipe, args, title)
    results, predictions = cnn.test(model, data)
    return cnn.write_outputs(args, recipe, title, data, model, history, results, predictions, started)


if __name__ == "__main__":
    main()
