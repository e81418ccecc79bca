"""The feature network of the evaluation metrics: a small CNN per labelled dataset, its training and cache.

Inception-v3 cannot be downloaded here and is a poor judge of 28x28 grayscale clothing, so the
metrics of :mod:`ddpm_ms.evaluation.metrics` live in the penultimate feature space of this classifier,
trained on the real train split of the dataset (Fashion-MNIST, MNIST or CIFAR-10; folder
datasets have none, see :func:`require_feature_network`):

    conv3x3-BN-ReLU C->32, max-pool | conv3x3-BN-ReLU 32->64, max-pool | conv3x3-BN-ReLU 64->128,
    max-pool (28 -> 14 -> 7 -> 3; 32 -> 16 -> 8 -> 4) -> flatten -> Dense(128*3*3 or 128*4*4, 256)
    -> BN -> ReLU = features(x) -> Dropout(0.3) -> Dense(256, 10) = logits

(one convolution per resolution: a second one per stage costs 2-4x the training time on a CPU
for little accuracy).

Public API
----------
FashionCNN(channels=1, image_size=28)  the network; ``features(x)`` gives the penultimate features
train_classifier(data_dir, epochs, batch_size, lr, seed, limit=None, progress=True, dataset=...)
                                  -> (net, test_accuracy)
load_or_train_classifier(cache_dir=None, data_dir=None, ..., dataset="fashion_mnist")
                                  -> (net, info); trains once per dataset, then loads from the cache
extract(net, images, batch_size=500) -> (features float64 [N, D], probabilities float64 [N, 10])
to_model_input(images, channels=1, image_size=28)
                                  uint8 or [-1, 1] float images -> float32 [N, C, S, S] in [-1, 1]

The cache is ``$DDPM_MS_CACHE/classifier`` if ``DDPM_MS_CACHE`` is set, else
``$XDG_CACHE_HOME/ddpm_ms/classifier`` (``~/.cache/ddpm_ms/classifier``). A cached network is
keyed by :data:`CLASSIFIER_VERSION` and its training settings; it is written like the model
checkpoints (temporary name, fsync, ``os.replace``, CRC) together with its test accuracy.
Computing runs as compiled graphs (GRAPH_MODE is set while training and extracting, then the
previous mode is restored).
"""

import contextlib
import os
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.utils.cache import cache_dir
from ddpm_ms.utils.errors import UserError

# Bump when the architecture, the preprocessing or the training recipe changes: the metric
# space changes with it, and numbers computed with different versions are not comparable.
CLASSIFIER_VERSION = "fmnist-cnn-v1"
CLASSIFIER_VERSIONS = {"fashion_mnist": CLASSIFIER_VERSION, "mnist": "mnist-cnn-v1", "cifar10": "cifar10-cnn-v1"}
FEATURE_DIM = 256
NUM_CLASSES = 10
MIN_TEST_ACCURACY = 0.92
# the bar a freshly trained network must reach on the real test split, per dataset (CIFAR-10's is
# what a 3-conv CNN of 5 epochs can be expected to pass; it has not been measured on real CIFAR-10)
MIN_ACCURACIES = {"fashion_mnist": MIN_TEST_ACCURACY, "mnist": 0.98, "cifar10": 0.65}

# The recipe of the cached classifier (and the defaults of load_or_train_classifier).
DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-3
DEFAULT_SEED = 0
DEFAULT_SHIFT = 0  # pixels of random shift in training (flips are always on)

_EVAL_BATCH = 500


# --------------------------------------------------------------------------- the network

def _conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, pad_mode="same", has_bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class FashionCNN(nn.Cell):
    """A conv-BN-ReLU CNN for [N, C, S, S] images in [-1, 1]; ``construct`` returns logits."""

    def __init__(self, widths=(32, 64, 128), feature_dim=FEATURE_DIM, num_classes=NUM_CLASSES, dropout=0.3,
                 channels=1, image_size=28):
        super().__init__()
        w1, w2, w3 = widths
        pool = lambda: nn.MaxPool2d(2, 2)  # noqa: E731
        self.body = nn.SequentialCell(_conv_bn_relu(channels, w1) + [pool()] + _conv_bn_relu(w1, w2) + [pool()]
                                      + _conv_bn_relu(w2, w3) + [pool()])  # 28 -> 14 -> 7 -> 3
        side = image_size // 2 // 2 // 2
        self.input_shape = (channels, image_size)  # what to_model_input checks in extract
        self.flatten = nn.Flatten()
        self.embed = nn.SequentialCell([nn.Dense(w3 * side * side, feature_dim, has_bias=False),
                                        nn.BatchNorm1d(feature_dim), nn.ReLU()])
        self.dropout = nn.Dropout(p=dropout)
        self.head = nn.Dense(feature_dim, num_classes)

    def features(self, x):
        """Penultimate features [N, feature_dim] (after ReLU)."""
        return self.embed(self.flatten(self.body(x)))

    def construct(self, x):
        return self.head(self.dropout(self.features(x)))


class _FeaturesAndLogits(nn.Cell):
    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, x):
        f = self.net.features(x)
        return f, self.net.head(f)


class _TrainStep(nn.Cell):
    """Cross-entropy loss, gradients and one Adam update, compiled as one graph."""

    def __init__(self, net, optimizer):
        super().__init__(auto_prefix=False)
        self.net = net
        self.optimizer = optimizer
        self.loss_fn = nn.CrossEntropyLoss()
        self.grad_fn = ms.value_and_grad(self.forward, None, optimizer.parameters)

    def forward(self, x, y):
        return self.loss_fn(self.net(x), y)

    def construct(self, x, y):
        loss, grads = self.grad_fn(x, y)
        self.optimizer(grads)
        return loss


@contextlib.contextmanager
def graph_mode():
    """Run the block in GRAPH_MODE (compiled cells), restoring the previous mode afterwards."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=previous)


# --------------------------------------------------------------------------- images in, features out

def to_model_input(images, channels=1, image_size=28):
    """[N, C, S, S] (or [N, S, S] for C = 1) uint8 (0..255) or float in [-1, 1] -> float32 [N, C, S, S] in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim == 3 and channels == 1:
        images = images[:, None]
    want = (channels, image_size, image_size)
    if images.ndim != 4 or images.shape[1:] != want:
        alt = f" or [N, {image_size}, {image_size}]" if channels == 1 else ""
        raise UserError(f"images must have shape [N, {channels}, {image_size}, {image_size}]{alt}, "
                        f"got {list(images.shape)}")
    if images.dtype == np.uint8:
        return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    if not np.issubdtype(images.dtype, np.floating):
        raise UserError(f"images must be uint8 (0..255) or floats in [-1, 1], got dtype {images.dtype}")
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise UserError("images contain NaN or infinite values")
    return np.clip(images, -1.0, 1.0)


def extract(net, images, batch_size=_EVAL_BATCH):
    """Penultimate features and class probabilities of ``images`` (see :func:`to_model_input`).

    Returns (features float64 [N, D], probabilities float64 [N, classes]). The network runs in
    inference mode in fixed-size batches (the last one padded) so the graph compiles once.
    """
    x = to_model_input(images, *net.input_shape)
    n = x.shape[0]
    if n == 0:
        raise UserError("no images to evaluate")
    batch_size = min(batch_size, n)
    net.set_train(False)
    cell = _FeaturesAndLogits(net)
    feats, logits = [], []
    with graph_mode():
        for start in range(0, n, batch_size):
            chunk = x[start:start + batch_size]
            m = chunk.shape[0]
            if m < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], np.float32)])
            f, lg = cell(Tensor(chunk))
            feats.append(f.asnumpy()[:m])
            logits.append(lg.asnumpy()[:m])
    feats = np.concatenate(feats).astype(np.float64)
    logits = np.concatenate(logits).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return feats, probs


def accuracy(net, images, labels, batch_size=_EVAL_BATCH):
    _, probs = extract(net, images, batch_size)
    return float(np.mean(probs.argmax(axis=1) == np.asarray(labels)))


# --------------------------------------------------------------------------- training

def augment(batch, rng, max_shift=1):
    """Random horizontal flips and shifts of up to ``max_shift`` pixels (zero = -1 padding), NumPy.

    batch: float32 [B, C, H, W] in [-1, 1].
    """
    b, c, h, w = batch.shape
    flip = rng.random(b) < 0.5
    batch = np.where(flip[:, None, None, None], batch[..., ::-1], batch)
    if max_shift:
        s = max_shift
        padded = np.pad(batch, ((0, 0), (0, 0), (s, s), (s, s)), constant_values=-1.0)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))  # [B, C, 2s+1, 2s+1, h, w]
        dy, dx = rng.integers(0, 2 * s + 1, (2, b))
        batch = windows[np.arange(b), :, dy, dx]
    return np.ascontiguousarray(batch, dtype=np.float32)


def create_classifier(dataset="fashion_mnist"):
    """The untrained network for ``dataset``'s images (its channels and size from the dataset spec)."""
    from ddpm_ms.data import dataset_spec

    spec = dataset_spec(dataset)
    return FashionCNN(num_classes=spec.num_classes, channels=spec.channels, image_size=spec.image_size)


def require_feature_network(dataset):
    """UserError unless ``dataset`` has a feature network (the labelled datasets do, folders do not)."""
    from ddpm_ms.data import LABELLED

    if dataset not in LABELLED:
        raise UserError(f"no feature network exists for dataset {dataset!r}: FD, IS, precision and recall are "
                        f"measured in the feature space of a classifier trained on a labelled dataset "
                        f"({', '.join(LABELLED)}); a folder of images has none, so its samples cannot be scored")


def train_classifier(data_dir, epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE, lr=DEFAULT_LR,
                     seed=DEFAULT_SEED, limit=None, progress=True, test_limit=None, max_shift=DEFAULT_SHIFT,
                     dataset="fashion_mnist"):
    """Train :class:`FashionCNN` on the train split of ``dataset`` in ``data_dir`` -> (net, test accuracy).

    Adam with a cosine-decayed learning rate (``lr`` -> ``lr``/100), random horizontal flips (and
    shifts of up to ``max_shift`` pixels), one compiled training step. ``limit`` trains on the
    first ``limit`` train images only, ``test_limit`` tests on the first ``test_limit`` test
    images (both for quick checks); progress goes to stderr.
    """
    from ddpm_ms.data import load_split

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UserError(f"classifier training needs epochs >= 1, batch_size >= 1, lr > 0; "
                        f"got {epochs}, {batch_size}, {lr}")
    train_x, train_y = load_split(dataset, data_dir, "train")
    test_x, test_y = load_split(dataset, data_dir, "test")
    if limit:
        train_x, train_y = train_x[:limit], train_y[:limit]
    if test_limit:
        test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    n = train_x.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    train_x = to_model_input(train_x, train_x.shape[1], train_x.shape[2])
    train_y = train_y.astype(np.int32)

    ms.set_seed(seed)
    rng = np.random.default_rng([seed, 7])
    net = create_classifier(dataset)
    rates = nn.cosine_decay_lr(lr / 100, lr, total, 1, total) if total > 1 else [lr]
    optimizer = nn.Adam(net.trainable_params(), learning_rate=rates, weight_decay=1e-4)
    step = _TrainStep(net, optimizer)
    t0 = time.time()
    with graph_mode():
        net.set_train(True)
        for epoch in range(epochs):
            order = rng.permutation(n)
            losses = []
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                x = augment(train_x[idx], rng, max_shift)
                losses.append(float(step(Tensor(x), Tensor(train_y[idx])).asnumpy()))
                if progress and (i + 1) % 100 == 0:
                    print(f"\r  classifier epoch {epoch + 1}/{epochs} step {i + 1}/{steps_per_epoch} "
                          f"loss {np.mean(losses[-100:]):.4f}", end="", file=sys.stderr, flush=True)
            if progress:
                print(f"\r  classifier epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} "
                      f"({time.time() - t0:.0f} s)" + " " * 20, file=sys.stderr, flush=True)
    net.set_train(False)
    acc = accuracy(net, test_x, test_y)
    return net, acc


# --------------------------------------------------------------------------- the cache

def default_cache_dir():
    """``$DDPM_MS_CACHE/classifier``, else ``$XDG_CACHE_HOME/ddpm_ms/classifier`` (``~/.cache/...``)."""
    return cache_dir("classifier")


def cache_key(epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE, lr=DEFAULT_LR, seed=DEFAULT_SEED, limit=None,
              dataset="fashion_mnist"):
    key = f"{CLASSIFIER_VERSIONS[dataset]}_e{epochs}_b{batch_size}_lr{lr:g}_s{seed}"
    return key + (f"_n{limit}" if limit else "")


def save_classifier(net, path, info):
    """Write ``net`` and ``info`` (a JSON-able dict) atomically to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt.save(path, {"model": ckpt.named_params(net)}, {"kind": "classifier", **info})
    return path


def load_classifier(path):
    """-> (net, info) from a file written by :func:`save_classifier`."""
    groups, meta = ckpt.load(path)
    if meta.get("kind") != "classifier":
        raise UserError(f"{path} is not a ddpm_ms classifier checkpoint")
    dataset = meta.get("dataset", "fashion_mnist")
    version = CLASSIFIER_VERSIONS.get(dataset)
    if meta.get("version") != version:
        raise UserError(f"{path} holds classifier {meta.get('version')!r}, this ddpm_ms uses "
                        f"{version!r}; delete it to retrain")
    net = create_classifier(dataset)
    ckpt.assign(ckpt.named_params(net), groups["model"], "classifier", path)
    net.set_train(False)
    return net, meta


def load_or_train_classifier(cache_dir=None, data_dir=None, epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE,
                             lr=DEFAULT_LR, seed=DEFAULT_SEED, limit=None, progress=True,
                             min_accuracy=None, retrain=False, test_limit=None, log=sys.stderr,
                             dataset="fashion_mnist"):
    """The cached classifier of ``dataset`` for these settings, training (and caching) it first if needed.

    Returns (net, info) with info = {"version", "key", "test_accuracy", "train_seconds", ...}.
    ``test_limit`` measures the accuracy on the first ``test_limit`` test images only (quick checks).
    The test accuracy is printed to ``log``. Raises UserError when a freshly trained network
    stays below ``min_accuracy`` (default: the dataset's, :data:`MIN_ACCURACIES`) on the real test
    split (it is not cached then).
    """
    from ddpm_ms import data

    require_feature_network(dataset)
    min_accuracy = MIN_ACCURACIES[dataset] if min_accuracy is None else min_accuracy
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    key = cache_key(epochs, batch_size, lr, seed, limit, dataset)
    path = os.path.join(cache_dir, key + ".ckpt")
    if os.path.isfile(path) and not retrain:
        try:
            net, info = load_classifier(path)
        except UserError as e:
            print(f"WARNING: ignoring the cached classifier ({e}); retraining", file=log, flush=True)
        else:
            if log:
                print(f"classifier {key}: test accuracy {info['test_accuracy']:.2%} (cached: {path})",
                      file=log, flush=True)
            return net, info
    data_dir = data.locate(dataset, data_dir)
    if log:
        print(f"training the evaluation classifier {key} ({epochs} epochs; cached afterwards in {cache_dir})",
              file=log, flush=True)
    t0 = time.time()
    net, acc = train_classifier(data_dir, epochs, batch_size, lr, seed, limit=limit, progress=progress,
                                test_limit=test_limit, dataset=dataset)
    seconds = time.time() - t0
    if log:
        print(f"classifier {key}: test accuracy {acc:.2%} (trained in {seconds:.0f} s)", file=log, flush=True)
    if acc < min_accuracy:
        raise UserError(f"the evaluation classifier reached only {acc:.2%} test accuracy (needs "
                        f"{min_accuracy:.0%}); train it longer (more epochs)")
    info = {"version": CLASSIFIER_VERSIONS[dataset], "dataset": dataset, "key": key, "test_accuracy": acc,
            "train_seconds": seconds,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "limit": limit,
            "test_images": test_limit or 10000,
            "feature_dim": FEATURE_DIM}
    try:
        save_classifier(net, path, info)
    except OSError as e:
        print(f"WARNING: could not cache the classifier in {cache_dir} ({e.strerror or e})", file=log, flush=True)
    return net, dict(info, kind="classifier")
