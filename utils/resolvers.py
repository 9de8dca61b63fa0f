"""OmegaConf resolvers used by the configs. Imported by the entry points and tests."""

from __future__ import annotations

from omegaconf import OmegaConf


def register_resolvers() -> None:
    # ${len:${data.classes}} -> number of classes, so backbones size their heads from the data.
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda items: len(items))


register_resolvers()
