"""Train the Fashion-MNIST network: Conv(6, padding 1)-ReLU-MaxPool-Dense(100)-ReLU-Dense(10),
3 epochs; reports accuracy and macro F1.

    python train_fashion.py
"""
from cnn import fashion_network, parse_options, run_script

# Chosen on the validation split: batch 32 with a short warm-up and linear decay beat
# batch 64 with a cosine schedule, Adam, label smoothing and random flips.
RECIPES = {None: dict(epochs=3, batch_size=32, lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      schedule="warmup_linear", warmup=0.1)}


def main(argv=None):
    args, recipe = parse_options(__doc__, RECIPES, argv)
    run_script(args, name="fashion", title="Fashion-MNIST network", dataset="fashion-mnist",
               build=fashion_network, recipe=recipe)


if __name__ == "__main__":
    main()
