"""pruneflow: how far can a network be pruned, and what does it buy on real hardware?

Entry points (Fire CLIs): ``python -m pruneflow.train | .prune | .sweep | .submit | .report | .infer``.
Heavy libraries (nni, ray, h5py, matplotlib, submitit) are imported inside the functions that need them,
so ``--help`` and ``pruneflow.infer`` start fast.

"The 2022 report", in comments and docs, is the course report this project started from: it pruned a small
MNIST CNN (SimpleCNN) and ResNet-101 on CIFAR-10 with NNI, and its settings are the defaults here.
"""

__version__ = "0.1.0"
