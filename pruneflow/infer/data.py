"""Data sets as uint8 tensors, and a device-resident batch iterator.

The whole data path, top to bottom: ``load_split`` reads a split through torchvision's own dataset classes
(or scikit-learn's bundled digits) into one uint8 tensor of images (N, C, H, W) and one int64 tensor of
labels; ``Batches`` keeps both on the training device and, per batch, converts to float, augments (training
only, on the device, for the whole batch at once) and normalises. No DataLoader, no per-image Python work.

Torch + torchvision only (``digits`` reads scikit-learn's bundled data file), because ``pruneflow.infer``
measures test accuracy with it on machines that have nothing else.
"""

import contextlib
import functools
import os

import torch

from ..errors import UserError

# name -> (channels, height, width, classes, mean, std, augment in training)
DATASETS = {
    # scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to MNIST's 28x28: runs anywhere, offline.
    "digits": dict(shape=(1, 28, 28), classes=10, mean=(0.3056,), std=(0.3247,), augment=False),
    "mnist": dict(shape=(1, 28, 28), classes=10, mean=(0.1307,), std=(0.3081,), augment=False),
    "cifar10": dict(shape=(3, 32, 32), classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), augment=True),
    "cifar100": dict(shape=(3, 32, 32), classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     augment=True),
}
# Random uint8 images of a real data set's shape and size (train, test), for measuring speed and packing
# where the data is not staged (benchmarks, a first try on a cluster): accuracy on them means nothing.
SYNTHETIC = {"synthetic-mnist": ("mnist", 60000, 10000), "synthetic-cifar10": ("cifar10", 50000, 10000),
             "synthetic-cifar100": ("cifar100", 50000, 10000),
             # smoke runs of a job file in a minute on a laptop CPU (jobs/*.yaml name the override)
             "synthetic-cifar10-tiny": ("cifar10", 1000, 500), "synthetic-cifar100-tiny": ("cifar100", 1000, 500)}
for _name, (_base, _, _) in SYNTHETIC.items():
    DATASETS[_name] = DATASETS[_base]
# train is the data set's training part minus a held-out val carve (``carve``); test is the data set's own.
SPLITS = ("train", "val", "test")
# The val carve when a job file does not size it: a count of images, or a fraction of the training part.
VAL_SIZES = {"digits": 0.1, "mnist": 5000, "cifar10": 5000, "cifar100": 5000, "synthetic-mnist": 5000,
             "synthetic-cifar10": 5000, "synthetic-cifar100": 5000, "synthetic-cifar10-tiny": 0.1,
             "synthetic-cifar100-tiny": 0.1}
DEFAULT_DATA_ROOT = os.environ.get("PRUNEFLOW_DATA", os.path.join("~", ".cache", "pruneflow", "data"))
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def dataset_info(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_split(name, split, root=None, download=False, val=None):
    """Return (images uint8 (N,C,H,W), labels int64 (N,)) for one split of a data set.

    ``val`` = (size, seed) of the carve that holds val out of train (default: VAL_SIZES, seed 0): train and val
    never share an image, and the same (size, seed) gives the same carve on every machine."""
    dataset_info(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if split == "test":
        return _load(name, False, root, download)
    images, labels = _load(name, True, root, download)
    train_idx, val_idx = carve(labels, *(val or default_carve(name, len(labels))))
    idx = train_idx if split == "train" else val_idx
    return images[idx].contiguous(), labels[idx].contiguous()


def default_carve(name, n):
    """(size, seed) of the carve a job file does not size: VAL_SIZES, at most a tenth of the training part (the
    small staged files of tests and first tries)."""
    size = VAL_SIZES[name]
    return (size if size < 1 or size <= n / 10 else 0.1), 0


def val_count(size, n):
    """The images a val carve of ``size`` (a count, or a fraction of the ``n`` training images) holds."""
    k = int(round(size * n)) if 0 < size < 1 else int(size)
    if size != int(size) and not 0 < size < 1 or not 0 < k < n:
        raise UserError(f"data.val_size {size:g} is not valid for {n:,} training images: give a count from 1 to "
                        f"{n - 1:,} or a fraction between 0 and 1")
    return k


def carve(labels, size, seed=0):
    """(train indices, val indices), both sorted: a seeded, stratified carve of ``size`` images (a count, or a
    fraction) as val. Each class gives its share (largest remainders round), so val has train's class mix."""
    labels = torch.as_tensor(labels)
    n = len(labels)
    k = val_count(size, n)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * k / n
    take = quota.floor().long()
    extra = k - int(take.sum())
    if extra:  # the largest fractional parts get the remaining images; ties go to the lower class
        order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]).item(), i))
        for i in order[:extra]:
            take[i] += 1
    g = torch.Generator().manual_seed(int(seed))
    val = []
    for c, t in zip(classes.tolist(), take.tolist()):
        members = (labels == c).nonzero().flatten()
        val.append(members[torch.randperm(len(members), generator=g)[:t]])
    val = torch.cat(val).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


def carve_id(labels, size, seed=0):
    """A short fingerprint of the carve (sha256 of the val indices): files and checkpoints record it, so two
    results made on different carves are never mixed unnoticed."""
    import hashlib

    _, val = carve(labels, size, seed)
    return hashlib.sha256(val.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def split_info(name, root=None, download=False, val=None):
    """What the val carve of data set ``name`` is: {size: images, seed, sha, train: images left to train on}."""
    _, labels = _load(name, True, root, download)
    size, seed = val or default_carve(name, len(labels))
    k = val_count(size, len(labels))
    return dict(size=k, seed=int(seed), sha=carve_id(labels, size, seed), train=len(labels) - k)


@functools.lru_cache(maxsize=2)
def _load(name, train, root=None, download=False):
    """The data set's own training (``train``) or test part, read once per process (train and val share it)."""
    if name == "digits":
        return _digits("train" if train else "test")
    if name in SYNTHETIC:
        base, n_train, n_test = SYNTHETIC[name]
        g = torch.Generator().manual_seed(0 if train else 1)
        n = n_train if train else n_test
        images = torch.randint(0, 256, (n, *DATASETS[base]["shape"]), dtype=torch.uint8, generator=g)
        return images, torch.randint(0, DATASETS[base]["classes"], (n,), generator=g)
    root = os.path.expanduser(os.fspath(root or DEFAULT_DATA_ROOT))
    if not download and not os.path.isdir(root):
        raise UserError(_missing(name, root, "the directory does not exist"))
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
           "cifar100": torchvision.datasets.CIFAR100}[name]
    made = [d for d in _folders(name, root) if not os.path.exists(d)]  # what a failed download may leave empty
    try:
        ds = cls(root, train=train, download=download)
    except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found ..." / "... or corrupted"; no network
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty
        if download:  # e.g. no network on a compute node (`data fetch`, --download)
            raise UserError(f"could not download {name} into {root}: {' '.join(str(e).split()) or type(e).__name__}") from None
        raise UserError(_missing(name, root, str(e).split(".")[0].lower())) from None
    except Exception as e:  # malformed files: torchvision raises whatever its parser hits
        raise UserError(f"{name} files under {root} could not be read ({type(e).__name__}: {e})") from None
    if name == "mnist":
        images = ds.data.unsqueeze(1).contiguous()  # (N, 28, 28) uint8 -> (N, 1, 28, 28)
        labels = ds.targets.long()
    else:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        labels = torch.tensor(ds.targets, dtype=torch.long)
    return images, labels


def _folders(name, root):
    """The folders torchvision keeps ``name`` in under ``root``, innermost first."""
    return {"mnist": [os.path.join(root, "MNIST", "raw"), os.path.join(root, "MNIST")],
            "cifar10": [os.path.join(root, "cifar-10-batches-py")],
            "cifar100": [os.path.join(root, "cifar-100-python")]}[name]


def _missing(name, root, why):
    return (
        f"{name} not found under {root} ({why}). Stage it on a machine with internet with "
        f"`python -m pruneflow.data fetch {name} --data-root {root}` (or download here: --download, in a job "
        f"file data.download: true), then copy {_folders(name, root)[0]} to the same place here, or point "
        f"--data-root (a job file's data.root) at it"
    )


@functools.lru_cache(maxsize=1)
def _digits_table():
    """scikit-learn's bundled digits as one (1797, 65) array: 64 pixels in 0..16, then the label.

    Read from the package's own data file, as ``sklearn.datasets.load_digits`` reads it, because importing
    ``sklearn.datasets`` costs ~1.5 s per process and every sweep worker and ``pruneflow.infer`` run would pay
    it; another package layout falls back to the public API.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None:
        raise UserError("the 'digits' data set needs scikit-learn: pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
        import gzip

        with gzip.open(path, "rt") as f:
            return np.loadtxt(f, delimiter=",")
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.column_stack([d.data, d.target])


def _digits(split):
    table = torch.from_numpy(_digits_table())
    x = (table[:, :64].float() / 16.0).view(-1, 1, 8, 8)  # (1797, 1, 8, 8) in [0, 1]
    # Bilinear upsampling to MNIST's size so the 2022 report's SimpleCNN (fc1 4608 inputs) runs unchanged.
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = table[:, 64].long()
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    order = torch.randperm(len(labels), generator=g)
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    idx = order[n_test:] if split == "train" else order[:n_test]  # the data set's own parts; val is carved later
    return images[idx].contiguous(), labels[idx].contiguous()


class Batches:
    """Iterate over (inputs, labels) batches of a whole data set held on ``device``.

    ``train=True`` shuffles (seeded per epoch) and applies the data set's augmentation; evaluation
    (``train=False``) never augments. Inputs come out as normalised float tensors.
    """

    def __init__(self, images, labels, dataset, batch_size, device="cpu", train=False, seed=0,
                 drop_last=False, channels_last=False):
        info = dataset_info(dataset)
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.train = train
        self.augment = train and info["augment"]
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.mean = torch.tensor(info["mean"], device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(info["std"], device=device).view(1, -1, 1, 1) * 255
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.train:
            # Random numbers are drawn where the batch lives: a CPU draw copied to a GPU per batch would make
            # the CPU wait for the GPU three times a step. CUDA and CPU generators give different (each
            # reproducible) orders for the same seed.
            g = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
            g.manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g, device=g.device).to(self.device)
            self.epoch += 1
        else:
            g, order = None, torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(x, pad=4, generator=g)
            x = (x.float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def random_crop_flip(x, pad, generator=None):
    """torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip for a whole uint8 batch at once."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # zero fill, as RandomCrop's default
    where = generator.device if generator is not None else x.device  # draw on the generator's device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=where).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=where).to(x.device)
    flip = (torch.rand(n, generator=generator, device=where) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
