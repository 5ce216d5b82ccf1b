"""Training-data interventions and bias: the pronoun swap, bias probes, runs and checkpoints."""
