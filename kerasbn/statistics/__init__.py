"""Population statistics of BN layers from data: calibration (Algorithm 2), the
stale-statistics audit, and swapping between Keras's BN and kerasbn's."""
