"""Looking inside: top words, word clouds, grounding heatmaps and per-word explanations."""
