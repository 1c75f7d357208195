"""Plugin sources, fetching, staging and delivery: the security policy for installs."""

from registry.plugins.delivery import (
    deliver_to_filesystem,
    installed_path,
    remove_from_filesystem,
)
from registry.plugins.errors import FetchFailed, InvalidSource, PluginError, SourceDenied
from registry.plugins.fetch import (
    FetchLimits,
    StagedPlugin,
    resolve_version,
    stage,
    tree_digest,
)
from registry.plugins.sources import (
    PluginSource,
    SourceSettings,
    check_allowed,
    default_plugin_name,
    parse_source,
    validate_plugin_name,
)

__all__ = [
    "FetchFailed",
    "FetchLimits",
    "InvalidSource",
    "PluginError",
    "PluginSource",
    "SourceDenied",
    "SourceSettings",
    "StagedPlugin",
    "check_allowed",
    "default_plugin_name",
    "deliver_to_filesystem",
    "installed_path",
    "parse_source",
    "remove_from_filesystem",
    "resolve_version",
    "stage",
    "tree_digest",
    "validate_plugin_name",
]
