"""Lightning glue over the pure core: the data module, the LightningModule, the callbacks and the CLI."""
