"""Run -> tables: the checkpoint tasks and their scheduler, the model probe, the cache, the
findings and the summary. Calls the metrics and the loaders; draws nothing.
"""
