"""Tools built on the optimizer: the offline problem suite, metrics, reports and tuning.

They sit beside the library's public surface (the rule, the backends, the kernels), which
never imports them; the ``rmsprop`` command line (:mod:`rmsprop.cli`) is a thin layer over
them.
"""
