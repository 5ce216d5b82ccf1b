"""Panel components of Interp Explorer: the views, the app shell and the chart builders."""
from .ablation_view import AblationView
from .app import ExplorerApp, create_app, serve_app
from .generate_view import GenerateView
from .heads_view import HeadsView
from .intervention_view import InterventionView
from .lens_view import LogitLensView
from .neuron_view import NeuronView
from .snapshot_view import SnapshotView
from .steering_view import SteeringView

__all__ = ["AblationView", "ExplorerApp", "GenerateView", "HeadsView", "InterventionView", "LogitLensView",
           "NeuronView", "SnapshotView", "SteeringView", "create_app", "serve_app"]
