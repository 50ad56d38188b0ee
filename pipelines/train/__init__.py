"""Training the three ColTran stages at once on Ray Train, tracked in MLflow: job config, driver, worker loop."""
