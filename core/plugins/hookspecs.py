"""The hooks a plugin implements. Docstrings only: the behaviour lives in the plugins.

The in-tree backends are registered through these same hooks and the same entry-point group
(``ember.backends``) a third-party distribution uses.
"""
import pluggy

hookspec = pluggy.HookspecMarker("ember")
hookimpl = pluggy.HookimplMarker("ember")


@hookspec
def ember_register_backends(register):
    """Register backend classes: call ``register(BackendSubclass)`` once for each.

    A backend class subclasses :class:`ember.backend.Backend` and declares its ``name``,
    ``device_type``, ``priority`` and the contract ``api_version`` it was written against.
    """

