"""The configuration: ``model`` (frozen values, importing nothing else of the package), ``parse``
(YAML → model, every error with its key path; ``values``, ``providers``, ``rules`` and ``secrets``
read the sections), ``urls`` (which issuer URLs may be fetched). ``ext_authz.compiled`` turns a
parsed model into what the request path reads, once per config.

Import the modules themselves (``from ext_authz.config.parse import load``): this file imports
nothing, so that reading the model never loads the parser, PyYAML or the CEL runtime.
"""
