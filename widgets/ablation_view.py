"""The ablation tab: a single ablation, a sweep and activation patching, each with its own inputs.

``AblationView`` composes three parts (``ablation_single``, ``ablation_sweep``,
``patching_view``); a click in the sweep chart puts that component into the single ablation's
field. Every finished result, and a cancelled partial one, goes into ``history``.
"""
from __future__ import annotations

import panel as pn

from explorer.core.session import ModelSession
from explorer.persistence.history import History

from .ablation_single import COMPONENT_HELP, SingleAblation
from .ablation_sweep import SWEEP_KINDS, SWEEP_METHODS, AblationSweep
from .parts import progress_text
from .patching_view import PatchingPanel

SECTIONS = ("single", "sweep", "patching")  # the inner tabs' order


class AblationView(pn.viewable.Viewer):
    """Single ablations, ablation sweeps and activation patching for one ModelSession."""

    def __init__(self, session: ModelSession, history: History | None = None, **params) -> None:
        super().__init__(**params)
        self.session = session
        self.history = history
        self.single = SingleAblation(session, history=history)
        self.sweep = AblationSweep(session, history=history, on_pick=lambda spec: self.select_components([spec],
                                                                                                         show=False))
        self.patching = PatchingPanel(session, history=history)
        self._sections = pn.Tabs(("Single ablation", self.single), ("Sweep", self.sweep),
                                 ("Activation patching", self.patching),
                                 sizing_mode="stretch_width", css_classes=["ablation-sections"])
        self._layout = pn.Column(self._sections, sizing_mode="stretch_width", css_classes=["ablation-view"])

    def select_components(self, specs: list[str], show: bool = True) -> None:
        """Put components (specs such as '3.1', '5:1024') into the single-ablation field.

        With ``show`` the single-ablation section is brought to the front. A spec that does
        not exist in the model is reported in the single ablation's error line (the field keeps it).
        """
        self.single.select(specs)
        if show:
            self._sections.active = 0

    def part(self, name: str):
        """The part called ``name`` ("single", "sweep", "patching") and bring its section to the front."""
        self._sections.active = SECTIONS.index(name)
        return getattr(self, name)

    def close(self) -> None:
        """Stop this view's jobs (their finished cells are kept)."""
        self.sweep.job.cancel()
        self.patching.job.cancel()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


__all__ = ["AblationView", "COMPONENT_HELP", "SWEEP_KINDS", "SWEEP_METHODS", "progress_text"]
