"""The Ray Serve application: one deployment per model stage, an HTTP ingress with the web page, and the
`coltran serve` verb. `pipelines.serve.app:build_app` is the import path that `serve run`, `serve deploy` and
KubeRay's RayService use."""
