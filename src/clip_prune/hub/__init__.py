"""Pruned config and model classes of every family, in files that `save_pruned` copies verbatim into every saved
directory, so it loads with `trust_remote_code=True` where clip-prune is not installed.

CLIP has a configuration and a modeling file, SigLIP and SigLIP2 share theirs; all use `pruned_layers.py`
(per-layer widths, narrower layers, constant modules for empty layers), which travels with them. Each file
imports only torch, transformers and huggingface_hub (and its siblings, relatively): never clip_prune.
The package itself imports nothing: `import clip_prune` registers the config classes without the modeling code
(`clip_prune/registration.py`).
"""
