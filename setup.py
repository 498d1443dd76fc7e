"""The C part of the build; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("cupystreams._fastpath", ["cupystreams/_fastpath.c"])])
