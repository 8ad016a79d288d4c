"""Data loading through the same code path users hit, on small files written in the real on-disk formats."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pruneflow.data import Batches, carve, load_split, random_crop_flip
from pruneflow.infer.data import carve_id
from pruneflow.errors import UserError


def write_idx(path, array):
    """The MNIST IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def make_mnist(root, n_train=20, n_test=10):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
        data[prefix] = (images, labels)
    return data


def make_cifar10(root, n=8):
    """CIFAR-10 python pickle batches: dicts with data (N, 3072 uint8, CHW planes) and labels."""
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)  # read with encoding="latin1": str keys
        batches[name] = (data, labels)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                      "horse", "ship", "truck"]}, f)
    return batches


def skip_cifar_checksums(monkeypatch):
    """torchvision checks the real files' MD5 sums; ours are stand-ins in the same format. With md5=None its
    check_integrity only checks that each file exists; everything else is torchvision's real reader."""
    import torchvision

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=None))


def test_mnist_idx_files(tmp_path):
    written = make_mnist(tmp_path)
    images, labels = load_split("mnist", "train", tmp_path, val=(1, 0))  # one image held out as val
    val_images, val_labels = load_split("mnist", "val", tmp_path, val=(1, 0))
    assert images.shape == (19, 1, 28, 28) and images.dtype == torch.uint8 and val_images.shape == (1, 1, 28, 28)
    train, held = carve(torch.from_numpy(written["train"][1]).long(), 1, 0)
    assert torch.equal(images[:, 0], torch.from_numpy(written["train"][0])[train])
    assert torch.equal(val_labels, torch.from_numpy(written["train"][1]).long()[held])
    test_images, _ = load_split("mnist", "test", tmp_path)
    assert torch.equal(test_images[:, 0], torch.from_numpy(written["t10k"][0]))


def test_cifar10_pickle_batches(tmp_path, monkeypatch):
    written = make_cifar10(tmp_path)
    skip_cifar_checksums(monkeypatch)
    images, labels = load_split("cifar10", "train", tmp_path)  # the default carve: a tenth of 40 images
    assert images.shape == (36, 3, 32, 32) and load_split("cifar10", "val", tmp_path)[0].shape == (4, 3, 32, 32)
    train, _ = carve(labels=torch.tensor(sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])), size=4)
    first = torch.from_numpy(written["data_batch_1"][0][int(train[0])].reshape(3, 32, 32))
    assert torch.equal(images[0], first)
    test_images, test_labels = load_split("cifar10", "test", tmp_path)
    assert test_images.shape == (8, 3, 32, 32) and test_labels.tolist() == written["test_batch"][1]


class _RunsCode:
    """Unpickling this calls os.system: what a tampered data batch could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_cifar_batch_that_would_run_code_is_refused_before_it_is_unpickled(tmp_path):
    # CIFAR's python files are pickles; torchvision checks each against the official MD5 before reading it
    make_cifar10(tmp_path)
    marker = tmp_path / "code-ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": []}, f)
    with pytest.raises(UserError, match="corrupted"):
        load_split("cifar10", "train", tmp_path)
    assert not marker.exists()


def test_missing_data_root_says_where_and_how(tmp_path):
    with pytest.raises(UserError) as e:
        load_split("cifar10", "train", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "pruneflow.data fetch" in str(e.value)
    # both spellings: train/data/infer flags, and the job file's keys (sweep refused --data-root and --download)
    assert all(w in str(e.value) for w in ("--data-root", "data.root", "--download", "data.download: true"))
    with pytest.raises(UserError, match="not found"):
        load_split("mnist", "train", tmp_path)  # the directory exists but holds no MNIST


def test_a_failed_download_says_so_in_one_line_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    # `data fetch mnist` without network said "mnist not found ... stage it with `data fetch mnist`" (the command
    # just run) and left an empty MNIST/raw; a mirror that refuses connections stands in for no network
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(UserError) as e:
        load_split("mnist", "train", tmp_path, download=True)
    assert str(e.value).startswith(f"could not download mnist into {tmp_path}: ") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_digits_split_is_fixed_and_disjoint():
    xtr, ytr = load_split("digits", "train")
    xva, yva = load_split("digits", "val")
    xte, yte = load_split("digits", "test")
    assert (len(ytr), len(yva), len(yte)) == (1294, 144, 359) and xtr.shape[1:] == (1, 28, 28)
    assert torch.equal(load_split("digits", "train")[0], xtr)  # seeded: same every time
    tr = {bytes(x.numpy()) for x in xtr}
    assert not any(bytes(x.numpy()) in tr for x in xte[:100])
    assert not any(bytes(x.numpy()) in tr for x in xva)


def test_the_val_carve_is_stratified_seeded_and_disjoint():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 30, 20, 100, 10, 10, 40, 40, 100, 100]))
    train, val = carve(labels, 0.1, seed=3)
    assert len(val) == 50 and len(train) == len(labels) - 50
    assert not set(train.tolist()) & set(val.tolist()) and set(train.tolist()) | set(val.tolist()) == set(range(500))
    # each class gives its share: 10 % of 50 is 5, of 100 is 10 (the 1s and 4s round by largest remainder)
    counts = torch.bincount(labels[val], minlength=10).tolist()
    assert counts[0] == 5 and counts[3] == 10 and counts[8] == 10 and sum(counts) == 50
    assert torch.equal(carve(labels, 0.1, seed=3)[1], val)  # the same seed, the same images
    assert not torch.equal(carve(labels, 0.1, seed=4)[1], val)
    assert carve_id(labels, 0.1, 3) != carve_id(labels, 0.1, 4)
    for bad in (0, 500, 1.5, -0.1):
        with pytest.raises(UserError, match="data.val_size"):
            carve(labels, bad)


def test_digits_table_is_sklearns_load_digits(monkeypatch):
    """The digits come from scikit-learn's data file without importing sklearn (1.5 s per process); the same
    numbers as its public API, which is also the fallback when the file is elsewhere."""
    from sklearn.datasets import load_digits

    from pruneflow.infer import data

    want = load_digits()
    data._digits_table.cache_clear()
    table = data._digits_table()
    assert table.shape == (1797, 65)
    np.testing.assert_array_equal(table[:, :64], want.data)
    np.testing.assert_array_equal(table[:, 64], want.target)
    xtr, ytr = load_split("digits", "train")
    data._digits_table.cache_clear()
    monkeypatch.setattr(data.os.path, "exists", lambda path: False)  # another package layout: the public API
    np.testing.assert_array_equal(data._digits_table(), table)
    xtr2, ytr2 = load_split("digits", "train")
    assert torch.equal(xtr2, xtr) and torch.equal(ytr2, ytr)
    data._digits_table.cache_clear()


def test_evaluation_never_augments_training_does(tmp_path, monkeypatch):
    make_cifar10(tmp_path, n=16)
    skip_cifar_checksums(monkeypatch)
    images, labels = load_split("cifar10", "test", tmp_path)
    ev = Batches(images, labels, "cifar10", 16, train=False)
    a = next(iter(ev))[0]
    b = next(iter(ev))[0]
    assert torch.equal(a, b)  # deterministic, un-augmented
    tr = Batches(images, labels, "cifar10", 16, train=True, seed=0)
    x, y = next(iter(tr))
    # training batches are augmented: shuffled-and-cropped images differ from the plain normalised ones
    plain = (images.float() - ev.mean) / ev.std
    assert not any(torch.equal(xi, pi) for xi in x for pi in plain)


def test_random_crop_flip_matches_definition():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, pad=1, generator=g)
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        ref = padded[i, :, dy[i]:dy[i] + 4, dx[i]:dx[i] + 4]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def make_cifar100(root, n=8):
    """CIFAR-100 python pickles as torchvision reads them: train / test dicts with data (N, 3072 uint8) and
    fine_labels (0-99; coarse_labels too), meta with fine_label_names."""
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base)
    rng = np.random.default_rng(2)
    written = {}
    for name in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [x // 5 for x in fine]}, f)
        written[name] = (data, fine)
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    return written


def test_cifar100_pickles(tmp_path, monkeypatch):
    import torchvision

    written = make_cifar100(tmp_path, n=20)
    cls = torchvision.datasets.CIFAR100  # stand-in files: skip the MD5 sums, keep torchvision's real reader
    monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=None))
    test_images, test_labels = load_split("cifar100", "test", tmp_path)
    assert test_images.shape == (20, 3, 32, 32) and test_labels.tolist() == written["test"][1]
    assert torch.equal(test_images[3], torch.from_numpy(written["test"][0][3].reshape(3, 32, 32)))
    images, _ = load_split("cifar100", "train", tmp_path, val=(2, 0))
    assert images.shape == (18, 3, 32, 32)
    with pytest.raises(UserError, match="cifar100 not found under"):
        load_split("cifar100", "train", tmp_path / "nowhere")
