"""The pure part of a reconcile: what to do for each plugin, given what is there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from registry.db.workspaces import DeclaredPlugin, InstalledPlugin

Action = Literal["install", "upgrade", "skip", "remove"]


@dataclass(frozen=True, slots=True)
class PlannedStep:
    plugin: str
    source: str
    action: Action
    installed_sha: str | None  # what the registry recorded, if anything
    reason: str


def plan(
    declared: Sequence[DeclaredPlugin],
    installed: Mapping[str, InstalledPlugin],
    observed: Mapping[str, str] | None,
) -> list[PlannedStep]:
    """Diff declared against installed, and against observed when the runtime reported it.

    A record says what the registry delivered; an observation says what the box runs. When the
    runtime reports its plugins, a record it does not confirm (the box was replaced) is
    installed again. The diff compares sources and SHAs, never timestamps or file listings, so a
    converged workspace plans nothing but skips (DESIGN lesson 6). The declared set is the
    desired state: an installed plugin no longer declared is removed (lesson 12).
    """
    steps = []
    for plugin in declared:
        record = installed.get(plugin.name)
        if record is None:
            steps.append(PlannedStep(plugin.name, plugin.source, "install", None, "not installed"))
        elif record.source != plugin.source:
            steps.append(
                PlannedStep(plugin.name, plugin.source, "upgrade", record.sha, "source changed")
            )
        elif observed is not None and not record.reported_as(observed.get(plugin.name)):
            steps.append(
                PlannedStep(
                    plugin.name, plugin.source, "install", record.sha, "runtime does not report it"
                )
            )
        else:
            steps.append(PlannedStep(plugin.name, plugin.source, "skip", record.sha, "converged"))
    wanted = {plugin.name for plugin in declared}
    for name, record in sorted(installed.items()):
        if name not in wanted:
            steps.append(PlannedStep(name, record.source, "remove", record.sha, "not declared"))
    return steps


def observed_shas(observed_plugins: Sequence[Mapping[str, object]] | None) -> dict[str, str] | None:
    """The runtime's report as name → sha; None when it did not report."""
    if observed_plugins is None:
        return None
    return {
        str(item["name"]): str(item.get("sha") or "")
        for item in observed_plugins
        if isinstance(item.get("name"), str)
    }
