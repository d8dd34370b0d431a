import pickle

import numpy as np
import pytest
import torch

import data
from conftest import write_cifar_bin, write_cifar_py, write_svhn


def test_mnist_loads_from_idx_files(mnist_dir):
    mnist = data.load_mnist(str(mnist_dir), download=False)
    assert mnist.train.shape == (64, 1, 28, 28) and mnist.train.dtype == torch.uint8
    assert mnist.test.shape == (32, 1, 28, 28)
    assert set(mnist.test.unique().tolist()) == {0.0, 1.0}


def test_mnist_test_set_is_binarized_the_same_every_time(mnist_dir):
    a = data.load_mnist(str(mnist_dir), download=False).test
    torch.manual_seed(123)
    b = data.load_mnist(str(mnist_dir), download=False).test
    assert torch.equal(a, b)


def test_mnist_training_batches_are_binarized_afresh(mnist_dir):
    mnist = data.load_mnist(str(mnist_dir), download=False)
    x1, x2 = mnist.train_batch(mnist.train), mnist.train_batch(mnist.train)
    assert set(x1.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(x1, x2)
    # E[binarized pixel] = intensity k/255
    draws = torch.stack([mnist.train_batch(mnist.train[:4]) for _ in range(400)]).mean(0)
    assert (draws - data.to_unit(mnist.train[:4])).abs().max() < 0.15


def test_static_binarization_is_fixed(mnist_dir):
    mnist = data.load_mnist(str(mnist_dir), binarization="static", download=False)
    assert torch.equal(mnist.train_batch(mnist.train), mnist.train_batch(mnist.train))
    assert mnist.name == "mnist-static"


def test_missing_mnist_says_what_and_where(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load_mnist(str(tmp_path / "nowhere"), download=False)
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "nowhere") in message


def test_cifar10_binary_version(tmp_path):
    images = write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    cifar = data.load_cifar10(str(tmp_path), download=False)
    assert cifar.train.shape == (100, 3, 32, 32) and cifar.test.shape == (12, 3, 32, 32)
    assert np.array_equal(cifar.test.numpy(), images["test_batch.bin"])
    assert np.array_equal(cifar.train[:20].numpy(), images["data_batch_1.bin"])
    x = cifar.test_batch(cifar.test)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x * 255, cifar.test.float())


def test_cifar10_python_version(tmp_path):
    images = write_cifar_py(tmp_path / "cifar-10-batches-py")
    cifar = data.load_cifar10(str(tmp_path), download=False)
    assert np.array_equal(cifar.test.numpy(), images["test_batch"])
    assert cifar.train.shape == (100, 3, 32, 32)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_cifar10_python_batch_of_any_pickle_protocol_loads(tmp_path, protocol):
    x = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(tmp_path / "batch", "wb") as f:
        pickle.dump({"data": x, "labels": [0] * 4, "batch_label": "b", "filenames": ["f"] * 4}, f, protocol=protocol)
    assert np.array_equal(data.read_cifar10_py(str(tmp_path), ["batch"]).numpy().reshape(4, -1), x)


def test_a_cifar10_python_batch_that_would_run_code_is_refused(tmp_path):
    import os

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)
    write_cifar_py(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": RunsCode(), "labels": []}, f)
    with pytest.raises(data.DataError, match=r"Refused to load .*data_batch_3: .* names \w+\.system"):
        data.load_cifar10(str(tmp_path), download=False)
    assert not (tmp_path / "ran").exists()


def test_cifar10_truncated_file_is_an_error(tmp_path):
    write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    with open(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(data.DataError, match="multiple of 3073"):
        data.load_cifar10(str(tmp_path), download=False)


def test_svhn_mat_files(tmp_path):
    images = write_svhn(tmp_path)
    svhn = data.load_svhn(str(tmp_path), download=False)
    assert np.array_equal(svhn.test.numpy(), images["test"])
    assert svhn.train.shape == (20, 3, 32, 32)


def test_missing_colour_data_says_what_and_where(tmp_path):
    with pytest.raises(data.DataError, match="cifar-10-batches-bin"):
        data.load_cifar10(str(tmp_path), download=False)
    with pytest.raises(data.DataError, match="train_32x32.mat"):
        data.load_svhn(str(tmp_path), download=False)
