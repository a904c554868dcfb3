"""kvconf's Hydra config tree, shipped inside the package as ``kvconf.conf``."""
