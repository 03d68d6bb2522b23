"""Version strings, in a module of their own: `pyvmm-firecracker --version`
and the argument parsers need them before the rest of the API is loaded."""
API_VERSION = "1.14.1"     # the firecracker.yaml the resources (schema.py) were read from
VMM_VERSION = "0.1.0"
APP_NAME = "pyvmm"
