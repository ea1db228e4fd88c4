"""The one monkey-patching idiom of the integrations: wrap a function once, mark the wrapper.

Every patch site (verl's trainers, engine, agent loop; module globals of verl's model code)
goes through :func:`wrap_once` / :func:`patch_attribute`, so a second application — the plugin
loaded twice, a module re-imported, a Ray actor class whose copy already carries the patch — is a
no-op, and :func:`is_wrapped` tells whether a given callable is ours.

Ray actor classes: ``@ray.remote class C`` leaves an ``ActorClass`` at the module name, and Ray
ships the class ``C.__ray_metadata__.modified_class`` (a subclass of the user class) to the actor
process *by value*; :func:`actor_class` returns that class, so a patch made in the creating process
travels with it.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

__all__ = ["MARK", "actor_class", "is_wrapped", "original_of", "patch_attribute", "temporarily", "wrap_once"]

MARK = "_kawhi_wrapped"


def is_wrapped(fn: Any) -> bool:
    """True when ``fn`` (a function, or a staticmethod/classmethod around one) is a KAWHI wrapper."""
    fn = getattr(fn, "__func__", fn)
    return bool(getattr(fn, MARK, False))


def original_of(fn: Any) -> Any:
    """The callable a KAWHI wrapper wraps (``fn`` itself when it is not one)."""
    return getattr(fn, "__kawhi_original__", fn) if is_wrapped(fn) else fn


def wrap_once(original: Callable, make_wrapper: Callable[[Callable], Callable]) -> Callable:
    """``make_wrapper(original)`` with ``original``'s name/doc and the KAWHI mark; ``original``
    unchanged when it already is a KAWHI wrapper."""
    if not callable(original):
        raise TypeError(f"wrap_once: expected a callable to wrap, got {type(original).__name__}")
    if is_wrapped(original):
        return original
    wrapper = make_wrapper(original)
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, MARK, True)
    wrapper.__kawhi_original__ = original
    return wrapper


def patch_attribute(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> bool:
    """Replace ``owner.name`` (a class method or a module global) by ``make_wrapper(original)``
    once. Returns True when it patched, False when ``owner.name`` was already wrapped.

    Raises AttributeError naming ``owner`` and ``name`` when the attribute does not exist (the
    patched library changed)."""
    if not hasattr(owner, name):
        raise AttributeError(f"patch_attribute: {getattr(owner, '__name__', owner)!r} has no attribute {name!r} "
                             "(unsupported version of the patched library?)")
    original = getattr(owner, name)
    wrapped = wrap_once(original, make_wrapper)
    if wrapped is original:
        return False
    setattr(owner, name, wrapped)
    return True


def actor_class(cls: Any) -> Any:
    """The class Ray ships to actor processes for ``cls`` (``@ray.remote`` classes), else ``cls``."""
    meta = getattr(cls, "__ray_metadata__", None)
    return meta.modified_class if meta is not None else cls


@contextlib.contextmanager
def temporarily(owner: Any, name: str, wrapper: Callable[[Callable], Callable]):
    """Context manager: ``owner.name`` is ``wrapper(original)`` inside, ``original`` again after
    (also on error). For taps that must only live during one call (module globals of a model's
    attention path, a worker group's method). When ``owner`` is an instance whose attribute comes
    from its class, the instance attribute is removed again afterwards. AttributeError naming
    ``owner`` and ``name`` when it is missing."""
    if not hasattr(owner, name):
        raise AttributeError(f"temporarily: {getattr(owner, '__name__', owner)!r} has no attribute {name!r} "
                             "(unsupported version of the patched library?)")
    original = getattr(owner, name)
    own = name in getattr(owner, "__dict__", {name: None})   # an instance shadowing a class method?
    setattr(owner, name, wrapper(original))
    try:
        yield original
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)                             # the class attribute shows through again
