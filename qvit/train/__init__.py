"""The job: the ``qvit`` command line, the training loop, data, DDP and the demo.

The top layer of the package: it imports the model tools and the layers,
nothing below imports it.
"""
