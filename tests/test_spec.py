import pytest

from pruneflow.errors import UserError
from pruneflow.spec import config_of, grid, load_spec, parse_shard, resolve, shard_trials

JOBS = ["jobs/quickstart.yaml", "jobs/mnist_cnn.yaml", "jobs/resnet101_cifar10.yaml", "jobs/resnet56_cifar10.yaml",
        "jobs/mobilenetv2_cifar10.yaml", "jobs/vgg19_cifar100.yaml", "jobs/vit_cifar10.yaml",
        "jobs/quickstart_depgraph.yaml"]


@pytest.mark.parametrize("job", JOBS)
def test_shipped_jobs_validate(job):
    spec, text = load_spec(job)
    cfg = config_of(resolve(spec))
    assert cfg["prune"]["op_types"] and text
    structured = [m for m in spec.prune.methods if not m.startswith("level")]
    per_seed = (1 + spec.control + len(spec.prune.methods) * len(spec.prune.sparsities)
                + len(structured) * len(spec.prune.mac_targets))
    assert len(grid(spec)) == len(spec.seeds) * per_seed
    from pruneflow.sweep.driver import check_pruning_selection

    run = resolve(spec)
    check_pruning_selection(run.model, spec.data.dataset, run.prune)  # exclude and op_types name real layers


def test_seed_studies_are_the_seeds():
    spec, _ = load_spec("jobs/resnet101_cifar10.yaml")
    assert spec.model.arch == "resnet101" and spec.train.epochs == 180 and spec.finetune.epochs == 20
    assert spec.prune.op_types == ["Conv2d"] and spec.resources.trials_per_gpu == 8
    assert spec.prune.sparsities == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    mnist, _ = load_spec("jobs/mnist_cnn.yaml")
    assert mnist.prune.exclude == ["fc2"] and mnist.finetune.epochs == 3 and mnist.latency.trials == 25


def test_overrides_from_command_line():
    spec, _ = load_spec("jobs/quickstart.yaml", {"finetune.epochs": "7", "prune.sparsities": "[0.5, 0.9]",
                                                 "control": "false"})
    assert spec.finetune.epochs == 7 and spec.prune.sparsities == [0.5, 0.9] and spec.control is False
    for given, mode in (("true", True), ("false", False), ("reduce-overhead", "reduce-overhead"),
                        ("cudagraphs", "cudagraphs")):
        assert load_spec("jobs/quickstart.yaml", {"performance.compile": given})[0].performance.compile == mode


@pytest.mark.parametrize("text, needle", [
    ("prune:\n  sparsites: [0.5]\n", "unknown key 'sparsites' in prune: did you mean 'sparsities'?"),
    ("prune:\n  sparsities: [1.5]\n", "outside (0, 1)"),
    ("prune:\n  sparsities: [0.5\n", "not valid YAML"),
    ("train:\n  epochs: many\n", "train.epochs must be a whole number"),
    ("prune:\n  methods: []\n", "grid is empty"),
    ("model:\n  arch: vgg\n", "model.arch 'vgg' is not valid"),
    ("latency:\n  trials: 0\n", "latency.trials must be >= 1"),
    ("performance:\n  compile: fast\n", "performance.compile 'fast' is not valid; choose from: default, reduce-overhead"),
    ("", "is empty; start from jobs/quickstart.yaml"),
    ("# nothing set yet\n", "is empty"),
    ("prune:\n  sparsities: [0.5, 0.501]\n  methods: [l1]\n",
     "prune.sparsities 0.5 and 0.501 would both be trial l1-0.50-s0"),
    ("prune:\n  mac_targets: [2, 2.001]\n  methods: [l1]\n", "prune.mac_targets 2 and 2.001 would both be trial l1-x2.00-s0"),
    ("prune:\n  sparsities: [0.5, 0.5]\n", "prune.sparsities lists 0.5 more than once"),
    ("prune:\n  methods: [l1, l2, l1]\n", "prune.methods lists l1 more than once"),
    ("seeds: [0, 1, 0]\n", "seeds lists 0 more than once"),
    ("train:\n  lr: -1\n", "train.lr must be > 0, got -1"),
    ("finetune:\n  lr: 0\n", "finetune.lr must be > 0, got 0"),
    ("resources:\n  device: cuda:1\n", "to use only GPU 1, run it with CUDA_VISIBLE_DEVICES=1 and device: cuda"),
    ("resources:\n  memory_per_trial: 8\n", "resources.memory_per_trial must be a size with a unit, at least 1M, such as 8G"),
    ("resources:\n  memory_per_trial: 0.0001K\n", "at least 1M"),
    ("resources:\n  memory_per_trial: 0G\n", "resources.memory_per_trial must be a size with a unit"),
    # issue 32: every class of bad input, one line each
    ("seeds: [-1]\n", "seeds: -1 must be a whole number in [0, 2**32)"),
    ("seeds: [4294967296]\n", "seeds: 4294967296 must be a whole number in [0, 2**32)"),
    ("seeds: [0.5]\n", "must be a whole number"),
    ("- study: x\n", "must be a mapping of settings, got list"),
    ("prune:\n  mac_targets: [1]\n", "prune.mac_targets: 1.0 must be > 1"),
    ("prune:\n  speedup_targets: [0.9]\n", "prune.speedup_targets: 0.9 must be > 1"),
    ("retries: -1\n", "retries must be >= 0, got -1"),
    ("resources:\n  trials_per_gpu: 0\n", "resources.trials_per_gpu must be >= 1, got 0"),
    ("finetune:\n  batch_size: 0\n", "finetune.batch_size must be >= 1, got 0"),
    ("train:\n  epochs: 0\n", "train.epochs must be >= 1, got 0"),
    ("study: /etc/x\n", "must be a plain name"),
    ("study: ../../x\n", "must be a plain name"),
    ("resources:\n  device: tpu\n", "resources.device 'tpu' is not valid"),
    ("latency:\n  runtimes: [tensorrtx]\n", "latency.runtimes: 'tensorrtx' is not valid"),
    ("prune:\n  op_types: [Conv3d]\n", "prune.op_types entry 'Conv3d' is not valid"),
    ("prune:\n  methods: [l1@foo]\n", "unknown pruning method/backend 'l1@foo'"),
])
def test_bad_job_files(tmp_path, text, needle):
    job = tmp_path / "bad.yaml"
    job.write_text(text)
    with pytest.raises(UserError) as e:
        load_spec(job)
    assert needle in str(e.value)


def test_a_job_file_that_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="cannot read job file .*: Is a directory"):
        load_spec(tmp_path)


def test_shards_partition_the_grid():
    spec, _ = load_spec("jobs/quickstart.yaml")
    trials = grid(spec)
    a, b = shard_trials(trials, "0/2"), shard_trials(trials, "1/2")
    assert sorted(t.id for t in a + b) == sorted(t.id for t in trials)
    assert not {t.id for t in a} & {t.id for t in b}
    assert len({t.id for t in trials}) == len(trials)
    for bad in ("3/2", "2/2", "-1/2", "x", "1/0"):
        with pytest.raises(UserError):
            parse_shard(bad)
