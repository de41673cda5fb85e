"""Spine geometry on canonical ``IPL`` arrays: straightening, de-pedicling, body heights and crops.

- :mod:`~healthivert.geometry.straighten`: resample a scan on planes orthogonal to the spine curve;
- :mod:`~healthivert.geometry.depedicle`: keep the vertebral bodies, remove the posterior elements;
- :mod:`~healthivert.geometry.morphometry`: heights per antero-posterior third (the one height definition);
- :mod:`~healthivert.geometry.spine`: all of the above for a whole spine, and which vertebrae are usable;
- :mod:`~healthivert.geometry.crops`: per-vertebra crops with the fixed-height mask band.
"""
