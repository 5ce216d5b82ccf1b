"""Panel components of Interp Explorer: the views, the app shell and the chart builders."""
from .ablation_view import AblationView
from .app import ExplorerApp, create_app, serve_app
from .heads_view import HeadsView
from .intervention_view import InterventionView
from .lens_view import LogitLensView
from .neuron_view import NeuronView
from .snapshot_view import SnapshotView

__all__ = ["AblationView", "ExplorerApp", "HeadsView", "InterventionView", "LogitLensView", "NeuronView",
           "SnapshotView", "create_app", "serve_app"]
