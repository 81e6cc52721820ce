"""Publishing: a plan's variants, written and committed on storage.

:mod:`.destination` checks where variants may be written; :mod:`.run` runs a plan's shard tasks
on Ray (resuming what an earlier run finished) and commits each variant; :mod:`.commit` writes
the side files, the model card (:mod:`.modelcard`, with its mergekit config) and the manifest
LAST (:mod:`.manifest`, which also verifies a committed variant). It imports extrapolation and
the layers below it; evaluation and everything above read what it commits.
"""
