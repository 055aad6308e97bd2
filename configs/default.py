"""Base config: every key ddx reads, with its default (defined in ddx/config.py).

  python -m ddx.main --config configs/default.py --workdir runs/default

The defaults live in the package (`ddx.config.base_config`) so that every
config file, wherever it is, can start from them with one import; this file
exists so the defaults can be run and overridden like any other config.
"""
from ddx.config import base_config


def get_config():
  return base_config()
