"""convnext-deploy: ship ConvNeXt image classifiers to devices (export, INT8 PTQ, compile per target, validate).

One installed name. The rooms live at the top of the checkout (pipeline/, targets/, calibration/, reports/) and
are installed as convnext_deploy.pipeline, convnext_deploy.targets, convnext_deploy.calibration and
convnext_deploy.reports (pyproject.toml maps them), so nothing of this project shadows a user's own `pipeline`.
"""
__version__ = "0.1.0"
