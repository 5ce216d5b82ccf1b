"""Read-only analyses of one model pass: the logit lens, attention heads, demonstrations."""
