"""Features: sparse autoencoders (own TopK training, the SAELens file layout), harvesting, encoding."""
