"""Synthesis of degraded/clean training pairs into deterministic webdataset shards."""
