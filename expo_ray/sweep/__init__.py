"""Sweeps: many model pairs x alpha grids x evaluations from one YAML spec, re-runnable on a
schedule; finished work is skipped. :mod:`.spec` reads and checks the spec (keys from the
options objects), :mod:`.run` runs it with extrapolation, evaluation and search.
"""
