"""The one way a command reads a config file: "path/to/config.py[:arg]" -> the file's get_config(arg).

Config files import their siblings as `configs.base`, so the folder above the file's folder goes on
sys.path first (the repository root for files in `configs/`). train.py and the boundary tasks' CLI read
theirs through ml_collections' --config flag, which does the same for files given on the command line.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_config_file(location: str):
    """get_config(arg) of "path/to/config.py:arg", or get_config() of "path/to/config.py"."""
    path, separator, arg = location.partition(".py:")
    path = Path(path + ".py" if separator else path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r} (expected path/to/config.py[:arg])")
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_config_file_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config: {str(path)!r} defines no get_config()")
    return module.get_config(arg) if separator else module.get_config()
