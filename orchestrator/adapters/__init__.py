"""Adapter methods, one module each, registered by name.

A method module defines a pydantic spec (with a `method: Literal[...]` discriminator) and an
`AdapterMethod` that attaches it to a frozen model. Every module in this package is imported
here, so a new method is one new file. Modules named `_…` are helpers, imported by their method when
it runs: method modules import torch only inside functions, so reading a spec (the CLI, the driver)
does not load it.
"""

import importlib
import pkgutil

from orchestrator.adapters.registry import DEFAULT_METHOD, AdapterMethod, all_methods, get_method, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFAULT_METHOD", "AdapterMethod", "all_methods", "get_method", "register"]
