"""The ``hbmeta`` command line: ``hbmeta compare <model>``, ``hbmeta models``, ``hbmeta fit``."""

from numpyro_hbmeta.cli.main import main

__all__ = ["main"]
