"""Panel2Patch annotation stage: compound figures -> panels, per-panel captions, regions -> records."""
