"""Everything distributed: Ray Data jobs, Ray Train driver and worker loop, Ray Serve app, MLflow tracking."""
