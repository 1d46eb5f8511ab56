"""quantbench: train, quantize (eager, FX, PT2E) and benchmark int8 CNNs on the CPU.

The pipeline, one module per stage:
    data -> models -> train -> quantize (flows/) -> export -> bench -> report
and `replicate` runs it end to end. The CLI (`quantbench ...`) is a thin layer over these.
"""
__version__ = "0.1.0"
