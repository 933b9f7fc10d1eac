"""Staged training on Ray Train: one shared loop, stage-specific tasks (visual, align, dit)."""
