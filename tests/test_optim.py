"""pruneflow.optim against torch.optim: the same parameters bit for bit after steps and epochs of each recipe,
state that loads either way, and no TorchDynamo import in a CPU training process."""
import copy
import subprocess
import sys

import pytest
import torch

from pruneflow.models import build_model
from pruneflow.optim import SGD, Adadelta, EpochLR
from pruneflow.train import RECIPES, get_recipe, make_optimizer


def torch_pair(model, recipe, epochs):
    """torch.optim's optimiser and scheduler for ``recipe``, built as make_optimizer built them before."""
    params = model.parameters()
    if recipe["optimizer"] == "adadelta":
        opt = torch.optim.Adadelta(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"])
    if recipe["schedule"] == "step":
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=recipe["gamma"])
    if recipe["schedule"] == "multistep":
        milestones = sorted({max(1, round(f * epochs)) for f in recipe["milestones"]})
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=recipe["gamma"])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def model_and_batches(seed=0, n=3):
    torch.manual_seed(seed)
    model = build_model("simple_cnn", num_classes=10, in_channels=1)
    g = torch.Generator().manual_seed(seed)
    return model, [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def run_epochs(model, opt, sched, batches, epochs, freeze=None, start=0):
    lrs = []
    for epoch in range(start, start + epochs):
        torch.manual_seed(epoch)  # the same dropout masks for both optimisers, resumed or not
        lrs.append(opt.param_groups[0]["lr"])
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if freeze is not None:
                freeze.grad = None  # a parameter without a gradient is skipped, as torch.optim skips it
            opt.step()
        sched.step()
    return lrs


def assert_bitwise_equal(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_trains_bit_for_bit_as_torch_optim(recipe):
    model, batches = model_and_batches()
    ref = copy.deepcopy(model)
    r = dict(get_recipe(recipe), weight_decay=1e-3)  # weight decay on in every recipe, to compare its term too
    epochs = 4  # multistep's milestones at epochs 2 and 3
    opt, sched = make_optimizer(model, r, epochs)
    assert isinstance(opt, (SGD, Adadelta)) and isinstance(sched, EpochLR)
    lrs = run_epochs(model, opt, sched, batches, epochs, freeze=model.fc2.bias)
    ref_lrs = run_epochs(ref, *torch_pair(ref, r, epochs), batches, epochs, freeze=ref.fc2.bias)
    assert lrs == ref_lrs and len(set(lrs)) == {"step": 4, "multistep": 3, "constant": 1}[r["schedule"]]
    assert_bitwise_equal(model, ref)
    assert not torch.equal(model.fc1.weight, model_and_batches()[0].fc1.weight)  # it did train


@pytest.mark.parametrize("recipe", ["mnist", "cifar_resnet"])
@pytest.mark.parametrize("saved_by", ["torch", "pruneflow"])
def test_state_saved_by_either_resumes_in_the_other(recipe, saved_by, tmp_path):
    # a resume file (train_dense's OUT.resume.pt) written before this module, or by a compiled run, and the reverse
    r, epochs = get_recipe(recipe), 4
    model, batches = model_and_batches()
    ref = copy.deepcopy(model)
    run_epochs(ref, *torch_pair(ref, r, epochs), batches, epochs)  # four epochs uninterrupted, torch.optim
    first = torch_pair if saved_by == "torch" else (lambda m, r, e: make_optimizer(m, r, e))
    second = (lambda m, r, e: make_optimizer(m, r, e)) if saved_by == "torch" else torch_pair
    opt, sched = first(model, r, epochs)
    run_epochs(model, opt, sched, batches, 2)
    path = tmp_path / "resume.pt"
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict()), path)
    state = torch.load(path, weights_only=True)
    resumed, _ = model_and_batches()
    opt, sched = second(resumed, r, epochs)
    resumed.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    run_epochs(resumed, opt, sched, batches, 2, start=2)
    assert_bitwise_equal(resumed, ref)


def test_state_for_another_model_is_refused():
    model, _ = model_and_batches()
    opt, _ = make_optimizer(model, get_recipe("finetune"), 1)
    with pytest.raises(ValueError, match="parameters"):
        opt.load_state_dict(dict(state={}, param_groups=[dict(lr=0.1, params=[0, 1])]))


def test_cpu_training_never_imports_torchdynamo(tmp_path):
    # what the module exists for: a fresh process trains and fine-tunes on the CPU without TorchDynamo
    code = f"""
import sys
from pruneflow.train import train_dense
train_dense("simple_cnn", "digits", {str(tmp_path / 'd.safetensors')!r}, epochs=1, recipe="mnist", device="cpu",
            progress=False)
train_dense("simple_cnn", "digits", {str(tmp_path / 'f.safetensors')!r}, epochs=1, recipe="finetune", device="cpu",
            progress=False)
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-2:] == ["no", "dynamo"], p.stdout
