"""Small real data sets that ship with a package, for demos, tests and recipes."""

from __future__ import annotations

import numpy as np


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's handwritten digits as 8x8x1 float32 images in [0, 1].

    1,797 images of 10 classes, shipped inside scikit-learn (nothing is
    downloaded). The split is stratified and fixed by ``seed``.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``, labels as int32.

    Example:
        >>> (x_train, y_train), (x_test, y_test) = tfopt.datasets.load_digits()
        >>> x_train.shape
        (1347, 8, 8, 1)
    """
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "The digits data set ships with scikit-learn: pip install scikit-learn"
        ) from exc
    data = _load()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


# Topics of Python's language reference (pydoc_data.topics), grouped into the classes
# load_python_docs predicts.
_DOC_CLASSES = {
    "statements": (
        "assert", "assignment", "async", "augassign", "await", "break", "class", "compound",
        "context-managers", "continue", "del", "else", "exceptions", "for", "function",
        "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while",
        "with", "yield"),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "binary", "bitwise",
        "booleans", "calls", "comparisons", "conversions", "exprlists", "floating",
        "formatstrings", "id-classes", "identifiers", "imaginary", "in", "integers", "lambda",
        "numbers", "operator-summary", "power", "shifting", "slicings", "strings",
        "subscriptions", "unary"),
    "builtin types": (
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object",
        "bltin-type-objects", "dict", "lists", "numeric-types", "sequence-types",
        "string-methods", "truth", "types", "typesfunctions", "typesmapping", "typesmethods",
        "typesmodules", "typesseq", "typesseq-mutable"),
    "data model": (
        "attribute-access", "callable-types", "customization", "debugger",
        "dynamic-features", "execmodel", "naming", "objects", "specialattrs",
        "specialnames"),
}


def load_python_docs(sequence_length: int = 32, vocabulary_size: int = 2000,
                     test_fraction: float = 0.25, seed: int = 0):
    """A text classification task on Python's own language reference.

    The reference's topics ship with CPython (``pydoc_data.topics``, what
    ``help("for")`` prints; nothing is downloaded). Each sample is a window
    of ``sequence_length`` consecutive words of one topic, and its label says
    which part of the reference the topic belongs to: ``class_names`` =
    statements, expressions, builtin types, data model. Windows do not
    overlap, so no text is both in the training and the test split. Words
    are lower-cased and split at punctuation; the ``vocabulary_size - 2``
    most frequent words of the training split get ids from 2 (0 pads, 1 is
    an unknown word).

    Returns:
        ``(x_train, y_train), (x_test, y_test), class_names``; ``x`` are int32
        token ids of shape ``(samples, sequence_length)``, labels int32.

    Example:
        >>> (x_train, y_train), (x_test, y_test), names = tfopt.datasets.load_python_docs()
        >>> x_train.shape[1], len(names)
        (32, 4)
    """
    import collections
    import re

    from pydoc_data.topics import topics

    if not isinstance(sequence_length, int) or sequence_length < 2:
        raise ValueError(f"sequence_length must be an integer >= 2, got {sequence_length!r}.")
    windows, labels = [], []
    for label, names in enumerate(_DOC_CLASSES.values()):
        for name in names:
            words = re.findall(r"[a-z_]+|\d+|[^\sa-z_\d]", topics.get(name, "").lower())
            for start in range(0, len(words) - sequence_length + 1, sequence_length):
                windows.append(words[start:start + sequence_length])
                labels.append(label)
    order = np.random.default_rng(seed).permutation(len(windows))
    test = set(order[:int(round(test_fraction * len(windows)))].tolist())
    counts = collections.Counter(w for i, window in enumerate(windows) if i not in test
                                 for w in window)
    ids = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocabulary_size - 2))}
    x = np.array([[ids.get(w, 1) for w in window] for window in windows], np.int32)
    y = np.array(labels, np.int32)
    train_rows = np.array([i for i in order if i not in test], np.int64)
    test_rows = np.array([i for i in order if i in test], np.int64)
    return ((x[train_rows], y[train_rows]), (x[test_rows], y[test_rows]),
            list(_DOC_CLASSES))


# What keras.utils.image_dataset_from_directory reads, and the bytes each kind starts with.
_IMAGE_SIGNATURES = {".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",),
                     ".png": (b"\x89PNG\r\n\x1a\n",), ".gif": (b"GIF87a", b"GIF89a"),
                     ".bmp": (b"BM",)}
_VALIDATION_NAMES = ("val", "validation")


def _class_images(directory) -> dict:
    """``{class name: [image paths]}`` of a folder with one sub-folder per class."""
    from pathlib import Path

    classes = {}
    for folder in sorted(p for p in Path(directory).iterdir() if p.is_dir()):
        classes[folder.name] = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SIGNATURES)
    return classes


def _whole(path, suffix: str, size: int, head: bytes) -> bool:
    """Whether an image file ends as its format ends, read from its last bytes only: a
    file cut short (an interrupted copy or download) does not."""
    if suffix == ".bmp":  # the header records the file's size
        return size >= int.from_bytes(head[2:6], "little")
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 64))
        tail = handle.read()
    if suffix in (".jpg", ".jpeg"):
        return b"\xff\xd9" in tail  # end-of-image marker (some writers pad after it)
    if suffix == ".png":
        return b"IEND" in tail[-16:]
    return b";" in tail[-8:]  # GIF trailer


def _check_images(directory, what: str, *, min_classes: int = 2,
                  consequence: str = "nothing was trained") -> int:
    """Refuse, before any work, a folder of classes tfopt cannot use.

    Each image's first bytes and last bytes are read (not the whole file):
    a file whose bytes are not the image its extension says, or that is cut
    short, is named with the others. A class folder without images is
    refused too (the model would get a class it never sees). Returns the
    number of images.
    """
    from tfopt.errors import ConfigError

    classes = _class_images(directory)
    empty = [name for name, paths in classes.items() if not paths]
    with_images = {name: paths for name, paths in classes.items() if paths}
    if len(with_images) < min_classes:
        raise ConfigError(
            f"{what} {directory} has {len(with_images)} class folder(s) with images "
            f"({', '.join(f'{k}: {len(v)}' for k, v in classes.items()) or 'no sub-folders'}): "
            f"it needs one sub-folder per class{', at least two,' if min_classes > 1 else ''} "
            f"each holding images ({', '.join(sorted(_IMAGE_SIGNATURES))}).")
    if empty:
        raise ConfigError(
            f"{what} {directory}: class folder(s) {', '.join(empty)} hold no images "
            f"({', '.join(sorted(_IMAGE_SIGNATURES))}); a model would get a class it never "
            f"sees. Add images or remove the folders; {consequence}.")
    unreadable = []
    for paths in with_images.values():
        for path in paths:
            suffix = path.suffix.lower()
            size = path.stat().st_size
            with open(path, "rb") as handle:
                head = handle.read(8)
            if not head.startswith(_IMAGE_SIGNATURES[suffix]):
                unreadable.append(f"{path} (not a {suffix[1:]} file)")
            elif not _whole(path, suffix, size, head):
                unreadable.append(f"{path} (cut short)")
    if unreadable:
        raise ConfigError(
            f"{len(unreadable)} file(s) in {directory} are not whole images of the kind their "
            f"names say: {', '.join(unreadable[:10])}{' ...' if len(unreadable) > 10 else ''}. "
            f"Remove or replace them; {consequence}.")
    return sum(len(v) for v in with_images.values())


def _check_reading(image_size, batch_size, validation_split, seed, color_mode) -> tuple:
    """image_folder's arguments, checked before anything is read."""
    import numbers

    from tfopt import _checks
    from tfopt.errors import ConfigError

    if not (isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
            for v in image_size)):
        raise ConfigError(f"image_folder: image_size must be [height, width], positive "
                          f"integers, got {image_size!r}.")
    size = tuple(int(v) for v in image_size)
    _checks.number("image_folder: batch_size", batch_size, low=1, integer=True)
    if validation_split is not None:
        _checks.number("image_folder: validation_split", validation_split, low=0, high=1,
                       low_open=True, high_open=True,
                       hint="It is the fraction held out for validation, e.g. 0.2.")
    _checks.number("image_folder: seed", seed, integer=True)
    if color_mode not in ("rgb", "grayscale", "rgba"):
        raise ConfigError(f"image_folder: color_mode must be 'rgb', 'grayscale' or 'rgba', got "
                          f"{color_mode!r}.")
    return size


def image_folder(directory, image_size, *, batch_size: int = 32, validation_split=None,
                 seed: int = 0, color_mode: str = "rgb", shuffle: bool = True):
    """A folder of images, one sub-folder per class, as ``(train, validation)`` datasets.

    The folder holds either ``train/`` and ``val/`` (or ``validation/``)
    sub-folders, each with one sub-folder per class, or the class folders
    themselves, split by ``validation_split``. Images are read by
    ``keras.utils.image_dataset_from_directory`` as batches of
    ``(float32 images in [0, 255], int32 labels)``, streamed from disk: the
    model's own preprocessing (``Rescaling``, ``preprocess_input``) stays in
    the model. Before anything is read, every image's header is checked: a
    folder with fewer than two classes, no images, or files that are not the
    images their names say is refused, naming them.

    Args:
        directory: The folder.
        image_size: ``(height, width)`` the images are resized to.
        batch_size: Images per batch.
        validation_split: Fraction held out for validation, when the folder
            has no ``val/`` sub-folder.
        seed: Shuffling and split seed.
        color_mode: ``"rgb"``, ``"grayscale"`` or ``"rgba"``.
        shuffle: Shuffle the training split (the validation split never is).

    Returns:
        ``(train_dataset, validation_dataset)``; each has ``class_names``.

    Example:
        >>> train, val = tfopt.datasets.image_folder("data/flowers", (224, 224))
    """
    from pathlib import Path

    import keras

    from tfopt.errors import ConfigError

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"image_folder: {directory!r} is not a folder. Give the folder that "
                          "holds train/ and val/, or one sub-folder per class.")
    image_size = _check_reading(image_size, batch_size, validation_split, seed, color_mode)
    read = dict(image_size=image_size, batch_size=int(batch_size), seed=int(seed),
                color_mode=color_mode, label_mode="int", verbose=False)
    validation = next((root / n for n in _VALIDATION_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and validation is not None:
        if validation_split is not None:
            raise ConfigError(f"image_folder: {directory} has train/ and {validation.name}/; "
                              "validation_split is for a folder of classes. Remove it.")
        _check_images(root / "train", "image_folder train/")
        _check_images(validation, f"image_folder {validation.name}/")
        train = keras.utils.image_dataset_from_directory(root / "train", shuffle=shuffle, **read)
        val = keras.utils.image_dataset_from_directory(validation, shuffle=False, **read)
        if train.class_names != val.class_names:
            raise ConfigError(
                f"image_folder: train/ has classes {train.class_names}, {validation.name}/ has "
                f"{val.class_names}; they must be the same folders.")
        return train, val
    if (root / "train").is_dir():
        raise ConfigError(f"image_folder: {directory} has train/ but no val/ or validation/ "
                          "folder beside it. Add one, or pass validation_split.")
    if validation_split is None:
        raise ConfigError(f"image_folder: {directory} has no train/ and val/ sub-folders; for "
                          "a folder of classes pass validation_split (e.g. 0.2).")
    _check_images(root, "image_folder")
    # One seed for both halves: image_dataset_from_directory splits after a seeded shuffle.
    train = keras.utils.image_dataset_from_directory(
        root, validation_split=validation_split, subset="training", shuffle=True, **read)
    val = keras.utils.image_dataset_from_directory(
        root, validation_split=validation_split, subset="validation", shuffle=True, **read)
    return train, val


def image_folder_for_evaluation(directory, image_size, *, batch_size: int = 32,
                                color_mode: str = "rgb"):
    """The images of a folder to check or measure a model on, unshuffled.

    ``directory`` may be what :func:`image_folder` takes (its ``val/`` or
    ``validation/`` split is used), a folder with one sub-folder per class
    (labelled: accuracy can be measured), or a folder of images alone
    (inputs only).

    Returns:
        A ``tf.data.Dataset`` of ``(images, labels)`` or of images.
    """
    from pathlib import Path

    import keras

    from tfopt.errors import ConfigError

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{directory!r} is not a folder of images.")
    root = next((root / n for n in _VALIDATION_NAMES if (root / n).is_dir()), root)
    image_size = _check_reading(image_size, batch_size, None, 0, color_mode)
    read = dict(image_size=image_size, batch_size=int(batch_size), shuffle=False,
                color_mode=color_mode, verbose=False)
    if any(p.is_dir() for p in root.iterdir()):
        _check_images(root, "the folder", min_classes=1, consequence="nothing was read")
        return keras.utils.image_dataset_from_directory(root, label_mode="int", **read)
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SIGNATURES)
    if not images:
        raise ConfigError(f"{directory} holds no images ({', '.join(sorted(_IMAGE_SIGNATURES))}) "
                          "and no class sub-folders.")
    return keras.utils.image_dataset_from_directory(root, labels=None, **read)
