"""Latency table of the vision encoder, measured on the run's device (docs/design.md, "Latency budget";
Kwon et al., arXiv 2204.09656, section 4.3).

One encoder layer's attention is timed with h = 0..H heads and its MLP on a grid of neuron
counts, at the run's batch size and token count, after warm-up, the widths taking turns so
that drifts of a shared machine touch all alike. Each curve is fitted piecewise linearly (flat
below a threshold, linear above). The whole tower is timed twice more: with every layer empty
(the parts no width changes: embeddings, layer norms, residual adds, pooling) and dense. The
layers' fitted costs above their empty cost are scaled by one factor so that the table's dense
tower costs what the measured one does: the isolated layers give the shape of the costs, the
tower their total. Tables are cached per device and model shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from clip_prune.core.timing import load_average, median_seconds
from clip_prune.files import write_json_atomically
from clip_prune.towers import tower_class, tower_of

Result = TypeVar("Result")


TABLE_VERSION = 2
"""Bumped when the measurement changes, so older cached tables are not reused."""


@dataclass(frozen=True)
class PiecewiseLinear:
    """f(0) = `zero`; f(x) = `intercept` + `slope` · max(0, x − `threshold`) for x ≥ 1 (seconds)."""

    zero: float
    intercept: float
    slope: float
    threshold: float

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        """Seconds at each unit count of `counts` (float64)."""
        counts = counts.double()
        value = self.intercept + self.slope * (counts - self.threshold).clamp(min=0)
        return torch.where(counts == 0, torch.full_like(value, self.zero), value)


def fit_piecewise_linear(counts: list[int], seconds: list[float]) -> PiecewiseLinear:
    """Least-squares fit of a flat-then-linear curve to the measurements at counts ≥ 1.

    The threshold is tried at each measured count; the slope is kept ≥ 0, so the fitted
    latency never falls as units are added.
    """
    x = torch.tensor(counts, dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    zero = float(y[x == 0].mean()) if bool((x == 0).any()) else 0.0
    x, y = x[x >= 1], y[x >= 1]
    best: tuple[float, PiecewiseLinear] | None = None
    for threshold in x.tolist():
        ramp = (x - threshold).clamp(min=0)
        if float(ramp.var(correction=0)) > 0:
            slope = max(0.0, float(((ramp - ramp.mean()) * (y - y.mean())).sum() / ((ramp - ramp.mean()) ** 2).sum()))
        else:
            slope = 0.0
        intercept = float((y - slope * ramp).mean())
        curve = PiecewiseLinear(zero, intercept, slope, threshold)
        error = float(((curve(x) - y) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, curve)
    assert best is not None, "a latency fit needs at least one measurement at a count >= 1"
    return best[1]


@dataclass(frozen=True)
class LatencyTable:
    """Seconds of one forward pass of each encoder part by kept width, and the fitted curves."""

    key: dict[str, object]
    """What the measurement depends on: device, dtype, batch, tokens, the layer's shapes."""
    num_layers: int
    """L, encoder layers (all of one shape in a ViT)."""
    head_counts: list[int]
    """Measured head counts, 0..H."""
    attention_s: list[float]
    """Median seconds of one layer's self-attention at each of `head_counts`."""
    neuron_counts: list[int]
    """Measured neuron counts, 0..F on a grid."""
    mlp_s: list[float]
    """Median seconds of one layer's MLP at each of `neuron_counts`."""
    dense_s: float
    """Median seconds of the whole dense vision tower."""
    empty_s: float
    """Median seconds of the vision tower with no heads and no neurons in any layer."""
    conditions: dict[str, object] = field(default_factory=dict)
    """Under what the table was measured (load average, library versions, time): for a reader judging it."""
    attention_fit: PiecewiseLinear = field(init=False)
    mlp_fit: PiecewiseLinear = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_fit", fit_piecewise_linear(self.head_counts, self.attention_s))
        object.__setattr__(self, "mlp_fit", fit_piecewise_linear(self.neuron_counts, self.mlp_s))
        if not self.dense_s > self.empty_s:
            raise ValueError(
                f"the dense tower was timed at {self.dense_s:.4g} s, not slower than the empty one "
                f"({self.empty_s:.4g} s): the machine was too busy for a latency table; measure again with "
                "more repeats or on a quieter machine"
            )

    @property
    def num_heads(self) -> int:
        return max(self.head_counts)

    @property
    def num_neurons(self) -> int:
        return max(self.neuron_counts)

    @staticmethod
    def _above_empty(curve: PiecewiseLinear, counts: torch.Tensor) -> torch.Tensor:
        return curve(counts) - curve(torch.zeros(1))

    @property
    def scale(self) -> float:
        """Factor from the isolated layers' fitted costs to their share of the measured tower."""
        layer = (self._above_empty(self.attention_fit, torch.tensor([self.num_heads]))
                 + self._above_empty(self.mlp_fit, torch.tensor([self.num_neurons])))
        return (self.dense_s - self.empty_s) / (self.num_layers * float(layer.clamp(min=1e-12)))

    def head_costs(self) -> torch.Tensor:
        """[L, H + 1] seconds each layer's attention adds to the empty tower with 0..H heads."""
        costs = self.scale * self._above_empty(self.attention_fit, torch.arange(self.num_heads + 1))
        return costs.clamp(min=0).expand(self.num_layers, -1)

    def neuron_costs(self) -> torch.Tensor:
        """[L, F + 1] seconds each layer's MLP adds to the empty tower with 0..F neurons."""
        costs = self.scale * self._above_empty(self.mlp_fit, torch.arange(self.num_neurons + 1))
        return costs.clamp(min=0).expand(self.num_layers, -1)

    @property
    def fixed_s(self) -> float:
        """Seconds no width changes: the measured empty tower."""
        return self.empty_s

    def latency_of(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        """The table's seconds for a tower keeping these widths: the empty tower plus each layer's costs."""
        heads = self.head_costs()[0, torch.tensor(heads_per_layer)].sum()
        neurons = self.neuron_costs()[0, torch.tensor(neurons_per_layer)].sum()
        return self.fixed_s + float(heads + neurons)

    def ratio_of(self, heads_per_layer: list[int], neurons_per_layer: list[int]) -> float:
        """The table's latency of a tower keeping these widths over its dense latency."""
        return self.latency_of(heads_per_layer, neurons_per_layer) / self.dense_latency

    @property
    def dense_latency(self) -> float:
        """The table's seconds for the dense tower (the reference of a latency constraint)."""
        return self.latency_of([self.num_heads] * self.num_layers, [self.num_neurons] * self.num_layers)

    def to_json(self) -> dict[str, object]:
        """What `write_table` saves: the measurements, the fits and the derived dense and fixed seconds."""
        content = asdict(self)
        content |= {"scale": self.scale, "dense_latency_s": self.dense_latency}
        return content


def device_name(device: torch.device) -> str:
    """A readable name of `device` for the cache key: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{device.type}: {model}, {torch.get_num_threads()} threads"


def table_key(config: PretrainedConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
              attn_implementation: str, multiple_of: int) -> dict[str, object]:
    """Everything a latency table depends on (`multiple_of`: the neuron widths it times); its hash names the cache
    file."""
    return {"version": TABLE_VERSION, "multiple_of": multiple_of, "device": device_name(device),
            "torch": torch.__version__, "dtype": str(dtype), "attn_implementation": attn_implementation,
            "batch_size": batch_size, "tokens": tower_class(config).num_tokens(config),
            "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "hidden_act": config.hidden_act}


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/clip_prune/latency (~/.cache/clip_prune/latency)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip_prune" / "latency"


def _tower(config: PretrainedConfig, heads: list[int], neurons: list[int], device: torch.device,
           dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    """A random-weight vision tower of `config`'s family with these per-layer widths (len(heads) layers)."""
    family = tower_class(config)
    pruned = family.pruned_vision_config(config, heads, neurons)
    model_class = family.pruned_classes[family.vision_model_type]
    model = model_class._from_config(pruned, attn_implementation=attn_implementation, dtype=dtype)
    return model.to(device).eval()


def _first_layer_part(model: PreTrainedModel, name: str) -> nn.Module:
    """The part `name` (`VisionTower.part_paths`) of `model`'s first encoder layer."""
    tower = tower_of(model)
    return tower.part(tower.layers[0], name)


def _dense_tower(config: PretrainedConfig, batch_size: int, device: torch.device, dtype: torch.dtype,
                 attn_implementation: str) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """A random-weight dense tower of `config`'s shape and random inputs of `batch_size` images for it."""
    layers = config.num_hidden_layers
    dense = _tower(config, [config.num_attention_heads] * layers, [config.intermediate_size] * layers, device, dtype,
                   attn_implementation)
    return dense, tower_of(dense).example_inputs(batch_size)


def neuron_grid(num_neurons: int, points: int, multiple_of: int = 1) -> list[int]:
    """0 and about `points` counts spread evenly over 1..F, F included; with `multiple_of`, only counts the width
    search can choose (multiples of it, and F), so that the fit sees the speed of aligned matmuls."""
    if multiple_of == 1:
        return sorted({0, *torch.linspace(1, num_neurons, points).round().long().tolist()})
    if num_neurons < multiple_of:  # only empty or dense layers are allowed
        return [0, num_neurons]
    steps = torch.linspace(1, num_neurons // multiple_of, points).round().long()
    return sorted({0, num_neurons, *(steps * multiple_of).tolist()})


@torch.inference_mode()
def measure_latency_table(config: PretrainedConfig, batch_size: int, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", warmup: int = 2,
                          repeats: int = 5, mlp_points: int = 16, multiple_of: int = 1) -> LatencyTable:
    """Time one encoder layer's attention at 0..H heads and MLP at `mlp_points` neuron counts, and the dense tower.

    Args:
        config: the dense vision config (the layers' shapes and the token count).
        batch_size: images per forward pass.
        device: where to time (the run's device).
        dtype: parameter and activation dtype.
        attn_implementation: transformers' attention kernel ("sdpa" or "eager").
        warmup: untimed calls per width first.
        repeats: timed calls per width (the median is kept).
        mlp_points: neuron counts timed between 1 and F.
        multiple_of: time only neuron counts at multiples of it (and F), the widths the search may choose.
    """
    device = torch.device(device)
    load = load_average()
    layers, heads, neurons = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    tokens = tower_class(config).num_tokens(config)
    hidden = torch.randn(batch_size, tokens, config.hidden_size, device=device, dtype=dtype)
    head_counts, neuron_counts = list(range(heads + 1)), neuron_grid(neurons, mlp_points, multiple_of)
    attentions = [_first_layer_part(_tower(config, [h], [neurons], device, dtype, attn_implementation), "attention")
                  for h in head_counts]
    mlps = [_first_layer_part(_tower(config, [heads], [n], device, dtype, attn_implementation), "mlp")
            for n in neuron_counts]
    runs = [lambda module=module: module(hidden) for module in attentions + mlps]
    seconds = median_seconds(runs, device, warmup, repeats)
    dense, inputs = _dense_tower(config, batch_size, device, dtype, attn_implementation)
    empty = _tower(config, [0] * layers, [0] * layers, device, dtype, attn_implementation)
    towers = [lambda: dense(**inputs), lambda: empty(**inputs)]
    dense_s, empty_s = median_seconds(towers, device, warmup, repeats)
    for attempt in range(1, 3):  # a busy machine can invert two close timings: time again, longer
        if dense_s > empty_s:
            break
        dense_s, empty_s = median_seconds(towers, device, warmup, repeats * 2 ** attempt)
    key = table_key(config, batch_size, device, dtype, attn_implementation, multiple_of)
    return LatencyTable(key=key, num_layers=layers, head_counts=head_counts, attention_s=seconds[: len(head_counts)],
                        neuron_counts=neuron_counts, mlp_s=seconds[len(head_counts):], dense_s=dense_s,
                        empty_s=empty_s, conditions={**measuring_conditions(), "load_1min_before": load})


def write_table(table: LatencyTable, path: Path) -> None:
    """Save `table` as JSON (measurements, fits, fixed and dense seconds); concurrent runs never read half a file."""
    write_json_atomically(path, table.to_json(), overwrite=True)


def read_table(path: Path) -> LatencyTable:
    """A table written by `write_table` (the fits are recomputed from the measurements)."""
    content = json.loads(path.read_text())
    fields = ("key", "num_layers", "head_counts", "attention_s", "neuron_counts", "mlp_s", "dense_s", "empty_s")
    return LatencyTable(**{name: content[name] for name in fields}, conditions=content.get("conditions", {}))


STALE_TOLERANCE = 0.1
"""Largest accepted |dense tower timed now / the cached table's − 1| before a cached table is measured again."""


@dataclass(frozen=True)
class TableSource:
    """Where a run's table came from and how the cached one compared with the machine now."""

    how: Literal["measured", "cached", "re-measured"]
    """`measured` (no cached table), `cached` (its dense tower timed within `STALE_TOLERANCE` now), or
    `re-measured` (the cached one was stale)."""
    dense_s_cached: float | None = None
    """The cached table's dense tower (seconds), when there was one."""
    dense_s_now: float | None = None
    """The dense tower timed now, to check the cached table."""

    @property
    def drift(self) -> float | None:
        """dense now / dense cached − 1."""
        if self.dense_s_cached is None or self.dense_s_now is None:
            return None
        return self.dense_s_now / self.dense_s_cached - 1

    def report(self) -> dict[str, object]:
        return {"how": self.how, "dense_s_cached": self.dense_s_cached, "dense_s_now": self.dense_s_now,
                "drift": self.drift, "tolerance": STALE_TOLERANCE}

    def describe(self) -> str:
        if self.how == "cached":
            return f"read from the cache (its dense tower timed {self.drift:+.1%} now)"
        if self.how == "re-measured":
            return (f"measured again: the cached one's dense tower is {self.drift:+.1%} off the machine now "
                    f"(more than {STALE_TOLERANCE:.0%})")
        return "measured"


def measuring_conditions() -> dict[str, object]:
    """What besides the cache key can change a timing: libraries, load, when."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "load_1min": load_average(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@torch.inference_mode()
def dense_tower_seconds(config: PretrainedConfig, batch_size: int, device: torch.device,
                        dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", warmup: int = 1,
                        repeats: int = 3) -> float:
    """Median seconds of a random-weight dense tower of `config`'s shape now: the check of a cached table."""
    dense, inputs = _dense_tower(config, batch_size, device, dtype, attn_implementation)
    return median_seconds([lambda: dense(**inputs)], device, warmup, repeats)[0]


def cached_latency_table(config: PretrainedConfig, batch_size: int, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                         cache_dir: Path | None = None, multiple_of: int = 1,
                         **measure: int) -> tuple[LatencyTable, TableSource]:
    """The cached table for this device and model shape, or a new measurement (then cached); and where it came from.

    A cached table is checked first: the dense tower is timed now, and a table whose dense tower is more than
    `STALE_TOLERANCE` off (measured under other load, another clock, other libraries) is measured again. The layer
    costs of a stale table are not rescaled: load changes small and large matmuls unevenly, so only a new
    measurement gives the new shape of the costs.

    `multiple_of` and `measure` go to `measure_latency_table` (warmup, repeats, mlp_points).
    """
    device = torch.device(device)
    key = table_key(config, batch_size, device, dtype, attn_implementation, multiple_of)
    digest = hashlib.sha256(json.dumps({**key, **measure}, sort_keys=True).encode()).hexdigest()[:16]
    path = (default_cache_dir() if cache_dir is None else cache_dir) / f"{digest}.json"
    source = TableSource("measured")
    if path.is_file():
        cached = read_table(path)
        now = dense_tower_seconds(config, batch_size, device, dtype, attn_implementation)
        source = TableSource("cached", cached.dense_s, now)
        if abs(source.drift) <= STALE_TOLERANCE:
            return cached, source
        source = TableSource("re-measured", cached.dense_s, now)
    table = measure_latency_table(config, batch_size, device, dtype, attn_implementation, multiple_of=multiple_of,
                                  **measure)
    write_table(table, path)
    return table, source
