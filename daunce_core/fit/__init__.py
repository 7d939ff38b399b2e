"""Fitting the K perturbed models: the contract (:mod:`.contract`), the shared chunk machinery
(:mod:`.chunks`) and one module per way of fitting."""
from ..perturb import Plan
from .contract import Fitter, Signals

__all__ = ["Fitter", "Plan", "Signals"]
