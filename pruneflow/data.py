"""Data sets for training: MNIST / CIFAR-10 through torchvision from ``--data-root``, and ``digits``.

Reading and batching live in ``pruneflow.infer.data`` (torch-only, shared with portable inference); this
module adds what only training needs, and the ``fetch`` command for staging data on a login node:
``python -m pruneflow.data fetch cifar10 --data-root /scratch/$USER/data``.
"""

from .infer.data import DATASETS, DEFAULT_DATA_ROOT, Batches, dataset_info, load_split, random_crop_flip  # noqa: F401
from .infer.errors import UserError


def train_test_batches(dataset, batch_size, device, seed=0, data_root=None, download=False, channels_last=False):
    """(training batches: shuffled + augmented, test batches: fixed order, never augmented)."""
    train = Batches(*load_split(dataset, "train", data_root, download), dataset, batch_size, device,
                    train=True, seed=seed, channels_last=channels_last)
    test = Batches(*load_split(dataset, "test", data_root, download), dataset, batch_size, device,
                   train=False, channels_last=channels_last)
    return train, test


def fetch(dataset, data_root=DEFAULT_DATA_ROOT):
    """Download a data set into DATA_ROOT (needs internet: run it on a login node, then copy the folder)."""
    if dataset == "digits":
        print("digits ships with scikit-learn; nothing to fetch")
        return
    for split in ("train", "test"):
        images, _ = load_split(dataset, split, data_root, download=True)
        print(f"{dataset} {split}: {len(images):,} images under {data_root}")


def main():
    from .infer.errors import run_cli

    run_cli({"fetch": fetch}, name="pruneflow.data")


if __name__ == "__main__":
    main()
