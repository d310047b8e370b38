"""`python -m clip_prune` runs the `clip-prune` command."""

from clip_prune.cli import main

main()
