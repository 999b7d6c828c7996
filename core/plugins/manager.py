"""Load backend plugins from entry points and choose one.

A plugin that fails to import, or registers something that breaks the contract, is recorded with
its error and listed by ``ember plugins``; it never takes the other plugins down.
"""
from __future__ import annotations

import importlib.metadata as md
import logging
import traceback
from dataclasses import dataclass

import pluggy

from typing import TYPE_CHECKING

from ember.backend import BACKEND_API_VERSION, Availability, Backend
from ember.plugins import hookspecs

if TYPE_CHECKING:  # pragma: no cover
    from ember.quant import QuantMethod

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "ember.backends"


class BackendUnavailable(RuntimeError):
    pass


@dataclass
class BackendInfo:
    name: str
    plugin: str  # entry-point name
    distribution: str
    version: str
    cls: type[Backend] | None
    availability: Availability
    priority: int = 0
    device_type: str = ""
    error: str = ""  # load or contract error, when the plugin could not be used

    @property
    def usable(self) -> bool:
        return self.cls is not None and self.availability.ok


@dataclass
class QuantMethodInfo:
    name: str
    plugin: str  # entry-point name, or "ember" for the built-in methods
    method: "QuantMethod | None"
    error: str = ""


class PluginRegistry:
    def __init__(self, entry_points=None):
        from ember.quant import builtin

        self.pm = pluggy.PluginManager("ember")
        self.pm.add_hookspecs(hookspecs)
        self.backends: dict[str, BackendInfo] = {}
        self.failed: list[BackendInfo] = []
        self.quant_methods: dict[str, "QuantMethod"] = {}
        self.failed_quant_methods: list[QuantMethodInfo] = []
        # ember's own quant methods, registered through the hook a third party's use
        self.pm.register(builtin, name="ember")
        self._collect_quant_methods("ember")
        self._load(entry_points if entry_points is not None else md.entry_points(group=ENTRY_POINT_GROUP))

    def _load(self, entry_points) -> None:
        for ep in entry_points:
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            dist_version = dist.version if dist is not None else "?"
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as e:  # a broken plugin is reported, never fatal
                log.warning("backend plugin %r failed to load: %s", ep.name, e)
                self.failed.append(
                    BackendInfo(ep.name, ep.name, dist_name, dist_version, None,
                                Availability.no(f"plugin failed to load: {e!r}"),
                                error=_short_tb(e))
                )
                continue
            self._collect(ep.name, dist_name, dist_version)
            self._collect_quant_methods(ep.name)

    def _only(self, plugin_name: str, hook: str):
        impl = self.pm.get_plugin(plugin_name)
        return self.pm.subset_hook_caller(hook, remove_plugins=[p for p in self.pm.get_plugins() if p is not impl])

    def _collect_quant_methods(self, plugin_name: str) -> None:
        from ember.quant import QUANT_API_VERSION, QuantMethod

        registered: list = []
        try:
            self._only(plugin_name, "ember_register_quant_methods")(register=registered.append)
        except Exception as e:
            self.failed_quant_methods.append(QuantMethodInfo(plugin_name, plugin_name, None,
                                                             f"registration failed: {_short_tb(e)}"))
            return
        for m in registered:
            name = getattr(m, "name", None) or repr(m)
            if not isinstance(m, QuantMethod):
                err = f"{m!r} is not an instance of an ember.quant.QuantMethod subclass"
            elif getattr(m, "api_version", None) != QUANT_API_VERSION:
                err = (f"written for quant API version {getattr(m, 'api_version', None)}, this ember "
                       f"provides version {QUANT_API_VERSION}")
            elif name in self.quant_methods:
                err = "duplicate quant method name"
            else:
                self.quant_methods[name] = m
                continue
            log.warning("quant method %r of plugin %r refused: %s", name, plugin_name, err)
            self.failed_quant_methods.append(QuantMethodInfo(name, plugin_name, None, err))

    def _collect(self, plugin_name: str, dist_name: str, dist_version: str) -> None:
        registered: list[type] = []
        try:
            self._only(plugin_name, "ember_register_backends")(register=registered.append)
        except Exception as e:
            self.failed.append(BackendInfo(plugin_name, plugin_name, dist_name, dist_version, None,
                                           Availability.no(f"registration failed: {e!r}"),
                                           error=_short_tb(e)))
            return
        for cls in registered:
            info = self._check(cls, plugin_name, dist_name, dist_version)
            if info.name in self.backends:
                other = self.backends[info.name]
                info.cls, info.error = None, f"duplicate backend name, already provided by {other.distribution}"
                info.availability = Availability.no(info.error)
                self.failed.append(info)
                continue
            self.backends[info.name] = info

    @staticmethod
    def _check(cls, plugin_name: str, dist_name: str, dist_version: str) -> BackendInfo:
        name = getattr(cls, "name", None) or plugin_name
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            err = f"{cls!r} is not a subclass of ember.backend.Backend"
            return BackendInfo(name, plugin_name, dist_name, dist_version, None, Availability.no(err), error=err)
        if getattr(cls, "api_version", None) != BACKEND_API_VERSION:
            err = (f"written for backend API version {getattr(cls, 'api_version', None)}, "
                   f"this ember provides version {BACKEND_API_VERSION}")
            return BackendInfo(name, plugin_name, dist_name, dist_version, None, Availability.no(err), error=err)
        try:
            avail = cls.availability()
            if not isinstance(avail, Availability):
                avail = Availability.no(f"availability() returned {avail!r}, not an Availability")
        except Exception as e:
            avail = Availability.no(f"availability check raised {e!r}")
        return BackendInfo(name, plugin_name, dist_name, dist_version, cls, avail,
                           priority=cls.priority, device_type=cls.device_type)

    @classmethod
    def of(cls, *backends: type[Backend]) -> "PluginRegistry":
        """A registry holding just these backend classes, checked as entry points' are (for tests
        and the conformance kit, which run a backend without installing it)."""
        reg = cls(entry_points=[])
        for b in backends:
            info = reg._check(b, getattr(b, "name", "?"), "(direct)", "")
            if info.cls is None:
                reg.failed.append(info)
            else:
                reg.backends[info.name] = info
        return reg

    def all(self) -> list[BackendInfo]:
        return sorted(list(self.backends.values()) + self.failed, key=lambda b: (-b.priority, b.name))

    def select(self, device: str = "auto") -> BackendInfo:
        """``auto``: the highest-priority available backend. Otherwise a backend name or a device
        type (``cpu``, ``cuda``, ...), failing with every reason when none can run."""
        if device == "auto":
            candidates = [b for b in self.backends.values() if b.usable]
            if not candidates:
                raise BackendUnavailable("no backend can run here:\n" + self._reasons(self.all()))
            return max(candidates, key=lambda b: (b.priority, b.name))
        matches = [b for b in self.all() if device in (b.name, b.device_type)]
        if not matches:
            known = ", ".join(sorted({b.name for b in self.all()} | {b.device_type for b in self.all() if b.device_type}))
            raise BackendUnavailable(f"no backend named {device!r} is installed (installed: {known or 'none'})")
        usable = [b for b in matches if b.usable]
        if not usable:
            raise BackendUnavailable(f"backend {device!r} cannot run here:\n" + self._reasons(matches))
        return max(usable, key=lambda b: (b.priority, b.name))

    @staticmethod
    def _reasons(infos: list[BackendInfo]) -> str:
        return "\n".join(f"  {b.name}: {b.availability.reason}" for b in infos) or "  (no backend plugins installed)"


def _short_tb(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


_registry: PluginRegistry | None = None


def get_registry(refresh: bool = False) -> PluginRegistry:
    global _registry
    if _registry is None or refresh:
        _registry = PluginRegistry()
    return _registry


def select_backend(device: str = "auto") -> BackendInfo:
    return get_registry().select(device)
