"""Train modules for the distributed engines (``parallel.engine``): each offers the interface of
:class:`pretrain.trainer.train_module.TrainModule` (``train_step``, ``eval_loss``,
``state_dict``, ``load_state_dict``), so the trainer does not branch on the engine.

* :mod:`parallel.engines.megatron` - megatron-core tensor (+ sequence) parallelism and data
  parallelism: ``MegatronTrainModule``.
* :mod:`parallel.engines.deepspeed` - DeepSpeed ZeRO.

Import the submodule you need; this package imports neither engine eagerly.
"""
