"""Retraining harnesses that measure the library against ground truth (exact leave-one-out
retrains for explanation faithfulness). Used by benchmarks and tests, never imported by the
runtime path (training, serving, the command line's train/predict/serve)."""
