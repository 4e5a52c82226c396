"""Packaging that pyproject.toml cannot say: compose-templates/ stays at the top of the
repository, where people look for it, yet ships inside the wheel as the package
`swapctl.compose_templates`, so an installed swapctl finds `template: llama-server`
(pyproject.toml cannot add a package from another folder to the packages it finds).
The web page, swapctl/proxy/ui.html, ships beside the module that serves it, with the
library it inlines (swapctl/proxy/vendor/: uPlot, its license beside it)."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["swapctl*"]), "swapctl.compose_templates"],
    package_dir={"swapctl.compose_templates": "compose-templates"},
    package_data={
        "swapctl.compose_templates": ["*.yaml"],
        "swapctl.proxy": ["ui.html"],
        "swapctl.proxy.vendor": ["*.js", "*.css", "*.LICENSE"],
    },
)
