"""`clip-prune sensitivity`: L rounds of Fisher scoring under the current mask, one layer reduced per round."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from clip_prune.data.coco import CocoDataModule
from clip_prune.evaluation import Evaluator
from clip_prune.model.module import MaskedCLIPModule
from clip_prune.outputs import RunDirectory
from clip_prune.pruning.flops import count_encoder_macs
from clip_prune.pruning.sensitivity import choose_head, keep_single_head
from clip_prune.tensorboard import summary_writer


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """The metric `task/name` (e.g. `retrieval/i2t_R@1`) from an `Evaluator` result, with a clear error."""
    task, _, key = name.partition("/")
    try:
        return float(metrics[task][key])
    except KeyError:
        available = [f"{t}/{k}" for t, values in metrics.items() for k in values]
        raise ValueError(f"--stop_metric {name!r} is not measured here; choose one of {available}") from None


def run_sensitivity(trainer: L.Trainer, module: MaskedCLIPModule, datamodule: CocoDataModule, run: RunDirectory,
                    stop_ratio: float, stop_metric: str) -> dict[str, Any]:
    """Reduce one more layer to its best head per round, saving `head_mask_{i}.pt`; stop early on a metric drop."""
    config = module.vision_config
    macs = count_encoder_macs(config)
    head_mask = torch.ones(config.num_hidden_layers, config.num_attention_heads)
    neuron_mask = torch.ones(config.num_hidden_layers, config.intermediate_size)
    evaluator, dense_metric = None, None
    if not datamodule.has_evaluation_data():
        rank_zero_info("clip-prune sensitivity: no evaluation data, so no early stop; all rounds run")
    elif trainer.is_global_zero:  # evaluation runs on rank zero only; the stop decision is broadcast
        evaluator = Evaluator(datamodule, trainer.strategy.root_device)
        dense_metric = metric_value(evaluator(module.model.to(trainer.strategy.root_device), "dense"), stop_metric)
    rounds: list[dict[str, Any]] = []
    reduced: set[int] = set()
    for index in range(config.num_hidden_layers):
        module.fisher.reset()
        module.masks.set(head_mask=head_mask)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        scores = module.fisher.compute().head_fisher.cpu()
        layer, head = choose_head(scores, reduced)
        reduced.add(layer)
        head_mask = keep_single_head(head_mask, layer, head)
        entry: dict[str, Any] = {"round": index, "layer": layer, "head": head, "score": float(scores[layer, head]),
                                 "flops_ratio": macs.of_masks(head_mask, neuron_mask) / macs.dense}
        if trainer.is_global_zero:
            run.save_tensor(f"head_mask_{index}.pt", head_mask)
            if evaluator is not None:
                module.masks.set(head_mask=head_mask)
                entry["metric"] = metric_value(evaluator(module.model, f"round {index}"), stop_metric)
            _log_round(trainer, entry)
        rounds.append(entry)
        stop = torch.tensor(float(dense_metric is not None and entry.get("metric", 0.0) < stop_ratio * dense_metric))
        if trainer.strategy.broadcast(stop).item():
            entry["stopped"] = f"{stop_metric} {entry['metric']:.2f} < {stop_ratio} x dense {dense_metric:.2f}"
            break
    if trainer.is_global_zero:
        run.save_tensor("neuron_mask.pt", neuron_mask)
    return {"stop_metric": stop_metric, "stop_ratio": stop_ratio, "dense_metric": dense_metric, "rounds": rounds}


def _log_round(trainer: L.Trainer, entry: dict[str, Any]) -> None:
    """The metric (if measured) against the FLOP ratio, in per mille of the dense encoder's MACs."""
    writer = summary_writer(trainer)
    if writer is None:
        return
    permille = round(1000 * entry["flops_ratio"])
    if "metric" in entry:
        writer.add_scalar("sensitivity/metric_by_flops_permille", entry["metric"], permille)
    writer.add_scalar("sensitivity/flops_ratio_by_round", entry["flops_ratio"], entry["round"])
    writer.flush()
