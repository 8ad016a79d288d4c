"""A whole training step recorded as one CUDA graph: forward, loss, backward, optimiser step, pruning masks and
the epoch's running sums, replayed by one launch per batch.

At the seed's batch 64 a GPU step is bound by the CPU launching kernels, not by the GPU (docs/benchmarks.md: a
ResNet-18 trial kept an H200 busy 18 % of the time). torch.compile's CUDA-graph modes record the model's
forward and backward only; the loss, the optimiser's foreach kernels, the masks and the sums still launch one by
one. This follows PyTorch's "whole-network capture" recipe (CUDA semantics notes, CUDA Graphs):

- warm-up: the first ``warmup`` steps run eagerly on a side stream (cuDNN autotuning, torch.compile's
  compilation, the optimiser's momentum buffers, lazily created handles);
- capture: gradients set to None, then one step recorded, reading its batch from static buffers (its
  gradients are allocated from the graph's private pool and overwritten, not accumulated, by every replay);
- replay: each step copies its batch into the buffers and launches the graph.

Learning rates are constants inside the recorded optimiser kernels: when a scheduler changes any group's lr,
the step is recorded again (a capture costs about one step). If recording fails (an operation that cannot be
captured), one line says so and the steps run eagerly: the graph changes how fast a trial trains, never what.
"""

import sys

import torch

WARMUP = 3  # eager steps before the capture, as PyTorch's recipe runs them


class StepGraph:
    """``step(x, y, sums)`` (one optimiser step on a batch, gradients None on entry, its loss and correct count
    added to ``sums`` in place) run as a CUDA graph for batches of one shape. ``opt`` is the optimiser ``step``
    drives (its learning rates decide when to record again); ``sums`` are the device tensors the graph adds
    into: (loss summed over images, correct predictions)."""

    def __init__(self, step, opt, device, warmup=WARMUP):
        self.step = step
        self.opt = opt
        self.sums = (torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device))
        self.warmup = warmup
        self.graph = self.lrs = self.static = None
        self.failed = False
        self.captures = 0  # how often the step was recorded (tests, benchmarks)

    def zero_sums(self):
        for s in self.sums:
            s.zero_()
        return self.sums

    def __call__(self, x, y):
        if self.failed:
            return self._eager(x, y)
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                self._eager(x, y)
            torch.cuda.current_stream(x.device).wait_stream(side)
            return None
        lrs = tuple(g["lr"] for g in self.opt.param_groups)
        # the batch's device made current: capture and replay use the current device's streams, and a step on
        # cuda:1 recorded on a cuda:0 stream would record nothing (every replay a silent no-op)
        with torch.cuda.device(x.device):
            if self.graph is None or lrs != self.lrs or self.static[0].shape != x.shape:
                try:
                    self._capture(x, y)
                except Exception as e:
                    self.failed = True
                    self.graph = self.static = None
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    print(f"warning: recording the training step as a CUDA graph failed ({type(e).__name__}: "
                          f"{first}); training without it", file=sys.stderr, flush=True)
                    return self._eager(x, y)
                self.lrs = lrs
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.graph.replay()
        return None

    def _eager(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        self.step(x, y, self.sums)

    def _capture(self, x, y):
        self.graph = None  # the previous recording's pool is freed with it
        self.static = (torch.empty_like(x), torch.empty_like(y))
        self.opt.zero_grad(set_to_none=True)  # so the recorded backward allocates its gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread (the sweep's monitor) does not break this capture. The
        # stream is the batch's device's own: torch.cuda.graph's default is one stream per process, made on
        # whichever device was current at its first capture.
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(x.device), capture_error_mode="thread_local"):
            self.step(*self.static, self.sums)
        self.graph = graph
        self.captures += 1
