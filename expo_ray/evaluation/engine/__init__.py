"""The vLLM boundary: everything that imports vLLM, or knows its internals, lives in this package.

- :mod:`.vllm_engine`: generation and reward engines (``vllm.LLM``), prompts rendered with each
  model's chat template;
- :mod:`.weight_swap`: the worker extension that loads new weights into a running engine (per
  tensor-parallel rank), and the layer-wise reload workaround with its version note;
- :mod:`.swap_policy`: which architectures are proven for swapping, which get their swaps checked;
- :mod:`.swap_check`: the check (runs in the workers): layer outputs and parameters against a
  fresh load by vLLM's own loader;
- :mod:`.vllm_support`: which vLLM is installed, which versions swapping was tested with;
- :mod:`.actors`: Ray actors holding one engine each, started and stopped for an evaluation or a
  search (:func:`~.actors.start_reward_actor`, :func:`~.actors.stop`);
- :mod:`.placement`: where engines go on the cluster (GPU or CPU, how many at once).

Every module imports vLLM lazily, so this package loads on machines without it.
"""
