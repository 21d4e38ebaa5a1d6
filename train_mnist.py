"""Train the documented MNIST networks.

    python train_mnist.py --net 1   Conv(4)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 25 epochs
    python train_mnist.py --net 2   Conv(16)-ReLU-MaxPool-Conv(16)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10), 30 epochs
"""
from cnn import mnist_network, parse_options, run_script

RECIPES = {
    1: dict(epochs=25, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine"),
    2: dict(epochs=30, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
            schedule="cosine"),
}


def main(argv=None):
    args, recipe = parse_options(__doc__, RECIPES, argv)
    run_script(args, name=f"net{args.net}", title=f"Network {args.net} (MNIST)", dataset="mnist",
               build=lambda impl, rng: mnist_network(args.net, impl, rng), recipe=recipe)


if __name__ == "__main__":
    main()
