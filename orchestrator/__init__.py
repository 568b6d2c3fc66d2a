"""avlab.orchestrator: config, command line, Ray Train / Tune and MLflow around ``methods``."""
