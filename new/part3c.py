
# --- drawing (Pillow, imported here only) -------------------------------------------------

def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _save_png(image, path):
    tmp = f"{path}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _nice_ticks(low, high, count=6):
    """Round tick values covering [low, high]."""
    span = max(high - low, 1e-12)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def draw_learning_curve(history, test_loss, title, path, size=(900, 560)):
    """Training error per epoch (green), validation error (blue) and the final test
    error (red horizontal line), cross-entropy on the y axis."""
    from PIL import Image, ImageDraw
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small, big = _font(15), _font(13), _font(18)
    left, right, top, bottom = 80, width - 30, 60, height - 60
    # (name, colour, [(epoch, error)]) without the NaNs of epochs lacking a value;
    # a series with no value at all (--val 0) is neither drawn nor listed.
    series = [(name, color, [(h["epoch"], h[key]) for h in history if math.isfinite(h[key])])
              for name, color, key in (("training error", (30, 150, 50), "train_loss"),
                                       ("validation error", (40, 90, 200), "val_loss"))]
    series = [entry for entry in series if entry[2]]
    values = [v for _, _, pairs in series for _, v in pairs] + [test_loss]
    yticks = _nice_ticks(0.0, max(values) * 1.05)
    ymax = yticks[-1]
    x_last = max(history[-1]["epoch"], 2)
    xticks = [t for t in _nice_ticks(1, x_last, 8) if t >= 1 and float(t).is_integer()] or [1]

    def px(epoch, value):
        return (left + (right - left) * (epoch - 1) / (x_last - 1),
                bottom - (bottom - top) * value / ymax)

    for t in yticks:  # grid and y ticks
        y = px(1, t)[1]
        draw.line([(left, y), (right, y)], fill=(228, 228, 228))
        draw.text((left - 8, y), f"{t:g}", fill="black", font=small, anchor="rm")
    for t in xticks:
        x = px(t, 0)[0]
        draw.line([(x, bottom), (x, bottom + 5)], fill="black")
        draw.text((x, bottom + 8), f"{int(t)}", fill="black", font=small, anchor="ma")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    draw.text(((left + right) / 2, height - 22), "epoch", fill="black", font=font, anchor="mm")
    label = Image.new("RGBA", (300, 24), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((150, 12), "cross-entropy error", fill="black", font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    image.paste(label, (8, (top + bottom) // 2 - 150), label)
    draw.text((width / 2, 28), title, fill="black", font=big, anchor="mm")

    y_test = px(1, test_loss)[1]
    draw.line([(left, y_test), (right, y_test)], fill=(210, 40, 40), width=2)
    for name, color, pairs in series:
        points = [px(e, v) for e, v in pairs]
        if len(points) > 1:
            draw.line(points, fill=color, width=3, joint="curve")
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    legend = series + [(f"test error (final) {test_loss:.3f}", (210, 40, 40), None)]
    lx, ly = right - 250, top + 10
    draw.rectangle([lx - 10, ly - 8, right - 8, ly + 22 * len(legend)], fill="white", outline=(180, 180, 180))
    for i, (name, color, _) in enumerate(legend):
        y = ly + 22 * i + 7
        draw.line([(lx, y), (lx + 30, y)], fill=color, width=3)
        draw.text((lx + 40, y), name, fill="black", font=small, anchor="lm")
    _save_png(image, path)


def draw_confusion_matrix(cm, classes, title, path, cell=54):
    """Rows: true class, columns: predicted class; darker blue = more images."""
    from PIL import Image, ImageDraw
    k = len(classes)
    font, small = _font(15), _font(12)
    margin_left, margin_top = 130, 140
    size = (margin_left + k * cell + 20, margin_top + k * cell + 50)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((size[0] / 2, 20), title, fill="black", font=font, anchor="mm")
    draw.text((margin_left + k * cell / 2, 45), "predicted class", fill="black", font=font, anchor="mm")
    row_max = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        y = margin_top + i * cell
        draw.text((margin_left - 8, y + cell / 2), classes[i], fill="black", font=small, anchor="rm")
        for j in range(k):
            x = margin_left + j * cell
            share = cm[i, j] / row_max[i, 0]
            shade = tuple(int(255 - share * (255 - c)) for c in (20, 70, 160))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade, outline=(220, 220, 220))
            draw.text((x + cell / 2, y + cell / 2), str(cm[i, j]), font=small, anchor="mm",
                      fill="white" if share > 0.5 else "black")
    for j in range(k):  # column names, rotated
        label = Image.new("RGBA", (margin_top - 60, cell), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((margin_top - 62, cell / 2), classes[j], fill="black", font=small, anchor="rm")
        label = label.rotate(90, expand=True)
        image.paste(label, (margin_left + j * cell, 58), label)
    draw.text((20, margin_top + k * cell + 25), "rows: true class", fill="black", font=small, anchor="lm")
    _save_png(image, path)


def draw_mistakes(images, labels, predictions, classes, title, path, count=40, columns=8, scale=3):
    """A grid of misclassified images, each captioned true -> predicted."""
    from PIL import Image, ImageDraw
    wrong = np.flatnonzero(np.asarray(predictions) != np.asarray(labels))[:count]
    c, h, w = images.shape[1:]
    tile_w, tile_h = max(w * scale, 110) + 10, h * scale + 38
    rows = max(1, math.ceil(len(wrong) / columns))
    image = Image.new("RGB", (columns * tile_w + 10, rows * tile_h + 50), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(11)
    draw.text((image.width / 2, 22), title if len(wrong) else title + ": no mistakes", fill="black",
              font=font, anchor="mm")
    for n, i in enumerate(wrong):
        r, col = divmod(n, columns)
        x, y = 10 + col * tile_w, 45 + r * tile_h
        pixels = np.asarray(images[i]).transpose(1, 2, 0)
        picture = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
        picture = picture.resize((w * scale, h * scale), Image.NEAREST)
        image.paste(picture, (x + (tile_w - 10 - w * scale) // 2, y))
        draw.text((x + (tile_w - 10) / 2, y + h * scale + 4), f"true {classes[labels[i]]}",
                  fill=(30, 120, 40), font=small, anchor="ma")
        draw.text((x + (tile_w - 10) / 2, y + h * scale + 18), f"pred {classes[predictions[i]]}",
                  fill=(200, 30, 30), font=small, anchor="ma")
    _save_png(image, path)


