"""meddiff_components: one Kubeflow Pipelines component per stage, thin shells over meddiff.stages."""
