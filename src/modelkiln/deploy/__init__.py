"""``kiln deploy``: the whole pipeline in one command, with a report a person reads."""

from modelkiln.deploy.options import DeployOptions
from modelkiln.deploy.run import deploy
from modelkiln.deploy.stages import DeployError
from modelkiln.deploy.summary import DeploySummary

__all__ = ["DeployError", "DeployOptions", "DeploySummary", "deploy"]
