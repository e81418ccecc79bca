"""MNIST and Fashion-MNIST: where their IDX files are looked for, and how they are fetched.

locate_idx(name, data_dir=None, cache_dir=None, download=True, ...)
    A directory holding the four uncompressed, validated IDX files (see :mod:`.idx`).
locate_fashion_mnist(...) / locate_mnist(...)
    The same for one dataset.
default_cache_dir(name="fashion_mnist")
    Where the files are cached.

Order: ``--data-dir``, the per-user cache, a system location (Debian's
``dataset-fashion-mnist``), then a checksum-verified download. Both datasets share the file
names and the format; only titles, mirrors, MD5s and system locations differ (SOURCES).
"""

import os

from ddpm_ms.utils.cache import cache_dir
from ddpm_ms.utils.errors import UserError

from ddpm_ms.data.fetch import (
    cache_lock,
    directory_problem,
    download_with_package,
    fetch_checked,
    remove_quietly,
    write_atomic,
)
from ddpm_ms.data.idx import (
    FILES,
    SPLITS,
    _check_pair,
    _expect_kind,
    _header_of_raw_file,
    _parse_idx,
    _read_bytes,
    validate_dir,
)

# Where Debian's package ``dataset-fashion-mnist`` installs the four gz files.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

# The original Fashion-MNIST mirror and the MD5s of its gz files (from the Fashion-MNIST
# README). Debian's package recompresses the files, so its gz files have other MD5s: those
# are validated by their IDX structure instead.
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

# MNIST: the S3 mirror PyTorch uses (the original host at yann.lecun.com often refuses
# downloads); the MD5s are those of the original gz files.
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

SOURCES = {
    "fashion_mnist": {"title": "Fashion-MNIST", "cache_name": "fashion-mnist", "mirror": FASHION_MNIST_MIRROR,
                      "md5": FASHION_MNIST_MD5, "system_dirs": (DEBIAN_DIR,),
                      "install_hint": "or run `apt-get install dataset-fashion-mnist`, "},
    "mnist": {"title": "MNIST", "cache_name": "mnist", "mirror": MNIST_MIRROR, "md5": MNIST_MD5,
              "system_dirs": (), "install_hint": ""},
}


# --------------------------------------------------------------------------- locating the data

def default_cache_dir(name="fashion_mnist"):
    """The cache of an IDX dataset: ``~/.cache/ddpm_ms/<fashion-mnist|mnist>`` (under
    ``$XDG_CACHE_HOME`` when set). For Fashion-MNIST ``$DDPM_MS_DATA``, if set, wins (as before
    there were other datasets)."""
    return cache_dir(SOURCES[name]["cache_name"])  # ddpm_ms.utils.cache: $DDPM_MS_DATA names fashion-mnist's


def _complete_raw(directory):
    """None if ``directory`` holds the four valid uncompressed files, else why not (str)."""
    return directory_problem(directory, lambda d: validate_dir(d, "all"))


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _materialize(src_dir, dest_dir):
    """Make ``dest_dir`` hold the four uncompressed files, taken from ``src_dir``.

    Per file, a valid uncompressed copy in ``src_dir`` is used as is, else its ``.gz`` is
    decompressed and validated. Everything is validated before anything is written, and each
    file is written atomically. Returns None on success, else why not (str).
    """
    if not os.path.isdir(src_dir):
        return "no such directory"
    same = _same_file(src_dir, dest_dir)
    payloads = {}
    dims = {}
    problems = []
    for name in FILES:
        raw, gz = os.path.join(src_dir, name), os.path.join(src_dir, name + ".gz")
        raw_problem = None
        if os.path.isfile(raw):
            try:
                magic, d = _header_of_raw_file(raw)
                _expect_kind(raw, magic, name)
                dims[name] = (raw, d)
                payloads[name] = None if same else raw  # copy later, only if needed
                continue
            except UserError as e:
                raw_problem = str(e)
        if os.path.isfile(gz):
            try:
                data = _read_bytes(gz)
                magic, arr = _parse_idx(data, gz)
                _expect_kind(gz, magic, name)
                dims[name] = (gz, arr.shape)
                payloads[name] = data
                continue
            except UserError as e:
                problems.append(str(e) if raw_problem is None else f"{raw_problem}; {e}")
                continue
        problems.append(raw_problem or f"missing {name} (or {name}.gz)")
    if problems:
        return ", ".join(problems)
    try:
        for images_name, labels_name in SPLITS["all"]:
            (ip, idims), (lp, ldims) = dims[images_name], dims[labels_name]
            _check_pair(ip, lp, idims, ldims)
    except UserError as e:
        return str(e)
    try:
        for name, payload in payloads.items():
            if payload is None:
                continue
            target = os.path.join(dest_dir, name)
            if isinstance(payload, str):  # uncompressed file elsewhere: copy it
                with open(payload, "rb") as f:
                    payload = f.read()
            write_atomic(target, payload)
    except OSError as e:
        return f"could not write the decompressed files into {dest_dir}: {e}"
    return _complete_raw(dest_dir)


def _download_into(cache_dir, downloader, checksums, mirror):
    """Fetch the four gz files into ``cache_dir``, verify MD5s, decompress.

    Returns None on success, else why not (str).
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        return f"cannot create {cache_dir}: {e}"
    base = mirror if mirror.endswith("/") else mirror + "/"
    for name in FILES:
        gz_name = name + ".gz"
        problem = fetch_checked(base + gz_name, os.path.join(cache_dir, gz_name), downloader,
                                checksums.get(gz_name))
        if problem is not None:
            return problem
    problem = _materialize(cache_dir, cache_dir)
    if problem is None:
        for name in FILES:
            remove_quietly(os.path.join(cache_dir, name + ".gz"))
    return problem


def locate_idx(name, data_dir=None, cache_dir=None, download=True, *, system_dirs=None,
               downloader=None, checksums=None, mirror=None):
    """Return a directory holding the four uncompressed, validated IDX files of ``name``
    (``"fashion_mnist"`` or ``"mnist"``).

    Tried in order:

    a. ``data_dir``, if given: it must hold the files, uncompressed or ``.gz`` (gz files are
       decompressed into ``cache_dir``, which is then returned). If it is given but unusable,
       ``UserError`` is raised at once; nothing else is tried.
    b. ``cache_dir`` (default :func:`default_cache_dir`).
    c. each of ``system_dirs`` (default: the dataset's, e.g. ``(DEBIAN_DIR,)`` for Debian's
       package ``dataset-fashion-mnist``; none for MNIST); gz files are decompressed into
       ``cache_dir``.
    d. if ``download``: ``downloader(url, dest_path)`` (default: the ``download`` package)
       fetches the four gz files from ``mirror`` (default: the dataset's) into ``cache_dir``;
       their MD5s must match ``checksums`` (default: the dataset's published MD5s, e.g.
       :data:`FASHION_MNIST_MD5`; files not listed are not checked).

    Files written into the cache are written atomically (temp file + ``os.replace``), and
    b.-d. and the decompression of a. run under :func:`~.fetch.cache_lock`: concurrent processes
    (msrun) fill the cache once, the others wait and use it. A complete cache is used unlocked.
    If everything fails, one ``UserError`` lists every place tried, why each failed, and how
    to provide the files.
    """
    source = SOURCES[name]
    title = source["title"]
    cache_dir = os.path.abspath(os.path.expanduser(
        os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(name)))
    system_dirs = source["system_dirs"] if system_dirs is None else tuple(system_dirs)
    checksums = source["md5"] if checksums is None else dict(checksums)
    mirror = source["mirror"] if mirror is None else mirror
    how = (f"pass --data-dir DIR with the four files ({', '.join(FILES)}, uncompressed or .gz), "
           f"{source['install_hint']}or copy the four files into {cache_dir}")

    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
        if _complete_raw(data_dir) is None:
            return data_dir  # used in place: nothing is written, no lock
        with cache_lock(cache_dir):
            problem = _materialize(data_dir, cache_dir)
        if problem is None:
            return cache_dir
        raise UserError(f"{title} data dir {data_dir} is unusable: {problem}. Fix: {how}")

    if _complete_raw(cache_dir) is None:
        return cache_dir  # the usual case: only read, so a read-only cache works
    # Fill the cache under its lock: of several processes (msrun) one downloads, the others wait
    # and then find it complete here.
    with cache_lock(cache_dir):
        tried = []
        problem = _complete_raw(cache_dir)
        if problem is None:
            return cache_dir
        # The cache may hold gz files (e.g. copied in by hand): decompress them in place.
        if os.path.isdir(cache_dir) and any(
                os.path.isfile(os.path.join(cache_dir, n + ".gz")) for n in FILES):
            problem = _materialize(cache_dir, cache_dir)
            if problem is None:
                return cache_dir
        tried.append(f"cache dir {cache_dir}: {problem}")

        for sysdir in system_dirs:
            sysdir = os.path.abspath(os.fspath(sysdir))
            problem = _materialize(sysdir, cache_dir)
            if problem is None:
                return cache_dir
            tried.append(f"system dir {sysdir}: {problem}")

        if download:
            problem = _download_into(cache_dir, downloader or download_with_package, checksums,
                                     mirror)
            if problem is None:
                return cache_dir
            tried.append(f"download from {mirror}: {problem}")
        else:
            tried.append("download: not allowed (download=False)")

    places = "; ".join(f"({i}) {t}" for i, t in enumerate(tried, 1))
    raise UserError(f"{title} not found. Tried: {places}. Fix: {how}")


def locate_fashion_mnist(data_dir=None, cache_dir=None, download=True, *, system_dirs=None,
                         downloader=None, checksums=None, mirror=FASHION_MNIST_MIRROR):
    """:func:`locate_idx` for Fashion-MNIST."""
    return locate_idx("fashion_mnist", data_dir, cache_dir, download, system_dirs=system_dirs,
                      downloader=downloader, checksums=checksums, mirror=mirror)


def locate_mnist(data_dir=None, cache_dir=None, download=True, *, system_dirs=None,
                 downloader=None, checksums=None, mirror=MNIST_MIRROR):
    """:func:`locate_idx` for MNIST."""
    return locate_idx("mnist", data_dir, cache_dir, download, system_dirs=system_dirs,
                      downloader=downloader, checksums=checksums, mirror=mirror)
