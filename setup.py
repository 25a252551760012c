"""Build glue: setuptools needs setup.py to run cffi's build of the native core."""

from setuptools import setup

setup(cffi_modules=["asyncfabric/backends/libfabric/_build.py:ffibuilder"])
