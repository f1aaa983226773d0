"""The training side of transformers-cim: the `Trainer` subclasses, the data pipeline, streaming, resuming,
fine-tuning recipes, k-NN monitoring, metrics, model cards and the scripts' arguments and helpers.

It imports the library (`transformers_cim`), never the reverse. Import what you need from its modules
(`transformers_cim.training.trainer`, `transformers_cim.training.data`, ...); this file imports nothing, so
`import transformers_cim` stays free of the training dependencies' import cost.
"""
