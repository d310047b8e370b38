"""The Auto registry's table of pruned classes is the towers' own."""

from clip_prune.registration import PRUNED_CLASSES
from clip_prune.towers import FAMILIES


def test_the_registry_holds_every_family_s_pruned_classes_and_no_other() -> None:
    towers = {(pruned.config_class, pruned, dense_type != family.vision_model_type)
              for family in FAMILIES for dense_type, pruned in family.pruned_classes.items()}
    registered = {(entry.config_class, entry.load(), entry.has_text) for entry in PRUNED_CLASSES}
    assert registered == towers
    assert len(registered) == len(PRUNED_CLASSES) == 6
