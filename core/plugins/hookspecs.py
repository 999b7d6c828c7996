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



@hookspec
def ember_register_quant_methods(register):
    """Register quant methods: call ``register(method)`` once for each, with an instance of a
    :class:`ember.quant.QuantMethod` subclass that declares its ``name`` and the contract
    ``api_version`` it was written against.

    A method reads one family of checkpoints (it recognises their ``quantization_config``) and
    gives the reference dequantize; backends supply the kernels for the formats it yields.
    ember's own methods (``gguf``, ``unquantized``) are registered through this same hook.
    """
