"""Datasets, and the one place that decides pixel conventions.

Every dataset is held as a uint8 tensor of shape (N, C, H, W) (pixel values k in 0..255) and turned
into floats only per batch, by `to_unit`: the value k/255 in [0, 1], as torchvision gives them.
Binarized MNIST is in {0, 1}. The number of bins a likelihood uses is passed to it explicitly
by the scripts (`NUM_BINS`), never guessed from a dataset name.

Sources, in the order they are tried:
- MNIST: torchvision's layout `<data-dir>/MNIST/raw/` (downloaded by torchvision when missing).
- CIFAR-10: the official binary version `<data-dir>/cifar-10-batches-bin/*.bin`, else torchvision's
  python version `<data-dir>/cifar-10-batches-py/`, else the official binary archive is downloaded
  (md5 checked) into `<data-dir>`.
- SVHN: `<data-dir>/{train,test}_32x32.mat` (the official files, as torchvision stores them),
  downloaded with torchvision's utilities (md5 checked) when missing.
"""
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass

try:
    import fcntl
except ImportError:  # not on Windows: torchrun's processes there could download at once
    fcntl = None

import numpy as np
import torch

from common import UserError
from devices import started_by_torchrun

NUM_BINS = 256  # 8-bit pixels
TEST_BINARIZATION_SEED = 20151102  # fixed: every evaluation sees the same binarized test set
STATIC_BINARIZATION_SEED = 12345

CIFAR10_BIN_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BIN_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch.bin"]
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat"
SVHN_MD5 = {"train": "e26dedcc434d2e4c54c9b2d4a06d8373", "test": "eb5a983be6a315427106f1b8d6b3fe2f"}
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


class DataError(UserError):
    """The data is neither on disk nor downloadable; the message says what is expected and where."""


@dataclass
class ImageData:
    name: str
    train: torch.Tensor  # uint8 (N, C, H, W)
    test: torch.Tensor  # uint8, or float {0, 1} for binarized MNIST's fixed test set
    binarize_train: bool = False  # draw a fresh binarization for every training batch
    dequantize_train: bool = False  # add uniform noise over each value's bin to every training batch

    def train_batch(self, x):
        """A batch of `train` as the model sees it: floats in [0, 1], binarized afresh if dynamic, or
        dequantized afresh (then in [-1/510, 1 + 1/510])."""
        x = to_unit(x) if x.dtype == torch.uint8 else x
        if self.dequantize_train:
            return dequantize(x)
        return binarize(x) if self.binarize_train else x

    def train_mean(self):
        """Per-pixel mean of the training set in [0, 1] (for binarized MNIST: the probability of a 1)."""
        return self.test_batch(self.train).mean(0)

    def test_batch(self, x):
        return to_unit(x) if x.dtype == torch.uint8 else x


def to_unit(x_uint8):
    """uint8 pixels k -> float k/255 in [0, 1]."""
    return x_uint8.float() / (NUM_BINS - 1)


def dequantize(x):
    """Uniform dequantization (Theis et al. 2016): k/255 -> (k + u - 1/2)/255, u ~ U(0, 1), uniform over the
    bin [k/255 - 1/510, k/255 + 1/510) that the discretized likelihoods give to value k (the issue's x + u/256
    moves every value by up to half a bin relative to those bins). A density p trained on these values bounds
    the discrete log-likelihood: log P(k) >= E_u log p((k + u - 1/2)/255) - log 255 per sub-pixel."""
    return x + (torch.rand_like(x) - 0.5) / (NUM_BINS - 1)


def binarize(x, generator=None):
    """Bernoulli draw with the pixel intensity in [0, 1] as probability (Burda et al. 2015)."""
    return torch.bernoulli(x, generator=generator)


def _fixed_binarization(x_uint8, seed):
    g = torch.Generator().manual_seed(seed)
    return binarize(to_unit(x_uint8), generator=g)


def _missing(what, where, hint, err):
    reason = " ".join(str(err).split())  # torchvision's messages span lines; keep one paragraph
    return DataError(
        f"{what} is not in {where} and could not be downloaded ({type(err).__name__}: {reason}). "
        f"{hint} Pass --data-dir with the folder that holds it.")


def _remove_empty(created):
    """Leave no empty folders behind from a failed download."""
    for d in reversed(created):
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)


@contextlib.contextmanager
def _one_process_at_a_time(data_dir):
    """Under torchrun every process loads the data: the first to come downloads it, the others wait for it (a lock
    file in the temporary folder, named for data_dir), then read what it wrote."""
    if not started_by_torchrun() or fcntl is None:
        yield
        return
    key = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"vae-mdl-data-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_mnist(data_dir, binarization="dynamic", download=True):
    """Binarized MNIST as in the IWAE paper.

    binarization="dynamic": training images are uint8 and binarized afresh for every batch;
    "static": one fixed binarization of the training set (NOT comparable with the paper's numbers).
    The test set is always binarized once with TEST_BINARIZATION_SEED.
    """
    from torchvision.datasets import MNIST
    created = [d for d in (data_dir, os.path.join(data_dir, "MNIST"), os.path.join(data_dir, "MNIST", "raw"))
               if not os.path.exists(d)]
    try:
        with _one_process_at_a_time(data_dir):
            train = MNIST(data_dir, train=True, download=download).data
            test = MNIST(data_dir, train=False, download=download).data
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ... offline
        _remove_empty(created)
        raise _missing("MNIST", os.path.join(data_dir, "MNIST", "raw"),
                       f"Expected torchvision's files {', '.join(MNIST_FILES)} (or their .gz).", err) from None
    train, test = train.unsqueeze(1), test.unsqueeze(1)  # (N, 1, 28, 28) uint8
    test = _fixed_binarization(test, TEST_BINARIZATION_SEED)
    if binarization == "static":
        return ImageData("mnist-static", _fixed_binarization(train, STATIC_BINARIZATION_SEED), test)
    return ImageData("mnist", train, test, binarize_train=True)


def read_cifar10_bin(path):
    """Official binary version: records of <1 label byte><1024 R><1024 G><1024 B>."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise DataError(f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes is not a multiple of 3073.")
    return torch.from_numpy(raw.reshape(-1, 3073)[:, 1:].reshape(-1, 3, 32, 32).copy())


ARRAY_PICKLE = {  # all that a pickled numpy array names, by pickle protocols 0 to 5 and numpy 1 (core) or 2 (_core)
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


def read_cifar10_py(folder, files):
    """torchvision's python version: pickles of dicts of numpy arrays, lists and strings. A pickle can run code when
    it is loaded; these are loaded naming nothing but numpy's array, so a crafted file is refused, never run."""
    import pickle

    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in ARRAY_PICKLE:
                raise DataError(f"Refused to load {path}: a CIFAR-10 batch holds numpy arrays, lists and strings, and "
                                f"this file names {module}.{name}, which loading it would run. Use the official "
                                f"files, from a source you trust.")
            return super().find_class(module, name)
    chunks = []
    for f in files:
        path = os.path.join(folder, f)
        with open(path, "rb") as fh:
            chunks.append(ArraysOnly(fh, encoding="latin1").load()["data"])
    return torch.from_numpy(np.concatenate(chunks).reshape(-1, 3, 32, 32))


def load_cifar10(data_dir, download=True):
    bin_dir = os.path.join(data_dir, "cifar-10-batches-bin")
    py_dir = os.path.join(data_dir, "cifar-10-batches-py")
    if not all(os.path.exists(os.path.join(bin_dir, f)) for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
        if os.path.isdir(py_dir):
            train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
            if all(os.path.exists(os.path.join(py_dir, f)) for f in train_files + test_files):
                return ImageData("cifar10", read_cifar10_py(py_dir, train_files), read_cifar10_py(py_dir, test_files))
        created = [] if os.path.exists(data_dir) else [data_dir]
        try:
            if not download:
                raise FileNotFoundError("downloading is switched off")
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(CIFAR10_BIN_URL, data_dir, md5=CIFAR10_BIN_MD5)
        except Exception as err:
            _remove_empty(created)
            raise _missing("CIFAR-10", bin_dir, "Expected the official binary version "
                           f"({', '.join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)}) or torchvision's "
                           f"python version in {py_dir}.", err) from None
    train = torch.cat([read_cifar10_bin(os.path.join(bin_dir, f)) for f in CIFAR10_TRAIN_FILES])
    test = torch.cat([read_cifar10_bin(os.path.join(bin_dir, f)) for f in CIFAR10_TEST_FILES])
    return ImageData("cifar10", train, test)


def read_svhn_mat(path):
    """Official format: X of shape (32, 32, 3, N) uint8."""
    from scipy.io import loadmat
    return torch.from_numpy(np.ascontiguousarray(loadmat(path)["X"].transpose(3, 2, 0, 1)))


def load_svhn(data_dir, download=True):
    splits = {}
    for split in ("train", "test"):
        path = os.path.join(data_dir, f"{split}_32x32.mat")
        if not os.path.exists(path):
            created = [] if os.path.exists(data_dir) else [data_dir]
            try:
                if not download:
                    raise FileNotFoundError("downloading is switched off")
                from torchvision.datasets.utils import download_url
                download_url(SVHN_URL.format(split=split), data_dir, f"{split}_32x32.mat", SVHN_MD5[split])
            except Exception as err:
                _remove_empty(created)
                raise _missing("SVHN", data_dir, "Expected the official train_32x32.mat and test_32x32.mat.", err) from None
        splits[split] = read_svhn_mat(path)
    return ImageData("svhn", splits["train"], splits["test"])


def load_colour(name, data_dir, download=True):
    with _one_process_at_a_time(data_dir):
        return {"cifar10": load_cifar10, "svhn": load_svhn}[name](data_dir, download=download)
