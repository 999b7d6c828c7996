"""Plugin discovery (pluggy over the ``ember.backends`` entry points) and backend selection."""
from ember.plugins.hookspecs import hookimpl, hookspec
from ember.plugins.manager import (
    BackendInfo,
    BackendUnavailable,
    PluginRegistry,
    get_registry,
    select_backend,
)

__all__ = [
    "BackendInfo",
    "BackendUnavailable",
    "PluginRegistry",
    "get_registry",
    "hookimpl",
    "hookspec",
    "select_backend",
]
