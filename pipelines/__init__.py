"""meddiff_pipelines: the Kubeflow Pipelines pipeline over meddiff_components, and its compiler."""
