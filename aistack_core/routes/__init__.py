"""One file per route family; each has ``setup(app)`` adding its routes.

A route parses its body with :mod:`aistack_core.forms`, resolves the model
with the registry, runs the work inside :func:`aistack_core.inference.inference`
and answers.  Route files never import each other: what two of them share
lives in a mechanism module.
"""
