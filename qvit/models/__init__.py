"""Model tools: convert timm models, calibrate, budget, report, export, the recipe.

Below the training job (:mod:`qvit.train` imports these, never the other way).
Imported lazily from :mod:`qvit`'s top level so that ``import qvit`` does not
pull in timm.
"""
