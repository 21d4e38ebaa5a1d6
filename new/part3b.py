

# --- training ----------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    pass


def predict_logits(model, images, mean, std, batch_size=EVAL_BATCH, tta=0, plain=None):
    """Logits for uint8 images, in evaluation mode, with test-time augmentation:
    tta=1 averages the logits of each image and its mirror image; tta=2 (airbench's
    level 2) gives that pair half the weight and the other half to the same pair
    shifted one pixel up-left and one pixel down-right (reflect padding).
    plain: the logits without augmentation, if a call with tta=0 already computed
    them, so that they are not computed twice."""
    def mirrored(batch, logits=None):
        if logits is None:
            logits = model.predict(normalize(batch, mean, std), batch_size)
        if tta:
            logits = 0.5 * (logits + model.predict(normalize(batch[..., ::-1], mean, std), batch_size))
        return logits

    out = []
    for i in range(0, len(images), batch_size):
        batch = np.asarray(images[i:i + batch_size])
        logits = mirrored(batch, None if plain is None else plain[i:i + batch_size])
        if tta >= 2:
            h, w = batch.shape[2:]
            padded = pad_images(batch, 1)
            shifted = 0.5 * (mirrored(padded[:, :, :h, :w]) + mirrored(padded[:, :, 2:, 2:]))
            logits = 0.5 * (logits + shifted)
        out.append(logits)
    return np.concatenate(out)


def score(logits, labels):
    """(mean cross-entropy, accuracy, predicted classes) of logits against labels."""
    labels = np.asarray(labels).astype(np.int64)
    loss = float(-log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels].mean())
    predictions = logits.argmax(axis=1)
    return loss, float((predictions == labels).mean()), predictions


def evaluate(model, images, labels, mean, std, batch_size=EVAL_BATCH, tta=0):
    """(mean cross-entropy, accuracy, predicted classes) on a whole set."""
    return score(predict_logits(model, images, mean, std, batch_size, tta), labels)


class Progress:
    """On a terminal, one line per epoch rewritten in place (images done, images/s,
    running loss, time left); otherwise nothing until the epoch's summary line."""

    def __init__(self, epoch, epochs, total, done=0, stream=sys.stderr):
        self.epoch, self.epochs, self.total, self.stream = epoch, epochs, total, stream
        self.tty, self.first = stream.isatty(), done
        self.start = self.last = time.time()

    def update(self, done, loss):
        now = time.time()
        if not self.tty or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        rate = (done - self.first) / max(now - self.start, 1e-9)
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        left = (self.total - done) / max(rate, 1e-9)
        print(f"\repoch {self.epoch}/{self.epochs} [{bar}] {done}/{self.total} {rate:,.0f} img/s "
              f"loss {loss:.4f} {left:4.0f}s left ", end="", file=self.stream, flush=True)

    def close(self):
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", file=self.stream, flush=True)


class StopRequest:
    """Within the block, Ctrl-C asks the training loop to stop after the current step
    (requested becomes True), so that a checkpoint always holds whole steps.  A
    second Ctrl-C stops at once.  Signals reach only the main thread: in another
    thread the block changes nothing."""

    def __init__(self):
        self.requested, self.previous = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def new_position(epoch=0):
    """Where training stands: the epoch, the batches done in it, and its running sums."""
    return dict(epoch=epoch, batch=0, loss_sum=0.0, correct=0, seen=0, seconds=0.0)


def train_epoch(model, loss_fn, optimizer, schedule, batches, at, steps_per_epoch, progress, stop=None):
    """Train on `batches`, the rest of epoch at["epoch"] from batch at["batch"],
    updating the position `at` after every step.  Returns True at the end of the
    epoch, False where stop.requested ended it early (after a whole step).  On Linux
    a TwinProcess computes half of every step, see train_step."""
    model.train()
    batches, upcoming = iter(batches), None

    def prepare_next():  # while the twin finishes the current step, see TwinProcess.step
        nonlocal upcoming
        upcoming = next(batches, None)

    prepare_next()
    with TwinProcess.where_usable(model, loss_fn) as twin:
        while upcoming is not None:
            x, y = upcoming
            step = at["epoch"] * steps_per_epoch + at["batch"]
            optimizer.lr = schedule(step)
            loss, logits = train_step(model, loss_fn, x, y, twin, meanwhile=prepare_next)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"the loss became {loss} at step {step}")
            optimizer.step()
            at["batch"] += 1
            at["loss_sum"] += loss * len(y)
            at["correct"] += int((logits.argmax(axis=1) == y).sum())
            at["seen"] += len(y)
            progress.update(at["seen"], at["loss_sum"] / at["seen"])
            if stop is not None and stop.requested and upcoming is not None:
                progress.close()
                return False
    progress.close()
    return True


def save_checkpoint(path, model, optimizer, meta):
    """Model, optimizer state and metadata (JSON) in one .npz, renamed into place."""
    extra = {"optimizer/" + k: v for k, v in optimizer.state.items()}
    extra["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    model.save(path, extra)


def load_checkpoint(path, model, optimizer=None):
    """Load a checkpoint written by save_checkpoint into model (and optimizer);
    returns its metadata.  A DataError names the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no checkpoint here (train first, or check --out)")
    extra = model.load(path)
    try:
        meta = json.loads(bytes(extra["meta"]).decode())
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: damaged checkpoint (no readable metadata: {type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: damaged checkpoint (metadata is not a record)")
    for key, value in (optimizer.state.items() if optimizer is not None else ()):
        stored = extra.get("optimizer/" + key)
        if stored is None or stored.shape != value.shape:
            raise DataError(f"{path}: optimizer state {key} missing or of the wrong shape "
                            f"(saved with another optimizer?)")
        value[...] = stored
    return meta


def fit(model, loss_fn, optimizer, schedule, train_set, val_set, mean, std, *, epochs,
        batch_size, seed=0, augment=None, checkpoint=None, meta=None, position=None,
        history=None, log=print):
    """The training loop: for each epoch, shuffle, train, measure on the validation
    set, log one line and save a checkpoint (weights, optimizer state, history and
    position, see new_position).

    Ctrl-C stops after the current step, saves the checkpoint at that exact position
    and raises KeyboardInterrupt; fit(..., position=, history=) with what
    load_checkpoint returned then goes on with the numbers of a run that was never
    interrupted.  A run killed outright resumes the same way from its last
    checkpoint (the end of the last whole epoch).  Stops with TrainingDiverged if
    the loss stops being finite (the last checkpoint is kept)."""
    history = list(history or [])
    (x_train, y_train), (x_val, y_val) = train_set, val_set
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    at = dict(new_position(), **(position or {}))
    meta = dict(meta or {})

    def save():
        if checkpoint:
            meta.update(position=at, history=history)
            save_checkpoint(checkpoint, model, optimizer, meta)

    with StopRequest() as stop:
        while at["epoch"] < epochs:
            epoch, start = at["epoch"], time.time()
            batches = iterate_batches(x_train, y_train, batch_size, mean, std, seed=seed, epoch=epoch,
                                      start=at["batch"], **(augment or {}))
            progress = Progress(epoch + 1, epochs, len(x_train), at["seen"])
            ended = train_epoch(model, loss_fn, optimizer, schedule, batches, at, steps_per_epoch, progress, stop)
            at["seconds"] += time.time() - start
            if not ended:
                save()
                raise KeyboardInterrupt
            val_loss, val_acc = evaluate(model, x_val, y_val, mean, std)[:2] if len(x_val) else (math.nan, math.nan)
            history.append(dict(epoch=epoch + 1, train_loss=at["loss_sum"] / at["seen"],
                                train_acc=at["correct"] / at["seen"], val_loss=val_loss, val_acc=val_acc,
                                seconds=at["seconds"], lr=optimizer.lr))
            val_text = f"val loss {val_loss:.4f} acc {val_acc:.4f}  " if len(x_val) else ""
            log(f"epoch {epoch + 1:3d}/{epochs}  train loss {history[-1]['train_loss']:.4f} "
                f"acc {history[-1]['train_acc']:.4f}  {val_text}{at['seconds']:.1f}s")
            at = new_position(epoch + 1)
            save()
            if stop.requested:
                raise KeyboardInterrupt
    return history


# --- metrics -------------------------------------------------------------------------------

def confusion_matrix(labels, predictions, num_classes):
    """cm[i, j] = how many images of class i were predicted as class j."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def f1_scores(cm):
    """Per-class F1 = 2 TP / (2 TP + FP + FN); a class never predicted and never
    present has no defined F1 and counts as 0, like a class with no hit."""
    tp = np.diag(cm).astype(np.float64)
    denominator = cm.sum(axis=0) + cm.sum(axis=1)  # = 2 TP + FP + FN
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def macro_f1(cm):
    return float(f1_scores(cm).mean())

