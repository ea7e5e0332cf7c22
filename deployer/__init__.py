"""deployer: ship a long-running network service to a fleet with zero failed requests."""

__version__ = "0.1.0"
