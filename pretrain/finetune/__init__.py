"""Finetuning stages on saved checkpoints: continued pretraining, SFT (x-LLaMA instruction
mixtures with masked prompts) and LoRA, each a train module + preset run by the shared
:class:`~pretrain.trainer.trainer.Trainer`; every checkpoint records its lineage."""
