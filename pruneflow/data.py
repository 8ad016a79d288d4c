"""Data sets for training: MNIST / CIFAR-10 through torchvision from ``--data-root``, and ``digits``.

Reading and batching live in ``pruneflow.infer.data`` (torch-only, shared with portable inference); this
module adds what only training needs, and the ``fetch`` command for staging data on a login node:
``python -m pruneflow.data fetch cifar10 --data-root /scratch/$USER/data``.
"""

from .infer.data import (DATASETS, DEFAULT_DATA_ROOT, SPLITS, SYNTHETIC, VAL_SIZES, Batches, carve,  # noqa: F401
                         dataset_info, load_split, random_crop_flip, split_info)


LOADERS = ("device", "torchvision")
# Evaluation batches: at least this many images. Eval-mode outputs do not depend on the batch (BatchNorm uses
# its running statistics), and a GPU at the 2022 report's batch 64 spends an evaluation launching kernels. Forward
# passes without autograd hold a few activations at a time (the auto-packing probe measures one such batch).
EVAL_BATCH_SIZE = 512


def train_val_batches(dataset, batch_size, device, seed=0, data_root=None, download=False, channels_last=False,
                      loader="device", val=None):
    """(training batches: shuffled + augmented, val batches: fixed order, never augmented). ``val`` = (size,
    seed) of the carve (infer.data.load_split): training never sees a val image, and nothing here sees test.

    ``loader='device'`` (default): the whole data set on the device, batches augmented there at once.
    ``loader='torchvision'``: the 2022 report's pipeline (DataLoader + per-image CPU transforms), for comparison.
    """
    cls = Batches if loader == "device" else SeedStyleBatches
    train = cls(*load_split(dataset, "train", data_root, download, val), dataset, batch_size, device,
                train=True, seed=seed, channels_last=channels_last)
    held_out = cls(*load_split(dataset, "val", data_root, download, val), dataset, max(batch_size, EVAL_BATCH_SIZE),
                   device, train=False, channels_last=channels_last)
    return train, held_out


def eval_batches(dataset, split, device, data_root=None, val=None, channels_last=False):
    """Fixed-order, unaugmented batches of one split (train, val or test), for scoring a finished model."""
    return Batches(*load_split(dataset, split, data_root, False, val), dataset, EVAL_BATCH_SIZE, device,
                   channels_last=channels_last)


class _PerImage:
    """A torch Dataset applying torchvision transforms to one uint8 image at a time (the 2022 report's way)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


class SeedStyleBatches:
    """The 2022 report's input pipeline: torch DataLoader + per-image torchvision transforms on the CPU (RandomCrop
    with padding 4 and horizontal flip for CIFAR-10 in training; normalisation always), then a copy to the
    device per batch. Same interface and same numbers as ``Batches``; kept for benchmarks and checks."""

    def __init__(self, images, labels, dataset, batch_size, device="cpu", train=False, seed=0, drop_last=False,
                 channels_last=False, num_workers=0):
        import torch
        from torchvision.transforms import v2

        info = dataset_info(dataset)
        steps = [v2.RandomCrop(info["shape"][1:], padding=4), v2.RandomHorizontalFlip()] if train and info["augment"] else []
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info["mean"], info["std"])]
        self.device, self.channels_last, self.train, self.seed, self.epoch = torch.device(device), channels_last, train, seed, 0
        self.dataset = _PerImage(images, labels, v2.Compose(steps))
        self.batch_size, self.drop_last, self.num_workers = int(batch_size), drop_last, num_workers

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.train:
            self.epoch += 1
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.train, generator=g,
                                             drop_last=self.drop_last, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def fetch(dataset, data_root=DEFAULT_DATA_ROOT):
    """Download a data set into DATA_ROOT (needs internet: run it on a login node, then copy the folder)."""
    if dataset == "digits":
        print("digits ships with scikit-learn; nothing to fetch")
        return
    if dataset in SYNTHETIC:
        print(f"{dataset} is generated in memory wherever it is used (random images of {SYNTHETIC[dataset][0]}'s "
              "shapes and sizes); nothing to fetch")
        return
    for split in ("train", "test"):
        images, _ = load_split(dataset, split, data_root, download=True)
        print(f"{dataset} {split}: {len(images):,} images under {data_root}")


def main():
    from .cli import run_cli

    run_cli({"fetch": fetch}, name="pruneflow.data")


if __name__ == "__main__":
    main()
