"""The core every analysis stands on: the model session and its architecture adapters, model
components, typed results, jobs, corpora, the embedded defaults, and the project's errors."""
