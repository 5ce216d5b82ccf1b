"""A CPU model actor for ndif 0.1.2, so a whole NDIF stack runs on a machine without a GPU.

ndif's stock actor (``ndif.services.ray.deployments.modeling.base.ModelActor``) places the
model on the GPUs the controller assigned and calls CUDA around every request (device pinning,
memory limits, peak statistics, ``synchronize``/``empty_cache``). This one loads the model on
the CPU, takes no GPU budget, and cleans up without CUDA; everything else (deserialising the
request, running the block, returning the saves through Redis or the object store) is ndif's
own. Selected with ndif's ``NDIF_MODEL_IMPORT_PATH`` (or a deployment's ``actor_class``).

Imported by Ray workers only (it needs ``ray`` and ``ndif``, which live in ``.venv-ndif``).
"""
from __future__ import annotations

import gc

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel


class CPUModelDeployment(BaseModelDeployment):
    """ndif's model deployment with the model on the CPU."""

    CACHEABLE = False  # parking moves weights GPU -> CPU: nothing to park here

    def __init__(self, *args, gpu_mem_bytes_by_id=None, **kwargs) -> None:
        # No GPU budget: ndif's per-request CUDA bookkeeping loops over this map and does nothing.
        super().__init__(*args, gpu_mem_bytes_by_id={}, **kwargs)

    def load_from_disk(self) -> HuggingFaceModel:
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name,
                                                **self.kwargs)
        model._module.requires_grad_(False)
        return model

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    """The Ray actor the controller starts per replica (see ``NDIF_MODEL_IMPORT_PATH``)."""
