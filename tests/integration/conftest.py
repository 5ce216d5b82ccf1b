"""Fixtures for the integration tests (views driven without a browser)."""
from panel_loop import close_panel_event_loop  # noqa: F401  (an autouse fixture)
