"""Grain input pipeline over figure-record shards: figure / panel / region streams."""
