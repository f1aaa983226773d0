"""The quality benchmark (`run_quality.py`, its command line) and its parts: `common` (methods, settings each
stored result depends on, records), `models` (models and data), `stages` (pre-training and fine-tuning), `probe`
(frozen features: linear probe and k-NN) and `report` (the tables)."""
