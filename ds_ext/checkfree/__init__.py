"""Checkpoint-free recovery (CheckFree / CheckFree+, arXiv 2506.15461): rebuild a lost rank from a surviving replica
of its shard, or a lost pipeline stage from its neighbouring stages."""
