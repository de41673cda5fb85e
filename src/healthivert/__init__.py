"""HealthiVert-GAN: pseudo-healthy vertebra synthesis and Genant grading of vertebral fractures on CT.

The package is laid out along the pipeline:

- :mod:`healthivert.io` reads and writes NIfTI volumes, dataset layouts, centroids and grades;
- :mod:`healthivert.phantom` generates synthetic spine CTs with known ground truth;
- :mod:`healthivert.geometry` straightens spines, isolates vertebral bodies and measures heights;
- :mod:`healthivert.data` holds the preprocessing manifest, splits and training samples;
- :mod:`healthivert.models`, :mod:`healthivert.losses`, :mod:`healthivert.training` build and train the GAN;
- :mod:`healthivert.synthesis` runs iterative 2.5D synthesis;
- :mod:`healthivert.rhlv`, :mod:`healthivert.grading`, :mod:`healthivert.evaluation` turn it into grades;
- :mod:`healthivert.tracking` logs to MLflow; :mod:`healthivert.stages` are the thin pipeline entry points.
"""

__version__ = "0.1.0"
