"""Scoring: how important each prunable unit is. :mod:`.stats` collects activation statistics with forward hooks,
:mod:`.layerwise` runs a model one decoder layer at a time, :mod:`.methods` holds the scoring methods (random,
magnitude, activation) and the ``--method auto`` rule."""
