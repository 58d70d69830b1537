"""The pure formulas (§1-12 of docs/metrics): functions over arrays and tensors, one module per
metric family. Nothing here reads a file, knows a run, or draws.
"""
