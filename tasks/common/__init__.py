"""The parts every stage shares: settings, errors, files written whole, the pipeline lock, MLflow, and the
contracts between stages."""
