"""Maps the design-card folders into one import namespace: data_shards/ -> ehrfm.data_shards, etc.

Metadata lives in pyproject.toml; only the package list is computed here because setuptools cannot
discover sub-packages of a remapped folder declaratively. ``ehrfm/<folder>`` are symlinks to the same
folders, so that Python, type checkers and IDEs started in the checkout see the whole package too; the
install maps the real folders (below) and never follows those links.
"""

from setuptools import find_packages, setup

STAGE_FOLDERS = ("data_shards", "pretrain", "finetune", "kernels", "launch")

package_dir = {"ehrfm": "ehrfm"}
core_subpackages = find_packages("ehrfm", exclude=[*STAGE_FOLDERS, *(f"{f}.*" for f in STAGE_FOLDERS)])
packages = ["ehrfm"] + [f"ehrfm.{sub}" for sub in core_subpackages]
for folder in STAGE_FOLDERS:
    package_dir[f"ehrfm.{folder}"] = folder
    packages.append(f"ehrfm.{folder}")
    packages += [f"ehrfm.{folder}.{sub}" for sub in find_packages(folder)]

setup(package_dir=package_dir, packages=packages)
