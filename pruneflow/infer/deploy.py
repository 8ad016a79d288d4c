"""Time a model against its dense reference in every deployment runtime and batch size asked for.

Each (runtime, batch) cell is timed pair by pair, dense and trial in the same runtime, so each speedup is like
for like; the interval is a bootstrap over those pairs. A cell that cannot run (export fails, package or
provider missing) is recorded as failed with its reason, and the other cells go on.
"""

import dataclasses
import typing


@dataclasses.dataclass
class DeployTiming:
    """One (runtime, batch) cell of a trial: /trials/<id>/deploy/<runtime>-b<batch> in the results file."""

    runtime: str
    batch_size: int
    status: str = "failed"  # done | failed
    error: str = ""
    provider: str = ""  # the ONNX Runtime execution provider that ran, else the torch device type
    mode: str = ""  # compiled: the torch.compile mode kept; onnxruntime: the exporter
    opset: int = 0
    prepare_s: float = 0.0  # compiling / exporting the trial's model, outside every timed call
    prepare_dense_s: float = 0.0
    median: float = 0.0  # seconds per batch
    dense_median: float = 0.0
    speedup: float = 1.0  # median of per-pair dense / trial seconds (1 for the dense trial itself)
    speedup_lo: float = 1.0
    speedup_hi: float = 1.0
    images_per_s: float = 0.0
    latency: typing.List[float] = dataclasses.field(default_factory=list)
    latency_dense: typing.List[float] = dataclasses.field(default_factory=list)

    @property
    def key(self):
        return f"{self.runtime}-b{self.batch_size}"

    def attrs(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("latency", "latency_dense")}


def time_deployed(model, reference, input_shape, device, runtimes, batch_sizes, warmup=5, trials=25,
                  channels_last=False, compile_mode="auto", threads=None, dtype=None):
    """[DeployTiming] for every runtime x batch size: ``model`` timed alternately with ``reference`` (None: the
    dense model itself, timed alone)."""
    import torch

    from ..stats import bootstrap_ratio
    from .runtimes import RuntimeUnavailable, prepare
    from .timing import summarize, time_calls, time_calls_paired

    _allow_recompiles(torch)
    cells = []
    for runtime in runtimes:
        for b in batch_sizes:
            cell = DeployTiming(runtime, int(b), provider=device.type)
            runners = []
            try:
                x = torch.randn(int(b), *input_shape, device=device, dtype=dtype)
                if channels_last:  # as the eager timing feeds it: the model's own layout
                    x = x.contiguous(memory_format=torch.channels_last)
                runners.append(prepare(runtime, model, x, compile_mode, threads))
                trial = runners[0]
                if reference is not None:
                    runners.append(prepare(runtime, reference, x, compile_mode, threads))
                    s, d = time_calls_paired(trial.call, runners[1].call, device, warmup, trials)
                    cell.speedup, cell.speedup_lo, cell.speedup_hi = bootstrap_ratio(d, s)
                    cell.prepare_dense_s, cell.dense_median = runners[1].prepare_s, summarize(d)["median"]
                else:
                    s, d = time_calls(trial.call, device, warmup, trials), []
                cell.latency, cell.latency_dense = s, d
                cell.median = summarize(s)["median"]
                cell.images_per_s = b / cell.median if cell.median > 0 else 0.0
                cell.provider, cell.mode, cell.opset, cell.prepare_s = trial.provider, trial.mode, trial.opset, trial.prepare_s
                cell.status = "done"
            except RuntimeUnavailable as e:
                cell.error = str(e)
            except Exception as e:  # a runtime's own failure (out of memory, a provider error): this cell only
                cell.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            finally:
                for r in runners:
                    r.cleanup()
            cells.append(cell)
    return cells


def _allow_recompiles(torch, need=1024):
    # Dynamo counts compiles per code object (every ResNet shares one forward, and a Ray worker runs many
    # trials): past its limit of 8 it falls back to eager silently, and "compiled" would time eager
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < need:
            setattr(cfg, name, need)

