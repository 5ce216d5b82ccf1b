"""Panel components of Interp Explorer: the views, the app shell and the chart builders."""
from .app import ExplorerApp, create_app, serve_app
from .lens_view import LogitLensView

__all__ = ["ExplorerApp", "LogitLensView", "create_app", "serve_app"]
