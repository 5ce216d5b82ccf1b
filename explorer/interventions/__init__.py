"""Interventions that edit activations and replay the model: ablation and activation patching."""
