"""nvembed.training: the training stack (data, hard-negative mining, the stdlib train/test set, the trainer).

Installed as the package nvembed.training from the repository's training/ folder (setup.py package_dir); in a
source checkout nvembed/__init__.py makes the same import work. Importing this package loads nothing heavy:
import the submodules (nvembed.training.data, .mining, .stdlib_split) for what you need.
"""
