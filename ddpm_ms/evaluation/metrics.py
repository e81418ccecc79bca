"""Sample-quality metrics in the feature space of a dataset's classifier (pure NumPy, float64).

- Fréchet distance (FD): the FID formula of Heusel et al. 2017,
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``, between Gaussians fitted to the penultimate
  features of :mod:`ddpm_ms.evaluation.classifier` (not Inception: these numbers are only comparable with
  other FDs computed with the same classifier version).
- Inception-Score-like score (Salimans et al. 2016) from the classifier's class probabilities:
  ``exp(E_x KL(p(y|x) || p(y)))``; 1 (worst) to 10 (best) for 10 classes.
- Precision and recall as k-NN manifold estimates (Kynkäänniemi et al. 2019): precision is the
  fraction of generated samples inside the real manifold (the union of balls around each real
  feature reaching its k-th nearest real neighbour), recall the fraction of real samples inside
  the generated manifold.
- The real-data floor: the same metrics for a random subset of the real TRAIN split, of the size
  of the generated set, against the TEST split. FD has a positive bias that grows as the set
  shrinks, so an FD is judged against the floor at the same N.

Public API
----------
frechet_distance(mu1, sigma1, mu2, sigma2) -> float
feature_stats(feats) -> (mu, sigma)
inception_score(probs, splits=10) -> (mean, std)
precision_recall(real_feats, fake_feats, k=3, batch_size=1000) -> (precision, recall)
RealReference.build(classifier, data_dir, dataset="fashion_mnist")
                                             the test-split features, train images for the floor
evaluate_images(images, classifier, real_test_feats, ...) -> dict of metrics
summary_line(result) -> "FD x (floor y), IS z, precision p, recall r"
"""

import numpy as np

from ddpm_ms.utils.errors import UserError


# --------------------------------------------------------------------------- Fréchet distance

def _sqrt_psd(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix (eigen-decomposition)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
    """tr((S1 S2)^1/2) for symmetric PSD S1, S2.

    S1 S2 is similar to S1^1/2 S2 S1^1/2 (= S1^-1/2 (S1 S2) S1^1/2 when S1 is invertible; by
    continuity otherwise), which is symmetric PSD: its eigenvalues are real and >= 0, so the trace
    of the square root is the sum of their square roots. No non-symmetric sqrtm is needed.
    """
    root = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    middle = root @ np.asarray(sigma2, dtype=np.float64) @ root
    w = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(fd, 0.0))  # rounding can leave a tiny negative value for identical statistics


def feature_stats(feats):
    """Mean and covariance (unbiased, rows are samples) of features [N, D], in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise UserError(f"need at least 2 feature vectors [N, D] for a covariance, got shape {list(feats.shape)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fd_of_features(feats1, feats2):
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


# --------------------------------------------------------------------------- Inception-like score

def inception_score(probs, splits=10, eps=1e-12):
    """exp(E_x KL(p(y|x) || p(y))) over ``splits`` equal parts -> (mean, std) across the parts.

    probs: [N, C] class probabilities (rows sum to 1). p(y) is the mean prediction of each part.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    splits = max(1, min(int(splits), probs.shape[0]))
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(part + eps) - np.log(marginal + eps)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- precision / recall

def _sq_norms(x):
    return np.einsum("ij,ij->i", x, x)


def _pairwise_sq_dists(a, b, b_sq=None):
    """Squared Euclidean distances [len(a), len(b)] (clipped at 0 against rounding)."""
    b_sq = _sq_norms(b) if b_sq is None else b_sq
    d = _sq_norms(a)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def knn_radii(feats, k=3, batch_size=1000):
    """Squared distance from each row to its k-th nearest other row (the row itself excluded)."""
    feats = np.asarray(feats, dtype=np.float64)
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} points, got {k}")
    sq = _sq_norms(feats)
    radii = np.empty(n)
    for start in range(0, n, batch_size):
        d = _pairwise_sq_dists(feats[start:start + batch_size], feats, sq)
        # the point itself is at distance ~0: the k-th neighbour is the (k+1)-th smallest entry
        radii[start:start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def manifold_coverage(manifold_feats, radii, query_feats, batch_size=1000):
    """Fraction of ``query_feats`` within radius of at least one manifold point."""
    manifold_feats = np.asarray(manifold_feats, dtype=np.float64)
    query_feats = np.asarray(query_feats, dtype=np.float64)
    sq = _sq_norms(manifold_feats)
    inside = np.empty(query_feats.shape[0], dtype=bool)
    for start in range(0, query_feats.shape[0], batch_size):
        d = _pairwise_sq_dists(query_feats[start:start + batch_size], manifold_feats, sq)
        inside[start:start + batch_size] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real_feats, fake_feats, k=3, batch_size=1000):
    """Improved precision and recall (Kynkäänniemi et al. 2019) -> (precision, recall).

    Distances are computed ``batch_size`` rows at a time, so memory stays at
    batch_size x max(N_real, N_fake) float64 values. The paper compares sets of equal size.
    """
    real_feats = np.asarray(real_feats, dtype=np.float64)
    fake_feats = np.asarray(fake_feats, dtype=np.float64)
    precision = manifold_coverage(real_feats, knn_radii(real_feats, k, batch_size), fake_feats, batch_size)
    recall = manifold_coverage(fake_feats, knn_radii(fake_feats, k, batch_size), real_feats, batch_size)
    return precision, recall


# --------------------------------------------------------------------------- evaluating images

class RealReference:
    """What the metrics compare against: the real TEST split's features and probabilities, and
    the real TRAIN images the floor is drawn from."""

    def __init__(self, test_feats, test_probs=None, train_images=None):
        self.test_feats = np.asarray(test_feats, dtype=np.float64)
        self.test_probs = test_probs
        self.train_images = train_images
        self._test_stats = None
        self._floors = {}  # (n, k, splits, seed, classifier id) -> metrics of the real train subset

    @property
    def test_stats(self):
        if self._test_stats is None:
            self._test_stats = feature_stats(self.test_feats)
        return self._test_stats

    @classmethod
    def build(cls, classifier, data_dir, dataset="fashion_mnist"):
        from ddpm_ms.evaluation.classifier import extract
        from ddpm_ms.data import load_split

        test_images, _ = load_split(dataset, data_dir, "test")
        train_images, _ = load_split(dataset, data_dir, "train")
        feats, probs = extract(classifier, test_images)
        return cls(feats, probs, train_images)


def prepare_reference(data_dir=None, cache_dir=None, progress=True, dataset="fashion_mnist"):
    """The cached (or freshly trained) classifier of ``dataset`` and its real reference -> (net, info, reference)."""
    from ddpm_ms import data
    from ddpm_ms.evaluation.classifier import load_or_train_classifier, require_feature_network

    require_feature_network(dataset)
    data_dir = data.locate(dataset, data_dir)
    net, info = load_or_train_classifier(cache_dir=cache_dir, data_dir=data_dir, progress=progress, dataset=dataset)
    return net, info, RealReference.build(net, data_dir, dataset)


def class_shares(probs):
    """Share of the images that the classifier assigns (argmax) to each class: [C] floats summing to 1."""
    probs = np.asarray(probs)
    return np.bincount(probs.argmax(1), minlength=probs.shape[1]) / probs.shape[0]


def _metrics(feats, probs, reference, k, splits, seed):
    n = feats.shape[0]
    out = {"fd": frechet_distance(*feature_stats(feats), *reference.test_stats)}
    out["class_shares"] = [float(v) for v in class_shares(probs)]  # class coverage of the samples
    out["is"], out["is_std"] = inception_score(probs, splits)
    # precision/recall compare sets of equal size (as in the paper): m fixed random test images
    # against the first m samples
    real = reference.test_feats
    m = min(n, real.shape[0])
    if m < real.shape[0]:
        real = real[np.random.default_rng([seed, 2]).choice(real.shape[0], m, replace=False)]
    if m > k:
        out["precision"], out["recall"] = precision_recall(real, feats[:m], k)
    else:
        out["precision"] = out["recall"] = None
    return out


def evaluate_images(images, classifier, real_test_feats, real_train_images=None, k=3, splits=10, seed=0,
                    real_test_probs=None):
    """Score generated ``images`` ([N, C, S, S] in [-1, 1], or uint8) against the real test split.

    real_test_feats: classifier features of the real test split (or a :class:`RealReference`,
    which then also supplies the train images). With real train images, the same metrics are
    computed for a random train subset of N images -- the real-data floor -- under "floor".
    Returns a JSON-able dict: num_samples, fd, fd_floor, is, is_std, precision, recall, class_shares
    (the share of the images the classifier puts in each class), k, floor.
    """
    from ddpm_ms.evaluation.classifier import extract

    if not isinstance(real_test_feats, RealReference):
        reference = RealReference(real_test_feats, real_test_probs, real_train_images)
    elif real_train_images is not None:
        reference = RealReference(real_test_feats.test_feats, real_test_feats.test_probs, real_train_images)
    else:
        reference = real_test_feats
    feats, probs = extract(classifier, images)
    n = feats.shape[0]
    if n < 2:
        raise UserError(f"need at least 2 images to evaluate, got {n}")
    result = {"num_samples": n, **_metrics(feats, probs, reference, k, splits, seed), "k": k}
    result["fd_floor"] = None
    result["floor"] = None
    if reference.train_images is not None:
        key = (n, k, splits, seed, id(classifier))
        if key not in reference._floors:
            train = reference.train_images
            idx = np.random.default_rng([seed, 1]).choice(train.shape[0], min(n, train.shape[0]), replace=False)
            r_feats, r_probs = extract(classifier, train[np.sort(idx)])
            reference._floors[key] = _metrics(r_feats, r_probs, reference, k, splits, seed)
        result["floor"] = dict(reference._floors[key])
        result["fd_floor"] = result["floor"]["fd"]
    return result


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def summary_line(result):
    """"FD x (floor y), IS z, precision p, recall r, smallest class share s%" for one result of
    :func:`evaluate_images`."""
    line = (f"FD {_fmt(result['fd'], '.3f')} (floor {_fmt(result.get('fd_floor'), '.3f')}), "
            f"IS {_fmt(result['is'], '.3f')}, precision {_fmt(result['precision'], '.3f')}, "
            f"recall {_fmt(result['recall'], '.3f')}")
    if result.get("class_shares"):
        line += f", smallest class share {100 * min(result['class_shares']):.1f}%"
    return line
