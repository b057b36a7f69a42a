"""Routing rules: which models read an instance, and where its study's reports go.

Rules come from ``[[routes]]`` in the config and are tried in order; the first whose criteria
all match an instance decides for it (calling AE, Modality, SOP Class UID, Body Part Examined,
and a regular expression on Series Description). With no rules, every image goes to every model
whose sidecar accepts it and reports go to ``reports.destinations``. With rules, an instance no
rule matches is stored but not analysed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from nidaan.core.attributes import text
from nidaan.core.config import Config, Route


@dataclass(frozen=True)
class Decision:
    """What a rule decided for one instance."""

    route: str  # the rule's name, or "" when no rules are configured
    models: frozenset[str] | None  # None = every accepting model
    destinations: tuple[str, ...]


class Router:
    """Applies the configured routing rules."""

    def __init__(self, config: Config, model_names: set[str] | None = None) -> None:
        self.config = config
        self.routes = list(config.routes)
        self._patterns = [
            re.compile(r.series_description, re.IGNORECASE) if r.series_description else None
            for r in self.routes
        ]
        if model_names is not None:
            for i, route in enumerate(self.routes):
                unknown = set(route.models) - model_names
                if unknown:
                    from nidaan.core.errors import ConfigError

                    raise ConfigError(
                        f"routes[{i}].models names unknown model(s): {', '.join(sorted(unknown))}"
                    )

    def _matches(
        self, route: Route, pattern: re.Pattern[str] | None, ds: Dataset, calling_ae: str
    ) -> bool:
        def any_of(values: list[str], actual: str) -> bool:
            return not values or actual.upper() in {v.strip().upper() for v in values}

        return (
            any_of(route.calling_ae, calling_ae.strip())
            and any_of(route.modality, text(ds, "Modality"))
            and any_of(route.sop_class, text(ds, "SOPClassUID"))
            and any_of(route.body_part, text(ds, "BodyPartExamined"))
            and (pattern is None or bool(pattern.search(text(ds, "SeriesDescription"))))
        )

    def decide(self, ds: Dataset, calling_ae: str) -> Decision | None:
        """The decision for an instance, or None when rules exist and none matches it."""
        default = tuple(self.config.reports.destinations)
        if not self.routes:
            return Decision("", None, default)
        for route, pattern in zip(self.routes, self._patterns, strict=True):
            if self._matches(route, pattern, ds, calling_ae):
                models = frozenset(route.models) if route.models else None
                return Decision(route.name, models, tuple(route.destinations) or default)
        return None
