"""The toy model: the original EdgeMind design's 10-layer feed-forward demo network."""
