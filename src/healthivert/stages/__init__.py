"""Thin pipeline entry points: parse paths, load params, call the library, write outputs atomically.

Every stage module exposes ``add_arguments(parser)``, ``execute(args)`` (used by the CLI, DVC and the
Kubeflow components alike) and a typed ``run(...)`` that does the work and returns its metrics.
"""
