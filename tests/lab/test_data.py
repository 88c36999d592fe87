"""Offline datasets: shapes, normalisation, the victim/query split, and the missing-data error."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from mlflow_project.lab import data


def test_fashion_mnist_shapes_and_labels():
    x, y = data.load_raw("fashion_mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(y).tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    xtr, ytr = data.load_raw("fashion_mnist", "train")
    assert xtr.shape == (60000, 1, 28, 28) and ytr.shape == (60000,)


@pytest.mark.parametrize("name, n, side", [("mnist5k", 5000, 28), ("digits", 1797, 8)])
def test_small_datasets_shapes_and_fixed_partition(name, n, side):
    x, y = data.load_raw(name, "all")
    assert x.shape == (n, 1, side, side) and y.shape == (n,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert set(y.tolist()) == set(range(10))
    train_idx, test_idx = data._fixed_partition(n, data.TEST_FRACTION[name])
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert len(train_idx) + len(test_idx) == n
    xtr, _ = data.load_raw(name, "train")
    xte, _ = data.load_raw(name, "test")
    assert torch.equal(xtr, x[train_idx]) and torch.equal(xte, x[test_idx])


def test_victim_data_is_normalised():
    vd = data.victim_data("fashion_mnist")
    assert vd.spec.shape == (1, 28, 28) and vd.spec.num_classes == 10
    assert abs(vd.train.x.mean().item()) < 0.01 and abs(vd.train.x.std().item() - 1) < 0.01
    dd = data.victim_data("digits")
    assert dd.train.x.shape[1:] == (64,) and len(dd.train) + len(dd.test) == 1797


@pytest.mark.parametrize("victim_dataset", ["fashion_mnist", "digits", "mnist5k"])
def test_query_set_from_victim_dataset_is_its_train_part_only(victim_dataset):
    spec = data.input_spec(victim_dataset)
    q = data.query_set(victim_dataset, spec)
    vd = data.victim_data(victim_dataset)
    assert torch.equal(q, vd.train.x), "the in-distribution query set must be exactly the victim's train split"
    # and, image by image, it holds none of the test rows that are not also train rows
    train_rows = {r.numpy().tobytes() for r in vd.train.x}
    test_only = [r for r in vd.test.x if r.numpy().tobytes() not in train_rows]
    assert len(test_only) > 0.99 * len(vd.test)
    q_rows = {r.numpy().tobytes() for r in q}
    assert not any(r.numpy().tobytes() in q_rows for r in test_only)


def test_cross_dataset_query_sets_are_adapted_to_the_victim_input():
    lenet_spec = data.input_spec("fashion_mnist")
    q = data.query_set("digits", lenet_spec)
    assert q.shape == (1797, 1, 28, 28)
    q2 = data.query_set("mnist5k", lenet_spec)
    assert q2.shape == (5000, 1, 28, 28)
    # normalised with the victim's statistics, not the query set's own
    raw, _ = data.load_raw("mnist5k", "all")
    assert torch.allclose(q2, (raw - lenet_spec.mean) / lenet_spec.std)
    mlp_spec = data.input_spec("digits")
    q3 = data.query_set("mnist5k", mlp_spec)
    assert q3.shape == (5000, 64)


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(data.MissingDataError, match="dataset-fashion-mnist") as err:
        data.load_raw("fashion_mnist", "train")
    assert str(tmp_path) in str(err.value) and data.DATA_DIR_ENV in str(err.value)


def test_data_dir_override_reads_idx_files(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28) % 256
    labels = np.array([7, 1, 4], dtype=np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 3, 28, 28) + images.astype(np.uint8).tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 3) + labels.tobytes())
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    x, y = data.load_raw("fashion_mnist", "test")
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [7, 1, 4]
    assert torch.allclose(x[0, 0] * 255, torch.from_numpy(images[0].astype(np.float32)))


def test_bad_idx_and_unknown_names_are_refused(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(bad)
    truncated = tmp_path / "short-idx"
    truncated.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="declares"):
        data.read_idx(truncated)
    with pytest.raises(ValueError, match="allowed: fashion_mnist, mnist5k, digits"):
        data.load_raw("cifar10", "train")
    with pytest.raises(ValueError, match="allowed: train, test, all"):
        data.load_raw("digits", "validation")
