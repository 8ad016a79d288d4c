"""SGD and Adadelta for uncompiled training on the CPU, and the recipes' per-epoch learning-rate schedule.

torch.optim.Optimizer imports TorchDynamo the first time an optimiser is built: its ``add_param_group``,
``zero_grad`` and ``step`` are wrapped in ``torch._disable_dynamo``, which imports it on first call. That is
1.2-2 s of CPU (``python -c "import torch, time; t = time.perf_counter(); import torch._dynamo;
print(time.perf_counter() - t)"``) paid by every training process and every sweep worker, none of which
compiles anything on the CPU; on a 2-core node it is most of what a second packed worker costs
(docs/benchmarks.md, "Packing on the CPU"). Nothing else a CPU trial does imports it.

``SGD`` and ``Adadelta`` do the recipes' arithmetic op for op as torch.optim's single-tensor loop (its path
for CPU tensors), so training is bitwise the same, and keep torch's ``state_dict`` layout, so a resume file
written by either loads into the other (tests/test_optim.py). Only what the recipes use is here: one
parameter group, no nesterov, no maximize. CUDA and the compiled modes keep torch.optim (train.make_optimizer):
its foreach kernels, the capturable steps StepGraph records, and TorchDynamo is imported there anyway.

``EpochLR`` steps the learning rate once per epoch as torch's StepLR(step_size=1) and MultiStepLR do
(multiplying the current rate, so the floats are the same), on either kind of optimiser.
"""

import torch


class _Optimizer:
    """One parameter group; ``state`` keyed by the parameter's index, as torch's state_dict is."""

    def __init__(self, params, **hyper):
        self.params = list(params)
        self.param_groups = [dict(hyper, params=self.params)]
        self.state = {}

    def _decayed_grads(self):
        """(index, parameter, gradient + weight_decay · parameter) for each parameter with a gradient, as
        torch.optim's loops begin (a new tensor when decaying: the stored gradient is left as it was)."""
        weight_decay = self.param_groups[0]["weight_decay"]
        for i, p in enumerate(self.params):
            if p.grad is not None:
                yield i, p, (p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay))

    def zero_grad(self, set_to_none=True):
        if not set_to_none:
            raise ValueError("zero_grad(set_to_none=False) is not supported; pruneflow sets gradients to None")
        for p in self.params:
            p.grad = None

    def state_dict(self):
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {i: dict(s) for i, s in self.state.items()},
                "param_groups": [dict(group, params=list(range(len(self.params))))]}

    def load_state_dict(self, state_dict):
        (group,) = state_dict["param_groups"]  # one group, as saved by this class or torch.optim's
        if len(group["params"]) != len(self.params):
            raise ValueError(f"optimiser state for {len(group['params'])} parameters, this model has {len(self.params)}")
        for key in self.param_groups[0]:
            if key != "params" and key in group:
                self.param_groups[0][key] = group[key]
        self.state = {}
        for i, s in state_dict["state"].items():
            p = self.params[int(i)]
            # as torch.optim casts: buffers to the parameter's device and dtype, the step count stays float32 on the CPU
            self.state[int(i)] = {k: (v.to(torch.float32) if k == "step" else v.to(p.device, p.dtype))
                                  for k, v in s.items()}


class SGD(_Optimizer):
    """torch.optim.SGD(lr, momentum, weight_decay, dampening): d = g + wd·p; buf = d at the first step, else
    momentum·buf + (1 - dampening)·d; p -= lr·buf."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, dampening=0.0):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=False, maximize=False)

    @torch.no_grad()
    def step(self):
        g = self.param_groups[0]
        lr, momentum, dampening = g["lr"], g["momentum"], g["dampening"]
        for i, p, d in self._decayed_grads():
            if momentum != 0:
                state = self.state.setdefault(i, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(momentum).add_(d, alpha=1 - dampening)
                d = buf
            p.add_(d, alpha=-lr)


class Adadelta(_Optimizer):
    """torch.optim.Adadelta(lr, rho, eps, weight_decay): d = g + wd·p; v = rho·v + (1 - rho)·d²;
    delta = sqrt(u + eps) / sqrt(v + eps) · d; u = rho·u + (1 - rho)·delta²; p -= lr·delta."""

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0):
        super().__init__(params, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=False)

    @torch.no_grad()
    def step(self):
        g = self.param_groups[0]
        lr, rho, eps = g["lr"], g["rho"], g["eps"]
        for i, p, d in self._decayed_grads():
            state = self.state.get(i)
            if state is None:
                state = self.state[i] = dict(step=torch.tensor(0.0),
                                             square_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                             acc_delta=torch.zeros_like(p, memory_format=torch.preserve_format))
            state["step"] += 1
            square_avg, acc_delta = state["square_avg"], state["acc_delta"]
            square_avg.mul_(rho).addcmul_(d, d, value=1 - rho)
            std = square_avg.add(eps).sqrt_()
            delta = acc_delta.add(eps).sqrt_()
            delta.div_(std).mul_(d)
            acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
            p.add_(delta, alpha=-lr)


class EpochLR:
    """Multiply every group's lr by ``gamma`` after each epoch (``milestones`` None: StepLR with step_size 1) or
    after the epochs in ``milestones`` (MultiStepLR; an empty set: constant). ``step()`` once per epoch."""

    def __init__(self, optimizer, gamma=1.0, milestones=None):
        self.optimizer, self.gamma = optimizer, gamma
        self.milestones = None if milestones is None else set(milestones)
        self.last_epoch = 0

    def step(self):
        self.last_epoch += 1
        if self.milestones is None or self.last_epoch in self.milestones:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.gamma

    def state_dict(self):
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict):
        # torch's schedulers save last_epoch too (a resume file from before this class); the lr itself is restored
        # with the optimiser's param_groups, as torch's are
        self.last_epoch = int(state_dict["last_epoch"])
