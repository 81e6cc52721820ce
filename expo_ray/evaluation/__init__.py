"""Evaluation: the stage that turns committed variants into a report.

prompt sets (:mod:`.prompts`) -> the models to evaluate (:mod:`.models`, local copies in
:mod:`.model_cache`) -> vLLM generation and reward scoring (:mod:`.engine`, the only code that
touches vLLM) -> statistics per alpha (:mod:`.aggregate`) -> the paired alpha choice
(:mod:`.selection`) -> ``report.json``/``.md``/``.png`` (:mod:`.report`); :mod:`.pipeline` runs
them in order on Ray. It may import the layers below it (publish, extrapolation, cluster,
checkpoint, storage, options, errors), never alpha_search, sweep, demo, api or cli.
"""
