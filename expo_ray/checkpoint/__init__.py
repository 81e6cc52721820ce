"""The format layer: checkpoints as they are stored, read without torch.

:mod:`.safetensors_io` parses and validates safetensors headers and reads tensors by byte range;
:mod:`.folder` opens a Hugging Face model folder (index, config, tokenizer and side files, every
tensor's location by name); :mod:`.hashing` computes the content hashes manifests record;
:mod:`.identity` computes every fingerprint and cache key (of checkpoints, pairs, variants,
evaluations). It imports only storage, options and errors.
"""
