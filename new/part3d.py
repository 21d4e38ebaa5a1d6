
# --- the documented networks ---------------------------------------------------------------
# ReLU follows MaxPool in the code although the documents write Conv-ReLU-MaxPool: max
# pooling and ReLU commute (both are monotonic), so the function and its gradient are
# exactly the same, and the ReLU runs on a quarter of the values.

def mnist_network(net, impl="fast", rng=None):
    """Network 1: Conv(4)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10); network 2:
    Conv(16)-ReLU-MaxPool-Conv(16)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10)."""
    if net == 1:
        return Sequential(
            Conv2D(1, 4, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),    # 4 x 13 x 13
            Flatten(), Dense(676, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))
    return Sequential(
        Conv2D(1, 16, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),       # 16 x 13 x 13
        Conv2D(16, 16, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),      # 16 x 5 x 5
        Flatten(), Dense(400, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


def fashion_network(impl="fast", rng=None):
    """Conv(6, padding 1)-ReLU-MaxPool-Dense(100)-ReLU-Dense(10)."""
    return Sequential(
        Conv2D(1, 6, 3, padding=1, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),  # 6 x 14 x 14
        Flatten(), Dense(1176, 100, rng=rng), ReLU(), Dense(100, 10, rng=rng))


def cifar_network3(impl="fast", rng=None):
    """Conv(8)-ReLU-MaxPool-Conv(16)-ReLU-Conv(32)-ReLU-MaxPool-Dense(64)-ReLU-Dense(10)."""
    return Sequential(
        Conv2D(3, 8, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),       # 8 x 15 x 15
        Conv2D(8, 16, 3, impl=impl, rng=rng), ReLU(),                               # 16 x 13 x 13
        Conv2D(16, 32, 3, impl=impl, rng=rng), MaxPool2D(2, impl=impl), ReLU(),     # 32 x 5 x 5
        Flatten(), Dense(800, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng))


def cifar_network4(impl="fast", rng=None, widths=(64, 128, 128)):
    """After the airbench recipe: a fixed whitening convolution (see init4), three
    blocks of conv-pool-BatchNorm-GELU-conv-BatchNorm-GELU, global max pooling and
    Dense(10), scaled by 1/9."""
    rng = np.random.default_rng() if rng is None else rng
    whiten = Conv2D(3, 24, 2, bias=False, impl=impl, rng=rng)                      # 24 x 31 x 31
    whiten.trainable = False
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
    """Network 4's whitening weights, from (normalized) training images."""
    model.layers[0].params["W"][:] = whitening_filters(images)


# --- command line: the training scripts' options and runner ---------------------------------

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


def parse_options(description, recipes, argv=None):
    """The options every training script shares.  recipes maps a network number to
    its recipe (defaults and training settings); with several, --net picks one, and
    the other defaults follow it.  Returns (args, recipe)."""
    nets = list(recipes)
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line "error: ...", exit code 2
    if nets != [None]:  # {None: recipe}: a script with a single network and no --net
        parser.add_argument("--net", type=int, choices=nets, default=nets[0])
    recipe = recipes[parser.parse_known_args(argv)[0].net if nets != [None] else None]
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
    parser.add_argument("--out", help="output folder (default runs/<network>)")
    parser.add_argument("--limit", type=_positive(int), help="use only the first N training images")
    parser.add_argument("--impl", choices=["fast", "plain", "loop"], default="fast",
                        help="convolution and pooling: the engine, im2col, or the textbook loops")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/model.npz where it stopped")
    parser.add_argument("--predict", nargs="+", metavar="FILE",
                        help="classify image files with the trained OUT/model.npz")
    args = parser.parse_args(argv)
    return args, recipe


CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}


def _load_split(dataset, folder, split):
    if dataset == "cifar10":
        return load_cifar10(folder, split)
    images, labels = load_mnist(folder, split)
    return images, labels, CLASS_NAMES[dataset]


MAX_IMAGE_PIXELS = 1 << 25  # larger pictures are refused before they are decoded


def image_to_input(path, channels, height, width):
    """Any image Pillow opens -> uint8 (1, C, H, W) like the training images.
    Grayscale pictures with a light background are inverted, because MNIST digits
    and Fashion-MNIST clothes are light on black."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                if picture.width * picture.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{path}: {picture.width} x {picture.height} pixels, too large to "
                                    f"decode (at most {MAX_IMAGE_PIXELS:,} pixels)")
                picture = picture.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(picture, np.uint8)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read this image ({e})") from None
    if channels == 1:
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        if border.mean() > 127:
            pixels = 255 - pixels
        return pixels[None, None]
    return pixels.transpose(2, 0, 1)[None]


def predict_files(files, checkpoint, build):
    """Print the top three classes of each image file; the files that cannot be
    read get one error line each after the others' predictions, and exit code 2."""
    model = build("fast", np.random.default_rng(0))
    meta = load_checkpoint(checkpoint, model)
    try:
        mean, std = np.array(meta["mean"], np.float32), np.array(meta["std"], np.float32)
        classes, (c, h, w) = list(meta["classes"]), meta["input_shape"]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{checkpoint}: damaged checkpoint (its metadata lacks the normalization, "
                        f"classes or input shape)") from None
    errors = []
    for path in files:
        try:
            pixels = image_to_input(path, c, h, w)
        except DataError as e:
            errors.append(str(e))
            continue
        probs = np.exp(log_softmax(model.predict(normalize(pixels, mean, std)).astype(np.float64)))[0]
        print(f"{path}: " + ", ".join(f"{classes[k]} {probs[k]:.3f}" for k in np.argsort(-probs)[:3]))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if errors:
        sys.exit(2)


def check_output_folder(out):
    """Make the output folder before any data is loaded, or say why it cannot be."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out}: is a file, not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create this folder ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: not writable")


def make_optimizer(model, recipe, args):
    if recipe.get("optimizer", "sgd") == "adam":
        return Adam(model.parameters(), args.lr, weight_decay=args.weight_decay)
    return SGD(model.parameters(), args.lr, momentum=recipe.get("momentum", 0.9),
               nesterov=recipe.get("nesterov", False), weight_decay=args.weight_decay)


def make_schedule(recipe, lr, total_steps):
    kind = recipe.get("schedule", "constant")
    if kind == "cosine":
        return cosine_lr(lr, total_steps, lr * recipe.get("final_fraction", 0.0))
    if kind == "warmup_linear":
        return warmup_linear_lr(lr, total_steps, recipe.get("warmup", 0.2), recipe.get("final_fraction", 0.0),
                                recipe.get("initial_fraction", 0.0))
    return constant_lr(lr)


def peak_memory_mb():
    """Peak resident memory of this process (a TwinProcess has its own, mostly pages
    it shares with this one)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# Options that decide the batches and the data: a run resumes only with the same ones.
RESUME_OPTIONS = ("net", "batch_size", "seed", "val", "limit", "lr", "weight_decay", "impl")


def run_script(args, *, name, title, dataset, build, recipe):
    """Everything a train_*.py script does after parsing its options: find the data,
    train (or resume), evaluate on the test set, write the outputs; or --predict."""
    started = time.time()
    keep_freed_memory()
    out = args.out or os.path.join("runs", name)
    checkpoint = os.path.join(out, "model.npz")
    try:
        if args.predict:
            return predict_files(args.predict, checkpoint, build)
        check_output_folder(out)
        folder = locate_dataset(dataset, args.data_dir)
        train_images, train_labels, classes = _load_split(dataset, folder, "train")
        test_images, test_labels, _ = _load_split(dataset, folder, "test")
    except DataError as e:
        fail(str(e))
    rng = np.random.default_rng(args.seed)
    model = build(args.impl, rng)
    try:
        with model.evaluating():
            model.forward(np.zeros((1,) + train_images.shape[1:], np.float32))
    except ValueError as e:
        fail(f"{folder}: images of shape {train_images.shape[1:]} do not fit this network ({e})")
    if args.limit:
        train_images, train_labels = train_images[:args.limit], train_labels[:args.limit]
    n_val = min(args.val, len(train_images) // 10)
    n_train = len(train_images) - n_val
    train_set = (train_images[:n_train], train_labels[:n_train])
    val_set = (train_images[n_train:], train_labels[n_train:])
    mean, std = channel_stats(train_set[0])
    print(f"{title}: {n_train} training, {n_val} validation, {len(test_images)} test images "
          f"from {folder}", file=sys.stderr)

    if "init" in recipe:
        recipe["init"](model, normalize(np.asarray(train_set[0][:5000]), mean, std))
    optimizer = make_optimizer(model, recipe, args)
    steps = args.epochs * math.ceil(n_train / args.batch_size)
    schedule = make_schedule(recipe, args.lr, steps)
    if recipe.get("lookahead"):
        optimizer = Lookahead(optimizer, model, steps)
    loss_fn = SoftmaxCrossEntropy(recipe.get("label_smoothing", 0.0))
    options = {k: v for k, v in vars(args).items() if k != "predict"}
    meta = dict(options=options, mean=mean.tolist(), std=std.tolist(), classes=classes,
                input_shape=list(train_images.shape[1:]))
    position, history = None, []
    if args.resume:
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
    augment = {k: recipe[k] for k in ("crop", "flip", "pad_mode") if k in recipe}
    try:
        history = fit(model, loss_fn, optimizer, schedule, train_set, val_set, mean, std,
                      epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                      augment=augment, checkpoint=checkpoint, meta=meta,
                      position=position, history=history)
    except TrainingDiverged as e:
        fail(f"{e}; try a smaller learning rate (--lr {args.lr / 3:.3g}); "
             f"the last good checkpoint is {checkpoint}", code=1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: saved {checkpoint}; run the same command with --resume to continue",
              file=sys.stderr)
        sys.exit(130)

    tta = recipe.get("tta", 0)
    plain_logits = predict_logits(model, test_images, mean, std)
    test_loss, test_acc, predictions = score(plain_logits, test_labels)
    results = dict(test_loss=test_loss, test_accuracy=test_acc)
    if tta:
        without_tta = dict(results)
        logits = predict_logits(model, test_images, mean, std, tta=tta, plain=plain_logits)
        test_loss, test_acc, predictions = score(logits, test_labels)
        results = dict(test_loss=test_loss, test_accuracy=test_acc, without_tta=without_tta)
    labels = np.asarray(test_labels).astype(np.int64)
    cm = confusion_matrix(labels, predictions, len(classes))
    results.update(macro_f1=macro_f1(cm), f1_per_class=f1_scores(cm).tolist(),
                   confusion_matrix=cm.tolist(), epochs=len(history),
                   train_seconds=sum(h["seconds"] for h in history),
                   wall_seconds=time.time() - started, peak_memory_mb=peak_memory_mb())
    draw_learning_curve(history, test_loss, f"{title}: test accuracy {100 * test_acc:.2f} %",
                        os.path.join(out, "learning_curve.png"))
    draw_confusion_matrix(cm, classes, f"{title}: confusion matrix (test set)",
                          os.path.join(out, "confusion_matrix.png"))
    draw_mistakes(test_images, labels, predictions, classes, f"{title}: misclassified test images",
                  os.path.join(out, "mistakes.png"))
    metrics = dict(network=title, options=options, recipe={k: v for k, v in recipe.items() if k != "init"},
                   history=history, **results)
    tmp = os.path.join(out, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(out, "metrics.json"))
    print(f"test loss {test_loss:.4f}  accuracy {test_acc:.4f}  macro F1 {results['macro_f1']:.4f}"
          + (f"  (without TTA: accuracy {results['without_tta']['test_accuracy']:.4f})" if tta else "")
          + f"  wall time {results['wall_seconds']:.0f}s  outputs in {out}")
    return metrics


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
    and each convolution with the pooling it runs in the network (fused_pools)."""
    model.train()
    pools = model.fused_pools()
    stop = model.first_trained()
    inputs = []
    for layer in model.layers:
        inputs.append(x)
        x = layer.forward(x)
    rows = []
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, (Conv2D, MaxPool2D)):
            continue
        xi = inputs[i]
        y = layer.forward(xi)
        g = nchw_view(np.ones(y.shape[:1] + y.shape[2:] + y.shape[1:2], y.dtype))
        kwargs = {"input_grad": i != stop} if isinstance(layer, Conv2D) else {}
        t_fwd, t_bwd = _forward_backward_times(lambda: layer.forward(xi), lambda: layer.backward(g, **kwargs),
                                               repeats)
        loop = MaxPool2D(layer.k, layer.stride, impl="loop") if isinstance(layer, MaxPool2D) else \
            Conv2D(layer.in_channels, layer.out_channels, (layer.kh, layer.kw), layer.stride, layer.padding,
                   impl="loop")
        small = np.ascontiguousarray(xi[:loop_images])
        start = time.perf_counter()
        ys = loop.forward(small)
        loop.backward(np.ones_like(ys), **kwargs)
        t_loop = (time.perf_counter() - start) * len(xi) / loop_images
        row = f"  {name:<11}{layer!r:<44}{t_fwd * 1e3:8.1f}{t_bwd * 1e3:8.1f}"
        rate = None
        if isinstance(layer, Conv2D):
            f_fwd, f_bwd = _conv_flops(layer, y.shape, kwargs["input_grad"])
            rate = (f_fwd + f_bwd) / (t_fwd + t_bwd) / 1e9
        rows.append((row + (f"{rate:9.1f}" if rate else f"{'':9}"), rate, t_loop, t_fwd + t_bwd))
        if i - 1 in pools:
            conv, xc = model.layers[i - 1], inputs[i - 1]
            t_fwd, t_bwd = _forward_backward_times(lambda: conv.forward(xc, pool=layer),
                                                   lambda: conv.backward(g, input_grad=i - 1 != stop), repeats)
            rows.append((f"  {name:<11}{'  the two above as one (as in training)':<44}"
                         f"{t_fwd * 1e3:8.1f}{t_bwd * 1e3:8.1f}", None, None, None))
    return rows


def bench_network(model, shape, batch_size, epoch_images, steps, repeats):
    """Training images/s (batch in, SGD step out, as train_epoch runs it), inference
    images/s, and seconds per epoch of epoch_images at that training speed."""
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
    with TwinProcess.where_usable(model, loss_fn) as twin:
        train_rate = steps * batch_size / _best_time(lambda: train_steps(twin), repeats)
    test = rng.integers(0, 256, (8 * batch_size if steps < 10 else 2000,) + shape).astype(np.uint8)
    infer_rate = len(test) / _best_time(lambda: predict_logits(model, test, mean, std), max(1, repeats - 1))
    return train_rate, infer_rate, epoch_images / train_rate


def bench(argv):
    """Print the machine's matmul ceiling, per-layer speed (fast vs loop) and
    per-network throughput.  --quick: tiny batches, to check that it runs."""
    quick = "--quick" in argv
    started, steal_start = time.time(), cpu_times()
    keep_freed_memory()
    rng = np.random.default_rng(0)
    peak = matmul_gflops(256 if quick else 2048)
    print(f"machine: {os.cpu_count()} cores, NumPy {np.__version__}; float32 matmul "
          f"{'256x256' if quick else '2048x2048'}: {peak:.0f} GFLOP/s (the ceiling below)\n")
    repeats = 1 if quick else 5
    # name, model, input shape, batch, images per epoch, bench steps, layer batch
    networks = [("net1", mnist_network(1, rng=rng), (1, 28, 28), 64, 60000, 60, 64),
                ("net2", mnist_network(2, rng=rng), (1, 28, 28), 64, 60000, 60, 64),
                ("fashion", fashion_network(rng=rng), (1, 28, 28), 64, 60000, 60, 64),
                ("net3", cifar_network3(rng=rng), (3, 32, 32), 64, 50000, 60, 64),
                ("net4", cifar_network4(rng=rng), (3, 32, 32), 512, 50000, 2, 256)]
    if quick:
        networks = [(name, model, shape, 8, images, 1, 4) for name, model, shape, _, images, _, _ in networks]
    # The networks first, printed last: measured after the layers, whose work arrays
    # this process still holds when it forks its TwinProcess, they train slower.
    network_rows = []
    for name, model, shape, batch, epoch_images, steps, _ in networks:
        if name == "net4":
            init4(model, normalize(rng.integers(0, 256, (64,) + shape).astype(np.uint8),
                                   np.full(3, 120, np.float32), np.full(3, 60, np.float32)))
        train_rate, infer_rate, epoch = bench_network(model, shape, batch, epoch_images, steps, 1 if quick else 3)
        network_rows.append(f"  {name:<10}{batch:>6}{train_rate:>13,.0f}{infer_rate:>13,.0f}{epoch:>9.1f}")
    print(f"  {'network':<11}{'layer (fast; loop on 1 image, scaled)':<44}{'fwd ms':>8}{'bwd ms':>8}"
          f"{'GFLOP/s':>9}{'% peak':>8}{'loop ms':>10}{'speed-up':>9}")
    for name, model, shape, _, _, _, layer_batch in networks:
        if name in ("net1", "fashion"):
            continue
        x = normalize(rng.integers(0, 256, (layer_batch,) + shape).astype(np.uint8),
                      np.full(shape[0], 120, np.float32), np.full(shape[0], 60, np.float32))
        for row, rate, t_loop, t_fast in bench_layers(f"{name} N={layer_batch}", model, x, repeats):
            percent = f"{100 * rate / peak:7.0f}%" if rate else f"{'':8}"
            print(f"{row}{percent}{t_loop * 1e3:10.0f}{t_loop / t_fast:8.0f}x" if t_loop else row)
    print(f"\n  {'network':<10}{'batch':>6}{'train img/s':>13}{'infer img/s':>13}{'s/epoch':>9}"
          f"  (epoch: 60,000 MNIST / 50,000 CIFAR-10 images)")
    print("\n".join(network_rows))
    stolen = cpu_steal_since(steal_start)
    print(f"\nbench took {time.time() - started:.0f} s" +
          (f"; the host took {stolen:.0%} of this VM's CPU time meanwhile (steal)" if stolen is not None else ""))
    return 0


USAGE = """usage: python cnn.py bench [--quick]   measure the layers and networks on this machine
       (training: python train_mnist.py --net 1|2, train_fashion.py, train_cifar.py --net 3|4)"""


def main(argv):
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    print(USAGE)
    return 0 if not argv else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
