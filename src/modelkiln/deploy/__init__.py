"""``kiln deploy``: the whole pipeline in one command, with a report a person reads."""

from modelkiln.deploy.run import DeployError, DeployOptions, DeploySummary, deploy

__all__ = ["DeployError", "DeployOptions", "DeploySummary", "deploy"]
