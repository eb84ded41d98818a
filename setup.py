"""Maps the design-card folders into one import namespace: data_shards/ -> ehrfm.data_shards, etc.

Metadata lives in pyproject.toml; only the package list is computed here because setuptools cannot
discover sub-packages of a remapped folder declaratively.
"""

from setuptools import find_packages, setup

STAGE_FOLDERS = ("data_shards", "pretrain", "finetune", "kernels", "launch")

package_dir = {"ehrfm": "ehrfm"}
packages = ["ehrfm"] + [f"ehrfm.{sub}" for sub in find_packages("ehrfm")]
for folder in STAGE_FOLDERS:
    package_dir[f"ehrfm.{folder}"] = folder
    packages.append(f"ehrfm.{folder}")
    packages += [f"ehrfm.{folder}.{sub}" for sub in find_packages(folder)]

setup(package_dir=package_dir, packages=packages)
