"""Tiny fake datasets written in the real on-disk formats, so that the real loading code runs."""
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # the suite's ops are tiny; threads only add overhead on 2 cores


def write_idx(path, array):
    """The MNIST idx format: magic (0x0803 images / 0x0801 labels), sizes as big-endian int32, then bytes."""
    magic = 0x0800 | array.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_images(n, shape, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.fixture
def mnist_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in [("train", 64, 0), ("t10k", 32, 1)]:
        write_idx(raw / f"{prefix}-images-idx3-ubyte", fake_images(n, (28, 28), seed))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


def write_cifar_bin(folder, n_train=20, n_test=12):
    """The official binary version: records of <label byte><1024 R><1024 G><1024 B>."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, name in enumerate(names):
        n = n_test if name == "test_batch.bin" else n_train
        x = fake_images(n, (3, 32, 32), 10 + i)
        records = np.concatenate([np.full((n, 1), i % 10, np.uint8), x.reshape(n, -1)], axis=1)
        records.tofile(folder / name)
        images[name] = x
    return images


@pytest.fixture
def cifar_bin_dir(tmp_path):
    write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    return tmp_path


def write_cifar_py(folder, n_train=20, n_test=12):
    """torchvision's python version: pickled dicts with 'data' of shape (N, 3072)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else n_train
        x = fake_images(n, (3, 32, 32), 20 + i)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x.reshape(n, -1), "labels": [0] * n}, f)
        images[name] = x
    return images


def write_svhn(folder, n_train=20, n_test=12):
    """The official .mat files: X of shape (32, 32, 3, N), y of shape (N, 1)."""
    from scipy.io import savemat
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for split, n, seed in [("train", n_train, 30), ("test", n_test, 31)]:
        x = fake_images(n, (3, 32, 32), seed)
        savemat(folder / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": np.ones((n, 1), np.uint8)})
        images[split] = x
    return images
