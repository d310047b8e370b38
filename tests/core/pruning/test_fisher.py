"""The Fisher metric against a direct computation, and its file format."""

from __future__ import annotations

import pytest
import torch

from clip_prune.core.pruning.fisher import FisherInformation, load_fisher, save_fisher


def test_fisher_sums_squares_and_outer_products_over_batches() -> None:
    torch.manual_seed(0)
    metric = FisherInformation(num_layers=2, num_heads=3, num_neurons=5)
    batches = [(torch.randn(4, 2, 3), torch.randn(4, 2, 5)), (torch.randn(3, 2, 3), torch.randn(3, 2, 5))]
    for heads, neurons in batches:
        metric.update(heads, neurons)
    stats = metric.compute()
    heads = torch.cat([b[0] for b in batches]).double()
    neurons = torch.cat([b[1] for b in batches]).double()
    torch.testing.assert_close(stats.head_fisher, (heads**2).sum(0))
    for layer in range(2):
        torch.testing.assert_close(stats.head_gram[layer], heads[:, layer].T @ heads[:, layer])
        torch.testing.assert_close(stats.neuron_gram[layer], neurons[:, layer].T @ neurons[:, layer])
    assert stats.num_samples == 7 and stats.head_fisher.dtype == torch.float64


def test_statistics_round_trip_and_warn_for_another_model(tmp_path) -> None:
    metric = FisherInformation(2, 3, 5)
    metric.update(torch.randn(4, 2, 3), torch.randn(4, 2, 5))
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, metric.compute(), "org/model-a")
    loaded = load_fisher(path, (2, 3), (2, 5), "org/model-a")
    torch.testing.assert_close(loaded.neuron_gram, metric.compute().neuron_gram)
    with pytest.warns(UserWarning, match="gathered on model 'org/model-a', not 'org/model-b'"):
        load_fisher(path, (2, 3), (2, 5), "org/model-b")
    with pytest.raises(ValueError, match="statistics of another model"):
        load_fisher(path, (2, 4), (2, 5))
