"""`python -m clip_prune` runs the `clip-prune` command."""

from clip_prune.lightning.cli import main

main()
