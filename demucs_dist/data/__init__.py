"""The data path: MUSDB-format songs -> z-scored webdataset shards -> training batches."""
