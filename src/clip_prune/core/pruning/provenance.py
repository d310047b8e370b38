"""Which checkpoint a saved file was made from: the metadata that statistics and refit columns carry, so that they
are never applied to another model. No heavy imports: loading a pruned model needs it."""

from __future__ import annotations

from pathlib import Path


def resolve_model_path(model_name: str) -> str:
    """`model_name` as an absolute path when it names a local folder (`./demo/x` and `demo/x` alike), else as given."""
    local = Path(model_name)
    return str(local.resolve()) if local.exists() else model_name


def model_record(model_name: str) -> dict[str, str]:
    """The metadata naming the checkpoint a saved file (statistics, refit columns) was made from."""
    return {"model": model_name, "model_path": resolve_model_path(model_name)}


def made_on_another_model(metadata: dict[str, str], model_name: str | None) -> bool:
    """Whether a file whose metadata holds a `model_record` was made from another checkpoint than `model_name`
    (False when either is unknown)."""
    recorded = metadata.get("model_path") or (resolve_model_path(metadata["model"]) if "model" in metadata else None)
    return model_name is not None and recorded is not None and recorded != resolve_model_path(model_name)
