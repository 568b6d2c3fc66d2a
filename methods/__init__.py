"""avlab.methods: the science of audio-visual self-supervised learning, in pure PyTorch.

This package never imports ray, mlflow, optuna or orchestrator (tests/test_layering.py).
"""
