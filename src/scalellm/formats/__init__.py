"""File formats read by ScaleLLM (leaf modules: stdlib + numpy only)."""
