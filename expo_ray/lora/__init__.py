"""Aligned models that are PEFT LoRA adapters on the SFT model: read and check them (:mod:`.adapter`,
:mod:`.validate`), plan their variants as adapters or merged folders (:mod:`.plan`), compute merged
tensors (:mod:`.merge`) and write one adapter variant directly (:mod:`.scale`)."""
