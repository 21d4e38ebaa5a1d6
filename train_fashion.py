"""Train the Fashion-MNIST network: Conv(6, padding 1)-ReLU-MaxPool-Dense(100)-ReLU-Dense(10),
3 epochs; reports accuracy and macro F1, and draws what it learned.

    python train_fashion.py
"""
import time

import numpy as np

import cnn
from cnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential


def network(rng):  # ReLU after MaxPool: the same function (see train_mnist.py), less work
    return Sequential(
        Conv2D(1, 6, 3, padding=1, rng=rng), MaxPool2D(2), ReLU(),    # 6 x 14 x 14
        Flatten(), Dense(1176, 100, rng=rng), ReLU(), Dense(100, 10, rng=rng))


# Chosen on the validation split: batch 32 with a short warm-up and linear decay beat
# batch 64 with a cosine schedule, Adam, label smoothing and random flips.
RECIPE = dict(epochs=3, batch_size=32, lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4,
              schedule="warmup_linear", warmup=0.1)


def main(argv=None):
    started = time.time()
    args, recipe = cnn.parse_options(__doc__, {None: RECIPE}, argv, out="runs/fashion")
    title = "Fashion-MNIST network"
    if args.predict:
        return cnn.predict_files(args.predict, args.out, network)
    if args.bench:
        return cnn.bench_network(network(np.random.default_rng(0)), (1, 28, 28), args.batch_size, epoch_images=60000)
    cnn.keep_freed_memory()  # process-wide: training steps reuse their memory

    data = cnn.load_data("fashion-mnist", args)
    model = cnn.build_model(network, data, args)
    history = cnn.train(model, data, recipe, args, title)
    results, predictions = cnn.test(model, data)
    return cnn.write_outputs(args, recipe, title, data, model, history, results, predictions, started)


if __name__ == "__main__":
    main()
