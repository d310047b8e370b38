"""Pruning algorithms on tensors (no Lightning): Fisher statistics, FLOP model, search, rearrangement,
layer-wise reconstruction (weight refit or scales), pruning steps, sensitivity rounds, and physical
slicing with save/load. Import the modules themselves (`clip_prune.core.pruning.search`, ...): this package imports
nothing, so that loading a pruned model (`clip_prune.core.deploy.saving`) does not pay for what it does not use."""
