"""How one training step runs: the one place that chooses between eager, torch.compile and the whole step
recorded as one CUDA graph. ``fit`` asks ``make_step`` for a step and calls it; it knows nothing of the choice.

The choice changes how fast a model trains, never what it computes: a compilation or a recording that fails
says so in one line and the steps run eagerly.
"""

import contextlib
import dataclasses
import sys
import typing

import torch
import torch.nn.functional as F

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cudagraphs")
# modes that record the whole training step as one CUDA graph (StepGraph), CUDA only: 'cudagraphs' around the
# eager model (no compilation), 'reduce-overhead' around Inductor's kernels
GRAPH_MODES = ("cudagraphs", "reduce-overhead")
WARMUP = 3  # eager steps before a CUDA-graph capture, as PyTorch's whole-network capture recipe runs them


@dataclasses.dataclass(frozen=True)
class Perf:
    """The performance settings resolved for one device (``resolve_perf``)."""

    loader: str = "device"  # device | torchvision
    amp_dtype: typing.Optional[torch.dtype] = None  # autocast dtype, None: fp32
    channels_last: bool = False
    compile: typing.Optional[str] = None  # a torch.compile mode or 'cudagraphs'; None: eager

    @property
    def records_graph(self):
        return self.compile in GRAPH_MODES


def resolve_perf(perf, device):
    """A Perf for ``device`` from the job's ``performance`` settings (a spec.PerformanceSpec, or None for the
    defaults), which the spec has validated. 'auto' precision is fp32, with TF32 on CUDA (bf16 autocast only
    when asked: slower at batch 64, docs/performance.md); channels_last defaults to on for CUDA and the CPU.
    The CUDA-graph modes run eagerly off CUDA: there is nothing to record."""
    from .spec import PerformanceSpec

    perf = PerformanceSpec(**perf) if isinstance(perf, dict) else perf or PerformanceSpec()  # dict: a stored config
    kind = torch.device(device).type
    cuda = kind == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
        if perf.precision == "auto":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls (cuDNN convolutions use TF32 by default)
    mode = "default" if perf.compile is True else perf.compile or None
    if mode in GRAPH_MODES and not cuda:
        mode = None
    channels_last = kind in ("cuda", "cpu") if perf.channels_last is None else bool(perf.channels_last)
    return Perf(loader=perf.loader, amp_dtype=torch.bfloat16 if perf.precision == "bf16" else None,
                channels_last=channels_last, compile=mode)


def autocast(device_type, amp_dtype, cache_enabled=True):
    """torch.autocast to ``amp_dtype``, or nothing when None (torch before 2.5 has no autocast context for mps)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype, cache_enabled=cache_enabled)


def distill_loss(student, teacher, y, alpha, temperature):
    """alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean:
    Hinton et al. 2015's knowledge distillation (T^2 keeps the soft term's gradients on the CE term's scale)."""
    soft = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    reduction="batchmean", log_target=True)
    return alpha * F.cross_entropy(student, y) + (1 - alpha) * temperature ** 2 * soft


class Distill:
    """The loss of a distilled step: the teacher (eval mode, no gradients) scores each batch as the student trains."""

    def __init__(self, teacher, alpha, temperature):
        self.teacher, self.alpha, self.temperature = teacher.eval(), float(alpha), float(temperature)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, out, x, y):
        with torch.no_grad():
            t = self.teacher(x)
        return distill_loss(out, t.to(out.dtype), y, self.alpha, self.temperature)


def train_step(forward, opt, x, y, sums, masks=None, amp_dtype=None, loss_fn=None):
    """One optimiser step on (x, y), gradients None on entry; the batch's summed loss and correct count are added
    to ``sums`` in place, so the same code runs eagerly and recorded in a CUDA graph. Autocast's weight cache is
    off, as torch asks of regions recorded in CUDA graphs. ``loss_fn(out, x, y)``: default cross-entropy."""
    with autocast(x.device.type, amp_dtype, cache_enabled=False):
        out = forward(x)
        loss = F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, x, y)
    loss.backward()
    opt.step()
    if masks:
        from .prune import apply_masks

        apply_masks(masks)
    sums[0].add_(loss.detach().float() * len(y))
    sums[1].add_((out.argmax(1) == y).sum())


class Step:
    """``step(x, y)``: one training step; ``sums`` hold the running (summed loss, correct count) on the device,
    read by the caller once in a while (a read per step would make the CPU wait for the GPU every step)."""

    def __init__(self, model, opt, masks=None, amp_dtype=None, forward=None, graph=None, loss_fn=None):
        self.model, self.opt, self.masks, self.amp_dtype, self.loss_fn = model, opt, masks, amp_dtype, loss_fn
        self.forward, self.graph = forward, graph  # forward: the compiled model (None: the module itself)
        self.full = 0  # the first batch's size: compiled and recorded steps run batches of this size only
        self.sums = None

    def reset_sums(self, device):
        if self.graph is not None:  # the graph adds into its own tensors; an eager step adds into the same ones
            self.sums = self.graph.zero_sums()
        else:
            self.sums = (torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device))
        return self.sums

    def __call__(self, x, y):
        if self.sums is None:
            self.reset_sums(x.device)
        self.full = self.full or len(x)
        if self.graph is not None and len(x) == self.full:
            self.graph(x, y)
            return
        # a short last batch through the module itself: no second compilation. `is not None`: a compiled
        # module has no truth value
        forward = self.forward if self.forward is not None and len(x) == self.full else self.model
        self.opt.zero_grad(set_to_none=True)
        train_step(forward, self.opt, x, y, self.sums, self.masks, self.amp_dtype, self.loss_fn)


def make_step(model, opt, perf, masks=None, loss_fn=None):
    """The training step ``perf`` (a Perf) asks for: eager, a torch.compile'd forward, or (GRAPH_MODES on CUDA)
    the whole step recorded as a CUDA graph around the eager model ('cudagraphs') or Inductor's ('reduce-overhead').
    ``opt`` must come from make_optimizer with the same ``perf`` (capturable for the graph modes)."""
    if perf.compile is None:
        return Step(model, opt, masks, perf.amp_dtype, loss_fn=loss_fn)
    if perf.compile not in GRAPH_MODES:
        return Step(model, opt, masks, perf.amp_dtype, forward=compile_model(model, perf.compile), loss_fn=loss_fn)
    forward = model if perf.compile == "cudagraphs" else compile_model(model, "default")
    step = Step(model, opt, masks, perf.amp_dtype, forward=None if forward is model else forward, loss_fn=loss_fn)

    def whole_step(x, y, sums):
        train_step(forward, opt, x, y, sums, masks, perf.amp_dtype, loss_fn)

    step.graph = StepGraph(whole_step, opt, next(model.parameters()).device)
    return step


def compile_model(model, mode):
    """``model``'s forward through torch.compile (``mode``, not a graph mode), shapes specialised. If compiling
    fails (no C++ compiler on the node, an operator TorchDynamo cannot trace), one warning and eager steps."""
    fresh_compile_state(model)
    compiled = torch.compile(model, mode=mode, dynamic=False)
    failed = []

    def forward(x):
        if failed:
            return model(x)
        try:
            return compiled(x)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            failed.append(e)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"warning: performance.compile {mode!r} failed ({type(e).__name__}: {first}); training eagerly",
                  file=sys.stderr, flush=True)
            return model(x)

    return forward


_compiled_shapes = None  # the parameter shapes this process last compiled a model of


def fresh_compile_state(model):
    """Reset TorchDynamo when ``model``'s parameter shapes differ from the last compiled model's in this process:
    a reused sweep worker past TorchDynamo's recompile limit would train its next pruned shape uncompiled.
    Returns whether it reset."""
    global _compiled_shapes
    shapes = (type(model), tuple((name, tuple(p.shape)) for name, p in model.named_parameters()))
    reset = _compiled_shapes is not None and shapes != _compiled_shapes
    if reset:
        import torch._dynamo

        torch._dynamo.reset()
    _compiled_shapes = shapes
    return reset


class StepGraph:
    """``step(x, y, sums)`` run as one CUDA graph for batches of one shape (PyTorch's whole-network capture):
    ``warmup`` eager steps on a side stream, then one recorded step reading its batch from static buffers, then
    replays. Learning rates are constants inside the recorded optimiser kernels: when one changes, the step is
    recorded again. A recording that fails says so once and the steps run eagerly."""

    def __init__(self, step, opt, device, warmup=WARMUP):
        self.step, self.opt, self.warmup = step, opt, warmup
        self.sums = (torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device))
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
        # the batch's device made current: a step on cuda:1 recorded on a cuda:0 stream records nothing
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
        self.opt.zero_grad(set_to_none=True)  # the recorded backward allocates its gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread (the sweep's monitor) does not break this capture
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(x.device), capture_error_mode="thread_local"):
            self.step(*self.static, self.sums)
        self.graph = graph
        self.captures += 1
